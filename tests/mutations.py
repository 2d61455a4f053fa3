"""Damage for the fuzz tests of readers: a JSON value replaced or removed anywhere in a document, a file
cut short or bit-flipped, and the check every case ends with (a valid result or the toolkit's error, one
line, naming the file)."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Callable

from hypothesis import event
from hypothesis import strategies as st

from attrib.errors import VisEditError

DELETE = "<deleted>"  # stands for "remove this key / item" in a mutation

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5)


def json_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every position in a JSON document (the root too), as key / index tuples."""
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += json_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += json_paths(value, (*prefix, index))
    return found


def mutated(document: Any, path: tuple, value: Any) -> Any:
    """A copy of ``document`` with the value at ``path`` replaced by ``value`` (removed for `DELETE`)."""
    if not path:
        return None if value == DELETE else value
    out = copy.deepcopy(document)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    if value == DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return out


@st.composite
def json_mutations(draw, document: Any) -> Any:
    """``document`` with one value, anywhere, replaced by a random JSON value or removed."""
    paths = json_paths(document)
    path = paths[draw(st.integers(0, len(paths) - 1))]
    return mutated(document, path, draw(st.just(DELETE) | json_values))


@st.composite
def damaged_bytes(draw, data: bytes) -> bytes:
    """``data`` cut short, or with one to four bits flipped."""
    if draw(st.booleans()):
        return data[:draw(st.integers(0, len(data) - 1))]
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(out) - 1))
        out[position] ^= 1 << draw(st.integers(0, 7))
    return bytes(out)


def valid_or_clean_error(call: Callable[[], Any], *names: str | Path) -> tuple[Any, VisEditError | None]:
    """(``call()``, None), or (None, the error) when it raises the toolkit's error with a one-line message
    naming one of ``names``; any other exception propagates and fails the test. Call it inside a
    `hypothesis` test: the outcome is recorded as an event (``--hypothesis-show-statistics``)."""
    try:
        result = call()
    except VisEditError as error:
        message = str(error)
        assert "\n" not in message, message
        assert any(str(name) in message for name in names), message
        event(f"{type(error).__name__}: {_gist(message, names)}")
        return None, error
    event("valid")
    return result, None


def _gist(message: str, names: tuple) -> str:
    """The message without file names and numbers, so that `hypothesis` statistics group alike failures."""
    for name in names:
        message = message.replace(str(name), "<file>")
    return re.sub(r"\d+", "N", message)[:70]
