"""Deterministic CBOR in, strictly checked CBOR out (RFC 8949 §4.2.1).

``dumps`` always writes the core deterministic encoding. ``loads`` refuses trailing bytes, duplicate
map keys, indefinite lengths and oversized input, and turns every decoder failure into
``MalformedMessage``. ``Fields`` reads a decoded map with typed getters whose errors name the field,
so no ``dict[str, Any]`` travels further than the decoder.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Final, TypeVar

import cbor2

from protocol.errors import MalformedMessage

Key = int | str
_K = TypeVar("_K", int, str)

#: Default ceiling for any single decode; callers pass a tighter one per message type.
DEFAULT_MAX_BYTES: Final = 1 << 20
_MAX_DEPTH: Final = 16
_BYTES_TYPES: Final[tuple[type, ...]] = (bytes, bytearray, memoryview)


def dumps(obj: object) -> bytes:
    """Encode ``obj`` in deterministic CBOR (sorted map keys, shortest forms)."""
    encoded: bytes = cbor2.dumps(obj, canonical=True)
    return encoded


def dumps_ordered(obj: object) -> bytes:
    """Encode ``obj`` as given: ``dumps``'s bytes when every map in it has its keys in canonical
    order already (``canonical_order``) and it holds only ints, strs, bytes, bools, None, lists,
    tuples, maps and tags (no floats, no sets).

    cbor2's canonical mode pays ~1 us per map to sort its keys (an empty map included), several
    times what writing the map costs; the hot writers (signed results and receipts, messages,
    COSE structures) build their maps in order instead. The caller guarantees the order, and its
    tests hold what it writes equal to ``dumps``.
    """
    encoded: bytes = cbor2.dumps(obj)
    return encoded


def canonical_order(keys: Iterable[_K]) -> tuple[_K, ...]:
    """``keys`` in the order canonical CBOR puts map keys (RFC 7049 §3.9: the shorter encoding
    first, then bytewise), as ``dumps`` sorts them. A subset keeps the order of the whole."""
    return tuple(sorted(keys, key=lambda key: (len(encoded := dumps(key)), encoded)))


def head(major: int, length: int) -> bytes:
    """The shortest CBOR head of major type ``major`` with argument ``length`` (RFC 8949 §3).

    For writers that put large items in place without copying them through the encoder.
    """
    top = major << 5
    if length < 24:
        return bytes((top | length,))
    # The initial byte and the argument as one integer: one allocation, not three.
    if length < 0x100:
        return ((top | 24) << 8 | length).to_bytes(2, "big")
    if length < 0x1_0000:
        return ((top | 25) << 16 | length).to_bytes(3, "big")
    if length < 0x1_0000_0000:
        return ((top | 26) << 32 | length).to_bytes(5, "big")
    return ((top | 27) << 64 | length).to_bytes(9, "big")


def bstr_head(length: int) -> bytes:
    """The shortest CBOR head of a byte string of ``length`` bytes (RFC 8949 §3.1, §4.2.1)."""
    return head(2, length)


def map_parts(entries: Mapping[str, bytes]) -> list[bytes]:
    """A map of text keys to byte strings in deterministic CBOR, as pieces to join or stream.

    The values are pieces themselves (not copied); keys are ordered as ``dumps`` orders them
    (by encoded length, then bytewise: RFC 7049 canonical, as cbor2's ``canonical=True``).
    """
    keyed = sorted((dumps(key), value) for key, value in entries.items())
    keyed.sort(key=lambda item: len(item[0]))
    parts = [head(5, len(keyed))]
    for key, value in keyed:
        parts += (key, bstr_head(len(value)), value)
    return parts


def loads(data: bytes, *, what: str, max_bytes: int = DEFAULT_MAX_BYTES) -> object:
    """Decode exactly one CBOR item from ``data``.

    Raises:
        MalformedMessage: ``data`` is not bytes, larger than ``max_bytes``, not one well-formed
            CBOR item, has trailing bytes, duplicate keys or indefinite lengths.
    """
    if not isinstance(data, _BYTES_TYPES):
        raise MalformedMessage(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MalformedMessage(f"{what}: {len(data)} bytes exceeds the limit of {max_bytes}")
    # Decoded from a stream, not with cbor2.loads: loads ignores whatever follows the first item,
    # while a stream is left just after it (the decoder seeks back over what it read ahead), so
    # tell() is where the item ends. cbor2.load, not a CBORDecoder: the same decoder without a
    # Python object around it. read_size=len(data): the first read takes the whole buffer
    # (BytesIO hands back the bytes object itself, uncopied), so nothing is read twice.
    stream = io.BytesIO(data)
    try:
        obj: object = cbor2.load(
            stream,
            read_size=len(data),
            allow_indefinite=False,
            allow_duplicate_keys=False,
            max_depth=_MAX_DEPTH,
        )
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as err:
        raise MalformedMessage(f"{what}: not well-formed CBOR ({type(err).__name__})") from err
    if stream.tell() != len(data):
        raise MalformedMessage(f"{what}: {len(data) - stream.tell()} trailing bytes")
    return obj


def untag(obj: object, tag: int, *, what: str, required: bool = True) -> object:
    """Strip tag ``tag`` from ``obj``; a different tag, or a missing one when required, fails."""
    if isinstance(obj, cbor2.CBORTag):
        if obj.tag != tag:
            raise MalformedMessage(f"{what}: expected tag {tag}, got tag {obj.tag}")
        return obj.value
    if required:
        raise MalformedMessage(f"{what}: expected tag {tag}, got an untagged item")
    return obj


def tagged(tag: int, value: object) -> object:
    """Wrap ``value`` in CBOR tag ``tag`` for ``dumps``."""
    return cbor2.CBORTag(tag, value)


def expect_list(obj: object, *, what: str, length: int | None = None) -> list[object]:
    """Return ``obj`` as a list, checking its length when given."""
    if not isinstance(obj, list | tuple):
        raise MalformedMessage(f"{what}: expected an array, got {_kind(obj)}")
    obj = list(obj)
    if length is not None and len(obj) != length:
        raise MalformedMessage(f"{what}: expected {length} elements, got {len(obj)}")
    return obj


def expect_bytes(
    obj: object, *, what: str, size: int | None = None, max_size: int = 1 << 30
) -> bytes:
    """Return ``obj`` as bytes, checking an exact ``size`` or a ``max_size``."""
    if not isinstance(obj, bytes):
        raise MalformedMessage(f"{what}: expected a byte string, got {_kind(obj)}")
    if size is not None and len(obj) != size:
        raise MalformedMessage(f"{what}: expected {size} bytes, got {len(obj)}")
    if len(obj) > max_size:
        raise MalformedMessage(f"{what}: {len(obj)} bytes exceeds the limit of {max_size}")
    return obj


def expect_int(obj: object, *, what: str, lo: int | None = None, hi: int | None = None) -> int:
    """Return ``obj`` as an int (never a bool) within ``[lo, hi]``."""
    if not isinstance(obj, int) or isinstance(obj, bool):
        raise MalformedMessage(f"{what}: expected an integer, got {_kind(obj)}")
    if lo is not None and obj < lo:
        raise MalformedMessage(f"{what}: expected at least {lo}, got {obj}")
    if hi is not None and obj > hi:
        raise MalformedMessage(f"{what}: expected at most {hi}, got {obj}")
    return obj


def expect_str(obj: object, *, what: str, max_len: int = 1024) -> str:
    """Return ``obj`` as a text string of at most ``max_len`` characters."""
    if not isinstance(obj, str):
        raise MalformedMessage(f"{what}: expected a text string, got {_kind(obj)}")
    if len(obj) > max_len:
        raise MalformedMessage(f"{what}: {len(obj)} characters exceeds the limit of {max_len}")
    return obj


def expect_bool(obj: object, *, what: str) -> bool:
    """Return ``obj`` as a bool."""
    if not isinstance(obj, bool):
        raise MalformedMessage(f"{what}: expected a boolean, got {_kind(obj)}")
    return obj


class Fields:
    """Typed, named access to a decoded CBOR map; every getter raises ``MalformedMessage``."""

    __slots__ = ("_map", "what")

    def __init__(self, obj: object, *, what: str) -> None:
        if type(obj) is not dict and not isinstance(obj, Mapping):
            raise MalformedMessage(f"{what}: expected a map, got {_kind(obj)}")
        self._map: Mapping[object, object] = obj
        self.what = what

    def __contains__(self, key: Key) -> bool:
        return key in self._map

    def keys(self) -> frozenset[object]:
        """The map's keys."""
        return frozenset(self._map.keys())

    def only(self, allowed: frozenset[Key] | set[Key]) -> Fields:
        """Refuse keys outside ``allowed`` (for formats that forbid extensions)."""
        extra = [k for k in self._map if k not in allowed]
        if extra:
            raise MalformedMessage(f"{self.what}: unexpected field {extra[0]!r}")
        return self

    def raw(self, key: Key) -> object:
        """The value at ``key``, any type; missing fails."""
        if key not in self._map:
            raise MalformedMessage(f"{self.what}: missing field {key!r}")
        return self._map[key]

    def opt_raw(self, key: Key) -> object | None:
        """The value at ``key``, or None when absent."""
        return self._map.get(key)

    def name(self, key: Key) -> str:
        """The dotted name of field ``key`` for error messages."""
        return f"{self.what}.{key}"

    def get_bytes(self, key: Key, *, size: int | None = None, max_size: int = 1 << 30) -> bytes:
        """A byte string field."""
        return expect_bytes(self.raw(key), what=self.name(key), size=size, max_size=max_size)

    def opt_bytes(
        self, key: Key, *, size: int | None = None, max_size: int = 1 << 30
    ) -> bytes | None:
        """An optional byte string field."""
        if key not in self._map:
            return None
        return self.get_bytes(key, size=size, max_size=max_size)

    def get_int(self, key: Key, *, lo: int | None = None, hi: int | None = None) -> int:
        """An integer field within ``[lo, hi]``."""
        return expect_int(self.raw(key), what=self.name(key), lo=lo, hi=hi)

    def opt_int(self, key: Key, *, lo: int | None = None, hi: int | None = None) -> int | None:
        """An optional integer field."""
        if key not in self._map:
            return None
        return self.get_int(key, lo=lo, hi=hi)

    def get_str(self, key: Key, *, max_len: int = 1024) -> str:
        """A text string field."""
        return expect_str(self.raw(key), what=self.name(key), max_len=max_len)

    def opt_str(self, key: Key, *, max_len: int = 1024) -> str | None:
        """An optional text string field."""
        if key not in self._map:
            return None
        return self.get_str(key, max_len=max_len)

    def get_bool(self, key: Key) -> bool:
        """A boolean field."""
        return expect_bool(self.raw(key), what=self.name(key))

    def get_list(self, key: Key, *, max_len: int = 1024) -> list[object]:
        """An array field of at most ``max_len`` elements."""
        items = expect_list(self.raw(key), what=self.name(key))
        if len(items) > max_len:
            raise MalformedMessage(f"{self.name(key)}: {len(items)} elements exceeds {max_len}")
        return items

    def get_map(self, key: Key) -> Fields:
        """A nested map field."""
        return Fields(self.raw(key), what=self.name(key))


def _kind(obj: object) -> str:
    return "a tag" if isinstance(obj, cbor2.CBORTag) else type(obj).__name__
