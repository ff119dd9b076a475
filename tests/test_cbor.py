"""The strict CBOR layer and the identifiers: what they accept and what they refuse."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import cbor, ids
from protocol.errors import MalformedMessage
from tests.cbor_strategies import cbor_values


def test_dumps_is_deterministic() -> None:
    """Map keys are sorted and integers take their shortest form (RFC 8949 §4.2.1)."""
    assert cbor.dumps({10: 1, 1: 2}) == bytes.fromhex("a201020a01")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01\x02", "1 trailing bytes"),
        (bytes.fromhex("a2010101 02".replace(" ", "")), "not well-formed"),  # duplicate key 1
        (b"\x9f\x01\xff", "not well-formed"),  # indefinite-length array
        (b"\x5a\xff\xff\xff\xff", "not well-formed"),  # truncated byte string
        (b"", "not well-formed"),
    ],
)
def test_loads_refuses_non_strict_input(data: bytes, message: str) -> None:
    """Trailing bytes, duplicate keys, indefinite lengths and truncation are MalformedMessage."""
    with pytest.raises(MalformedMessage, match=message):
        cbor.loads(data, what="x")


_cbor_item = cbor_values(int_bits=70, max_binary=300, max_text=40, keys=st.integers(-3, 30))


@settings(max_examples=300, deadline=None)
@given(item=_cbor_item, trailing=st.binary(min_size=1, max_size=40))
def test_loads_refuses_any_trailing_bytes(item: object, trailing: bytes) -> None:
    """After one whole item, any further bytes (another item, a break, junk) are refused."""
    data = cbor.dumps(item)
    assert cbor.dumps(cbor.loads(data, what="x")) == data
    with pytest.raises(MalformedMessage, match=f"x: {len(trailing)} trailing bytes"):
        cbor.loads(data + trailing, what="x")
    with pytest.raises(MalformedMessage, match="trailing bytes"):
        cbor.loads(data + data, what="x")


@pytest.mark.parametrize("size", [4095, 4096, 4097, 70_000])
def test_loads_refuses_trailing_bytes_after_a_large_item(size: int) -> None:
    """Trailing bytes are found whatever the item's size, one byte or more past it."""
    data = cbor.dumps([bytes(size), "end"])
    assert cbor.loads(data, what="x") == [bytes(size), "end"]
    for trailing in (b"\x00", b"\xff", bytes(5000)):
        with pytest.raises(MalformedMessage, match=f"{len(trailing)} trailing bytes"):
            cbor.loads(data + trailing, what="x")


def test_loads_takes_any_bytes_like_object() -> None:
    """bytes, bytearray and memoryview decode alike, trailing bytes refused alike."""
    data = cbor.dumps({1: [b"ab", "c"]})
    for wrap in (bytes, bytearray, memoryview):
        # Typed as bytes; a transport may still hand over a bytearray or a memoryview.
        assert cbor.loads(wrap(data), what="x") == {1: [b"ab", "c"]}  # type: ignore[arg-type]
        with pytest.raises(MalformedMessage, match="1 trailing bytes"):
            cbor.loads(wrap(data + b"\x00"), what="x")  # type: ignore[arg-type]


def test_loads_refuses_oversize_and_non_bytes() -> None:
    """Input over the limit, or not bytes at all, is refused before decoding."""
    with pytest.raises(MalformedMessage, match="exceeds the limit"):
        cbor.loads(b"\x00" * 10, what="x", max_bytes=4)
    with pytest.raises(MalformedMessage, match="expected bytes"):
        cbor.loads("text", what="x")  # type: ignore[arg-type]


def test_loads_refuses_deep_nesting() -> None:
    """Nesting deeper than the decoder's limit is malformed, not a RecursionError."""
    with pytest.raises(MalformedMessage):
        cbor.loads(b"\x81" * 64 + b"\x00", what="x")


