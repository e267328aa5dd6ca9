"""Tensor data in a JSON request without one Python float per element.

``orjson.loads`` builds a Python ``float`` for every number of an input's ``data`` and ``np.asarray``
then walks them again: about 190 us for the 3072 numbers of one 3x32x32 image, as long as the
model's own run (measured in ``benchmarks/results/serving_profile.md``). :func:`loads` instead lifts
each flat ``"data": [...]`` array out of the body: simdjson reads its numbers straight into one
float64 buffer, and orjson parses what is left (names, shapes, parameters: a few hundred bytes).

How an array is lifted, and why the result equals ``orjson.loads(body)``:

1. ``"data"`` followed by ``:`` and ``[`` is found in the raw bytes. Its closing quote follows a letter,
   so it ends a string, and the ``[`` after it is outside any string: the start of an array value.
2. The array's text is taken up to the first ``]``, and kept only when no ``[`` or ``{`` lies between
   (nothing nested) and simdjson parses it as a JSON array. A ``]`` inside a string would cut the text
   short, and the cut text is not valid JSON; so a kept text is the whole array.
3. The text is replaced by a placeholder string holding a per-process random token, and orjson
   parses the rest. A placeholder may only be found as the ``data`` of an entry of ``inputs``, each
   once (a key ending in ``\\"data`` also matches step 1): otherwise :func:`loads` gives up.
   A request cannot forge a placeholder without the token, which never leaves the process.

Replacing one JSON value by another keeps the document's structure, so the result is the parse of
the whole body with each ``data`` as a :class:`Numbers`. Anything else (nothing to lift, a nested array,
a number simdjson refuses, e.g. an integer past 64 bits) makes :func:`loads` return ``None``, and the
caller parses the body with orjson as before: it also gives the error of a malformed body.

Below :data:`LIFT_BYTES` the lifting costs more than it saves (measured): such bodies are not lifted.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import numpy as np
import orjson
import simdjson

LIFT_BYTES = 4096  # a JSON body shorter than this is parsed by orjson alone (lifting costs more there)
ARRAY_BYTES = 1024  # a shorter data array is left to orjson (about 50 numbers: lifting it would cost more)
CANDIDATES = 64  # "data" keys looked at, at most: a model has a few inputs (past that, orjson parses it all)
_KEY = re.compile(rb'"data"[ \t\n\r]*:[ \t\n\r]*\[')
_TOKEN = "bnfold-lifted-" + secrets.token_hex(16) + ":"
_PLACEHOLDER = b'"' + _TOKEN.encode() + b'%d"'


class Numbers:
    """One lifted ``data`` array: its JSON text, and its numbers as float64 when it holds only numbers."""

    __slots__ = ("floats", "text")

    def __init__(self, text: bytes, floats: np.ndarray | None) -> None:
        self.text = text
        self.floats = floats  # 1-D float64: each JSON number's double value (``None``: not only numbers)

    def value(self) -> Any:
        """The array as ``orjson.loads`` gives it (a list), for an input whose datatype is not a float."""
        return orjson.loads(self.text)


def _numbers(text: bytes) -> Numbers | None:
    """``text`` (one JSON array, ``[`` to ``]``) as :class:`Numbers`; ``None`` when simdjson refuses it.

    A fresh parser each time: it holds a buffer the size of its largest document, and is not thread-safe.
    """
    parser = simdjson.Parser()
    try:
        document = parser.parse(text)
    except (ValueError, RuntimeError):  # not JSON (a cut text), or a number simdjson does not read
        return None
    try:
        if not isinstance(document, simdjson.Array):  # (text is an array when it parses)
            return None
        floats: np.ndarray | None = np.frombuffer(document.as_buffer(of_type="d"), np.float64)
    except TypeError:  # strings, booleans, null or objects: orjson's list decides what they mean
        floats = None
    except (ValueError, RuntimeError):  # an integer past 64 bits (simdjson reads numbers lazily)
        return None
    finally:
        del document  # the parser is free again even if a traceback keeps this frame
    return Numbers(text, floats)


def loads(body: bytes) -> Any | None:
    """``orjson.loads(body)`` with the ``data`` of each entry of ``inputs`` as a :class:`Numbers` when it is a
    flat array of at least :data:`ARRAY_BYTES`, or ``None`` when no array is lifted or that cannot be done
    safely (then parse ``body`` with orjson).

    Linear in the body: each ``"data"`` looked at (at most :data:`CANDIDATES`) is either lifted or skipped up
    to its first ``]``, and an array holding ``[`` or ``{`` before it (nested: its depth counts in orjson's
    limit) ends the attempt.
    """
    parts: list[bytes] = []
    lifted: list[Numbers] = []
    done = 0  # body[:done] is in parts already
    search = 0
    for _ in range(CANDIDATES):
        match = _KEY.search(body, search)
        if match is None:
            break
        start = match.end() - 1
        end = body.find(b"]", start)
        if end < 0:
            return None
        search = end + 1
        if end - start < ARRAY_BYTES:  # short: orjson's list costs less (a nested one's first row may be short)
            continue
        if body.find(b"[", start + 1, end) >= 0 or body.find(b"{", start + 1, end) >= 0:
            return None
        numbers = _numbers(body[start:search])
        if numbers is None:
            return None
        parts.append(body[done:start])
        parts.append(_PLACEHOLDER % len(lifted))
        lifted.append(numbers)
        done = search
    else:
        return None  # more "data" than any model has inputs
    if not lifted:
        return None
    parts.append(body[done:])
    try:
        header = orjson.loads(b"".join(parts))
    except orjson.JSONDecodeError:
        return None  # orjson on the body itself gives the error
    return header if _restore(header, lifted) else None


def _restore(header: Any, lifted: list[Numbers]) -> bool:
    """Put each :class:`Numbers` where its placeholder is; whether every one was an input's ``data``, once."""
    inputs = header.get("inputs") if isinstance(header, dict) else None
    if not isinstance(inputs, list):
        return False
    placed: set[int] = set()
    for entry in inputs:
        data = entry.get("data") if isinstance(entry, dict) else None
        if type(data) is str and data.startswith(_TOKEN):
            index = data[len(_TOKEN):]
            if not (index.isascii() and index.isdigit()) or int(index) >= len(lifted) or int(index) in placed:
                return False
            placed.add(int(index))
            entry["data"] = lifted[int(index)]
    return len(placed) == len(lifted)
