"""Hypothesis strategies of CBOR-encodable values, shared by the decoder tests."""

from __future__ import annotations

from hypothesis import strategies as st


def cbor_values(
    *, int_bits: int, max_binary: int, max_text: int, keys: st.SearchStrategy[int]
) -> st.SearchStrategy[object]:
    """Nested values cbor2 can encode: null, booleans, integers of up to ``int_bits`` bits,
    byte and text strings, floats, and arrays and maps (of ``keys``) of them, 12 leaves at most."""
    leaves = (
        st.none()
        | st.booleans()
        | st.integers(-(2**int_bits), 2**int_bits)
        | st.binary(max_size=max_binary)
        | st.text(max_size=max_text)
        | st.floats(allow_nan=False)
    )
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
        max_leaves=12,
    )