def test_untag_and_expect_helpers() -> None:
    """Tags are checked, and every typed getter names the field it refused."""
    assert cbor.untag(cbor.loads(b"\xd2\x80", what="t"), 18, what="t") == ()
    with pytest.raises(MalformedMessage, match="expected tag 17, got tag 18"):
        cbor.untag(cbor.loads(b"\xd2\x80", what="t"), 17, what="t")
    with pytest.raises(MalformedMessage, match="got an untagged item"):
        cbor.untag([], 18, what="t")
    assert cbor.untag([], 18, what="t", required=False) == []
    fields = cbor.Fields({1: b"ab", 2: 5, 3: "s", 4: True, 5: [1], 6: {7: 8}}, what="m")
    assert fields.get_bytes(1, size=2) == b"ab"
    assert fields.get_int(2, lo=0, hi=9) == 5
    assert fields.get_str(3) == "s"
    assert fields.get_bool(4) is True
    assert fields.get_list(5) == [1]
    assert fields.get_map(6).get_int(7) == 8
    assert fields.opt_bytes(9) is None and fields.opt_int(9) is None and fields.opt_str(9) is None
    assert fields.opt_raw(9) is None and 1 in fields and fields.keys() == frozenset(range(1, 7))
    with pytest.raises(MalformedMessage, match=r"m\.4: expected an integer, got bool"):
        fields.get_int(4)
    with pytest.raises(MalformedMessage, match=r"m\.2: expected at most 4, got 5"):
        fields.get_int(2, hi=4)
    with pytest.raises(MalformedMessage, match=r"m\.2: expected at least 6, got 5"):
        fields.get_int(2, lo=6)
    with pytest.raises(MalformedMessage, match=r"m\.1: expected 3 bytes, got 2"):
        fields.get_bytes(1, size=3)
    with pytest.raises(MalformedMessage, match="missing field 9"):
        fields.raw(9)
    with pytest.raises(MalformedMessage, match="unexpected field"):
        fields.only({1})
    with pytest.raises(MalformedMessage, match="elements exceeds"):
        fields.get_list(5, max_len=0)
    with pytest.raises(MalformedMessage, match="characters exceeds"):
        fields.get_str(3, max_len=0)
    with pytest.raises(MalformedMessage, match="expected a map"):
        cbor.Fields([], what="m")
    with pytest.raises(MalformedMessage, match="expected a boolean"):
        cbor.expect_bool(1, what="b")
    with pytest.raises(MalformedMessage, match="bytes exceeds the limit"):
        cbor.expect_bytes(b"abc", what="b", max_size=2)
    with pytest.raises(MalformedMessage, match="expected a text string"):
        cbor.expect_str(b"x", what="s")
    with pytest.raises(MalformedMessage, match="expected 2 elements"):
        cbor.expect_list([1], what="l", length=2)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_loads_raises_only_malformed_message(data: bytes) -> None:
    """Any bytes decode or raise MalformedMessage, nothing else."""
    with contextlib.suppress(MalformedMessage):
        cbor.loads(data, what="fuzz")


@pytest.mark.parametrize("bad", ["", "-lead", "a/b", "a+b", "x" * 65, "dev#1"])
def test_device_ids_and_products_are_topic_safe(bad: str) -> None:
    """Ids that could break an MQTT topic or a path are refused; good ones pass."""
    with pytest.raises(MalformedMessage):
        ids.device_id(bad)
    with pytest.raises(MalformedMessage):
        ids.product(bad)
    assert ids.device_id("dev-0001.a_b") == "dev-0001.a_b"


def test_session_class_and_release_ids() -> None:
    """Session ids are 16 bytes; class ids derive from the product; release ids from digests."""
    assert ids.session_id(bytes(16)) == bytes(16)
    with pytest.raises(MalformedMessage):
        ids.session_id(bytes(15))
    assert len(ids.class_id(ids.product("thermostat"))) == 16
    assert ids.class_id(ids.product("a")) != ids.class_id(ids.product("b"))
    assert ids.release_id(bytes(32)) == "00" * 32
    with pytest.raises(ValueError, match="32 bytes"):
        ids.release_id(bytes(31))


@given(
    st.dictionaries(st.text(max_size=30), st.binary(max_size=300), max_size=30),
    st.sampled_from([0, 23, 24, 255, 256, 65535, 65536]),
)
@settings(max_examples=200)
def test_heads_and_map_parts_are_the_encoders_bytes(entries: dict[str, bytes], size: int) -> None:
    """Hand-written heads and map pieces are byte-identical to deterministic encoding."""
    assert b"".join(cbor.map_parts(entries)) == cbor.dumps(entries)
    assert cbor.bstr_head(size) + bytes(size) == cbor.dumps(bytes(size))
    for n in (size, 2**32 - 1, 2**32, 2**64 - 1):
        assert cbor.head(0, n) == cbor.dumps(n)
        assert cbor.head(1, n) == cbor.dumps(-1 - n)
    assert cbor.head(3, size) + b"a" * size == cbor.dumps("a" * size)
    assert cbor.head(4, size % 300) + b"\x00" * (size % 300) == cbor.dumps([0] * (size % 300))


def test_canonical_order_is_the_order_dumps_writes() -> None:
    """Keys put in ``canonical_order`` and written as given are what ``dumps`` writes."""
    keys = [-80003, 1004, 2, -1, 265, 24, 0, -25, 23, 1 << 33, -(1 << 33), 255, 256]
    ordered = cbor.canonical_order(keys)
    mapping = dict.fromkeys(keys, b"x")
    assert cbor.dumps_ordered({key: mapping[key] for key in ordered}) == cbor.dumps(mapping)
    texts = ["bb", "a", "ba", "", "z" * 30, "é"]
    assert cbor.canonical_order(texts) == ("", "a", "ba", "bb", "é", "z" * 30)
