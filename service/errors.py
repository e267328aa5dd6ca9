"""What can go wrong while serving, as plain exceptions; only the route layer turns them into HTTP statuses."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class. ``str(exc)`` is the message the client sees, naming expected and received values."""


class InvalidInput(ServiceError):
    """The request is malformed or does not fit the model (name, datatype, shape, element count, framing)."""


class TooLarge(ServiceError):
    """The request passes a size limit (rows, elements, bytes, JSON size); the message names the setting."""


class ModelNotFound(ServiceError):
    """No model, or no version, by that name in the repository."""


class ModelNotReady(ServiceError):
    """The model exists but failed to load or failed its certificate self-test."""


class Overloaded(ServiceError):
    """The model's request queue is full; the client should retry later."""


class ControlDisabled(ServiceError):
    """A repository load or unload while ``BNFOLD_MODEL_CONTROL`` does not allow it (not ``explicit``)."""


class LoadFailed(ServiceError):
    """An explicit load found the model, but a version of it did not load or failed its self-test."""
