"""Which versions of a model serve: ``config.json``'s ``version_policy``, as Triton names it.

``{"all": {}}``
    every version in the repository (the default, and what bnfold always did);
``{"latest": {"num_versions": N}}``
    the ``N`` newest versions *that serve*, 1 <= N <= :data:`MAX_POLICY_VERSIONS`;
``{"specific": {"versions": [a, b, ...]}}``
    exactly these versions (those present), at most :data:`MAX_POLICY_VERSIONS` of them.

One difference from Triton, on purpose: ``latest`` counts versions that loaded and passed their
certificate self-test. A newest version that fails is listed as not ready with its reason, and
the version before it keeps serving, instead of the model losing its only good version.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

MAX_POLICY_VERSIONS = 64  # versions one policy may name or keep: each is an onnxruntime session in memory
MAX_VERSION = 10**18 - 1  # version directory names have at most 18 digits (service.api.deps.check_names)

PolicyKind = Literal["all", "latest", "specific"]


def _brief(value: object) -> str:
    return " ".join(repr(value).split())[:60]


@dataclass(frozen=True)
class VersionPolicy:
    """``kind`` with its one parameter: ``num_versions`` for latest, ``versions`` for specific."""

    kind: PolicyKind = "all"
    num_versions: int = 0
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, value: object) -> VersionPolicy:
        """The policy a ``version_policy`` JSON value names. Raises ``ValueError`` naming what was expected."""
        expected = ('expected {"all": {}}, {"latest": {"num_versions": N}} or '
                    '{"specific": {"versions": [v, ...]}}')
        if not isinstance(value, dict) or len(value) != 1:
            raise ValueError(f"version_policy must be an object with one key; {expected}, got {_brief(value)}")
        (kind, body), = value.items()
        if kind == "all" and body == {}:
            return cls()
        if kind == "latest" and isinstance(body, dict) and set(body) == {"num_versions"}:
            count = body["num_versions"]
            if type(count) is not int or not 1 <= count <= MAX_POLICY_VERSIONS:
                raise ValueError(f"version_policy latest num_versions must be an integer from 1 to "
                                 f"{MAX_POLICY_VERSIONS}, got {_brief(count)}")
            return cls("latest", num_versions=count)
        if kind == "specific" and isinstance(body, dict) and set(body) == {"versions"}:
            versions = body["versions"]
            if not isinstance(versions, list) or not 1 <= len(versions) <= MAX_POLICY_VERSIONS or \
                    any(type(v) is not int or not 0 <= v <= MAX_VERSION for v in versions):
                raise ValueError(f"version_policy specific versions must be a list of 1 to {MAX_POLICY_VERSIONS} "
                                 f"version numbers (integers >= 0), got {_brief(versions)}")
            return cls("specific", versions=tuple(sorted(set(versions))))
        raise ValueError(f"version_policy: {expected}, got {_brief(value)}")

    def candidates(self, present: Iterable[int]) -> list[int]:
        """The versions of ``present`` this policy may serve, newest first (``latest`` stops at :meth:`wanted`)."""
        chosen = sorted(present, reverse=True)
        if self.kind == "specific":
            allowed = set(self.versions)
            return [v for v in chosen if v in allowed]
        return chosen

    def wanted(self) -> int | None:
        """How many ready versions end the walk over :meth:`candidates` (``None``: all of them)."""
        return self.num_versions if self.kind == "latest" else None

    def describe(self) -> str:
        """The policy in words, for logs and the model metadata."""
        if self.kind == "latest":
            return f"the {self.num_versions} newest ready version{'s' if self.num_versions > 1 else ''}"
        if self.kind == "specific":
            return f"versions {list(self.versions)}"
        return "every version"


ALL = VersionPolicy()
