"""The sealed image and the app bundle (protocol/image.py, docs/image-format.md)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import cbor, cose, image, keys
from protocol.errors import InvalidImage, MalformedMessage
from protocol.ids import Product, class_id, release_id
from protocol.image import (
    AppBundle,
    ImageClassMismatch,
    ImageRolledBack,
    Manifest,
    SealedImage,
    manifest_digest,
    open_image,
    parse_unverified_header,
    parse_unverified_image,
    seal_image,
    verify_manifest,
)

VENDOR = keys.derive_p256(b"test vendor secret", b"vendor")
OTHER = keys.derive_p256(b"test other secret", b"other")
VENDOR_ID = keys.signer_id(VENDOR.public_key())
OTHER_ID = keys.signer_id(OTHER.public_key())
TRUSTED = {VENDOR_ID: VENDOR.public_key()}
CEK = bytes(range(32))
IV = bytes(range(100, 112))
KEY_ID = b"k" * 16
CLASS = class_id(Product("thermostat"))
APP = AppBundle(sources=(("main.py", b"print('hello')\n"), ("lib/util.py", b"X = 1\n")))
PLAINTEXT = APP.encode()
SETTINGS = settings(max_examples=150, deadline=None)


def seal(plaintext: bytes | list[bytes] = PLAINTEXT, **overrides: Any) -> bytes:
    """A sealed image with test defaults, any argument overridable."""
    args: dict[str, Any] = {
        "cek": CEK,
        "iv": IV,
        "key_id": KEY_ID,
        "vendor_key": VENDOR,
        "class_id": CLASS,
        "version": "1.2.0",
        "security_counter": 3,
        "min_runtime_version": "1.0",
        "created_s": 1_800_000_000,
        "entry_point": "main.py",
    }
    args.update(overrides)
    return seal_image(plaintext, **args)


SEALED = seal()


def resign(sealed: SealedImage, key: ec.EllipticCurvePrivateKey = VENDOR, **changes: Any) -> bytes:
    """The same ciphertext under a manifest with ``changes``, validly signed by ``key``."""
    manifest = dataclasses.replace(sealed.manifest, **changes)
    manifest_bytes = cose.sign1_create(manifest.encode(), key, kid=manifest.vendor_id)
    return SealedImage(manifest_bytes, manifest, sealed.ciphertext).encode()


def flip(data: bytes, index: int, bit: int = 0) -> bytes:
    """``data`` with one bit flipped."""
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


def open_default(data: bytes, cek: bytes = CEK, **kwargs: Any) -> bytes:
    """Parse and open ``data`` with the test trust anchors."""
    args: dict[str, Any] = {"trusted_vendors": TRUSTED, "min_security_counter": 0}
    args.update(kwargs)
    return open_image(parse_unverified_image(data), cek, **args)


# --- app bundle ----------------------------------------------------------------------------------

_FIRST = "abcxyzABZ019_"
_segment = st.tuples(st.sampled_from(_FIRST), st.text(_FIRST + ".-", max_size=9)).map("".join)
_path = st.lists(_segment, min_size=1, max_size=4).map("/".join).filter(lambda p: len(p) <= 128)
_files = st.dictionaries(_path, st.binary(max_size=64), max_size=8)


@SETTINGS
@given(sources=_files, compiled=_files, entry=_path)
def test_app_bundle_round_trips(
    sources: dict[str, bytes], compiled: dict[str, bytes], entry: str
) -> None:
    """Any valid app bundle encodes and decodes to itself."""
    sources[entry] = b"main()"
    bundle = AppBundle(
        sources=tuple(sources.items()), compiled=tuple(compiled.items()), entry_point=entry
    )
    assert AppBundle.decode(bundle.encode()) == bundle
    assert [p for p, _ in bundle.sources] == sorted(sources)


def test_app_bundle_sorts_files_and_encodes_deterministically() -> None:
    """File order does not change the bundle or its bytes."""
    a = AppBundle(sources=(("main.py", b"1"), ("a.py", b"2")))
    b = AppBundle(sources=(("a.py", b"2"), ("main.py", b"1")))
    assert a == b
    assert a.encode() == b.encode()
    assert a.sources[0][0] == "a.py"


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/main.py",
        "../x.py",
        "a/../b.py",
        "a//b.py",
        "a/",
        ".hidden",
        "./a.py",
        "a\\b",
        "x" * 129,
    ],
)
def test_app_bundle_refuses_bad_paths(path: str) -> None:
    """Absolute, parent, empty, hidden or overlong paths are refused."""
    with pytest.raises(MalformedMessage):
        AppBundle(sources=(("main.py", b""), (path, b"")))


def test_app_bundle_refuses_duplicates_missing_entry_and_bad_version() -> None:
    """Duplicate paths, an entry point outside the sources and other versions are refused."""
    with pytest.raises(MalformedMessage, match="duplicate"):
        AppBundle(sources=(("main.py", b"a"), ("main.py", b"b")))
    with pytest.raises(MalformedMessage, match="entry_point"):
        AppBundle(sources=(("app.py", b""),), compiled=(("main.py", b""),))
    with pytest.raises(MalformedMessage, match="format_version"):
        AppBundle(sources=(("main.py", b""),), format_version=2)


def test_app_bundle_refuses_too_many_files_and_too_many_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """More than 256 files, an oversized file or an oversized bundle is refused."""
    many = tuple((f"m{i}.py", b"") for i in range(image.MAX_FILES + 1))
    with pytest.raises(MalformedMessage, match="files"):
        AppBundle(sources=(("main.py", b""), *many))
    half = tuple((f"m{i}.py", b"") for i in range(image.MAX_FILES // 2 + 1))
    with pytest.raises(MalformedMessage, match="files"):
        AppBundle(sources=(("main.py", b""), *half), compiled=half)
    monkeypatch.setattr(image, "MAX_FILE_BYTES", 8)
    with pytest.raises(MalformedMessage, match="bytes"):
        AppBundle(sources=(("main.py", b"x" * 9),))
    monkeypatch.setattr(image, "MAX_APP_BUNDLE_BYTES", 10)
    with pytest.raises(MalformedMessage, match="exceeds"):
        AppBundle(sources=(("main.py", b"x" * 8), ("b.py", b"x" * 8)))


@pytest.mark.parametrize(
    "obj",
    [
        {1: 1, 2: {"main.py": b""}, 3: {}, 4: "main.py", 5: 0},
        {1: 1, 2: {7: b""}, 3: {}, 4: "main.py"},
        {1: 1, 2: {"main.py": "text"}, 3: {}, 4: "main.py"},
        {1: 2, 2: {"main.py": b""}, 3: {}, 4: "main.py"},
        {1: 1, 2: [], 3: {}, 4: "main.py"},
        [1, 2],
    ],
)
def test_app_bundle_decode_refuses_malformed_maps(obj: object) -> None:
    """Unknown keys, non-text paths, non-bytes files, other versions and non-maps are refused."""
    with pytest.raises(MalformedMessage):
        AppBundle.decode(cbor.dumps(obj))


def test_app_bundle_decode_refuses_too_many_files() -> None:
    """A decoded map with more than 256 files is refused before looking at them."""
    files = {f"m{i}.py": b"" for i in range(image.MAX_FILES + 1)}
    with pytest.raises(MalformedMessage, match="files"):
        AppBundle.decode(cbor.dumps({1: 1, 2: files, 3: {}, 4: "m1.py"}))


# --- sealing and opening -------------------------------------------------------------------------


def test_seal_and_open_round_trip() -> None:
    """A sealed image opens to its plaintext and its manifest says what was sealed."""
    sealed = parse_unverified_image(SEALED)
    assert open_image(sealed, CEK, trusted_vendors=TRUSTED, min_security_counter=3) == PLAINTEXT
    manifest = verify_manifest(sealed, TRUSTED)
    assert manifest == sealed.manifest
    assert manifest.vendor_id == VENDOR_ID
    assert manifest.class_id == CLASS
    assert manifest.version == "1.2.0"
    assert manifest.security_counter == 3
    assert manifest.payload_size == len(PLAINTEXT)
    assert manifest.plaintext_sha256 == hashlib.sha256(PLAINTEXT).digest()
    assert manifest.ciphertext_sha256 == hashlib.sha256(sealed.ciphertext).digest()
    assert manifest.iv == IV
    assert manifest.key_id == KEY_ID
    assert manifest.enc_alg == 3
    assert manifest.component == "APP"
    assert AppBundle.decode(open_default(SEALED)) == APP
    assert sealed.encode() == SEALED


@SETTINGS
@given(plaintext=st.binary(max_size=300), counter=st.integers(0, 2**32 - 1))
def test_seal_open_round_trips_any_payload(plaintext: bytes, counter: int) -> None:
    """Any payload and counter seal and open back; the ciphertext is the payload size + 16."""
    data = seal(plaintext, security_counter=counter)
    sealed = parse_unverified_image(data)
    assert len(sealed.ciphertext) == len(plaintext) + 16
    # The in-place seal writes what the plain AEAD call gives, and the image re-encodes to itself.
    aad = image.associated_data(sealed.manifest)
    assert sealed.ciphertext == AESGCM(CEK).encrypt(sealed.manifest.iv, plaintext, aad)
    assert type(data) is bytes and sealed.encode() == data
    assert open_image(sealed, CEK, trusted_vendors=TRUSTED, min_security_counter=counter) == (
        plaintext
    )


def test_header_has_documented_fixed_offsets() -> None:
    """Offsets 0-11 are fixed (docs/image-format.md §2) and the ciphertext ends the image."""
    assert SEALED[:9] == bytes.fromhex("d9d9f7831a45534901")
    assert SEALED[9] == 0x59
    manifest_len = int.from_bytes(SEALED[10:12], "big")
    assert SEALED[12] == 0xD2  # tag 18, COSE_Sign1
    header = parse_unverified_header(SEALED)
    assert header.manifest_bytes == SEALED[12 : 12 + manifest_len]
    assert header.ciphertext_offset + header.ciphertext_size == len(SEALED)
    assert SEALED[12 + manifest_len] == 0x58  # a 16..255-byte ciphertext has a 2-byte head


def test_big_payload_uses_a_five_byte_ciphertext_head() -> None:
    """A payload of 64 KiB or more gets the 0x5a head with a 4-byte big-endian length."""
    data = seal(bytes(70_000))
    header = parse_unverified_header(data[: image.MAX_HEADER_BYTES])
    head_at = header.ciphertext_offset - 5
    assert data[head_at] == 0x5A
    assert int.from_bytes(data[head_at + 1 : head_at + 5], "big") == 70_016
    assert header.ciphertext_size == 70_016


def test_header_parses_from_a_prefix() -> None:
    """The first MAX_HEADER_BYTES of an image give the same manifest as the whole image."""
    data = seal(bytes(5000))
    header = parse_unverified_header(data[: image.MAX_HEADER_BYTES])
    whole = parse_unverified_image(data)
    assert header.manifest_bytes == whole.manifest_bytes
    assert header.manifest == whole.manifest
    assert data[header.ciphertext_offset :] == whole.ciphertext


def test_manifest_digest_is_the_sha256_of_the_signed_manifest() -> None:
    """The measurement is SHA-256 of the COSE_Sign1 bytes, and the release id is its hex."""
    sealed = parse_unverified_image(SEALED)
    digest = manifest_digest(sealed)
    assert digest == hashlib.sha256(sealed.manifest_bytes).digest()
    assert release_id(digest) == digest.hex()
    assert digest != hashlib.sha256(PLAINTEXT).digest()


def test_seal_with_a_signer_callable_needs_its_public_key() -> None:
    """An Es256Signer (a KMS key) seals when given its public key, and fails without it."""
    signer = cose.es256_signer(VENDOR)
    data = seal(vendor_key=signer, vendor_public=VENDOR.public_key())
    assert open_default(data) == PLAINTEXT
    with pytest.raises(TypeError):
        seal(vendor_key=signer)


@pytest.mark.parametrize(
    "overrides",
    [
        {"iv": bytes(11)},
        {"key_id": bytes(15)},
        {"class_id": bytes(17)},
        {"version": ""},
        {"version": "1.2 beta"},
        {"min_runtime_version": "v" * 33},
        {"security_counter": -1},
        {"security_counter": 2**32},
        {"created_s": -5},
        {"entry_point": "/main.py"},
    ],
)
def test_seal_refuses_bad_fields(overrides: dict[str, Any]) -> None:
    """Field values out of range are refused as ValueError before sealing."""
    with pytest.raises(ValueError, match="manifest"):
        seal(**overrides)


def test_seal_and_open_refuse_a_short_cek() -> None:
    """A CEK that is not 32 bytes is a caller's error (ValueError), not an image error."""
    with pytest.raises(ValueError, match="CEK"):
        seal(cek=bytes(16))
    with pytest.raises(ValueError, match="CEK"):
        open_default(SEALED, cek=bytes(16))


# --- negatives on the verify paths ---------------------------------------------------------------


def test_flipped_bit_in_ciphertext_is_refused() -> None:
    """A changed ciphertext byte fails the manifest's ciphertext digest."""
    for index in (len(SEALED) - 1, len(SEALED) - 20, len(SEALED) - len(PLAINTEXT)):
        with pytest.raises(InvalidImage):
            verify_manifest(parse_unverified_image(flip(SEALED, index)), TRUSTED)


def test_flipped_bit_anywhere_in_the_manifest_is_refused() -> None:
    """Every bit flip in the manifest region fails parsing or verification, never opens."""
    header = parse_unverified_header(SEALED)
    end = header.ciphertext_offset
    for index in range(end):
        for bit in (0, 5):
            mutated = flip(SEALED, index, bit)
            with pytest.raises((MalformedMessage, InvalidImage)):
                open_default(mutated)


def test_flipped_bit_in_signature_is_refused() -> None:
    """A changed signature byte is InvalidImage."""
    header = parse_unverified_header(SEALED)
    last_sig_byte = header.ciphertext_offset - 1 - 2  # before the 2-byte ciphertext head
    with pytest.raises(InvalidImage):
        verify_manifest(parse_unverified_image(flip(SEALED, last_sig_byte)), TRUSTED)


def test_unknown_signer_and_wrong_vendor_key_are_refused() -> None:
    """A manifest whose signer is not trusted, or trusted under another key, is refused."""
    sealed = parse_unverified_image(SEALED)
    with pytest.raises(InvalidImage, match="not trusted"):
        verify_manifest(sealed, {OTHER_ID: OTHER.public_key()})
    with pytest.raises(InvalidImage, match="signature"):
        verify_manifest(sealed, {VENDOR_ID: OTHER.public_key()})
    other = parse_unverified_image(seal(vendor_key=OTHER))
    with pytest.raises(InvalidImage, match="not trusted"):
        open_image(other, CEK, trusted_vendors=TRUSTED, min_security_counter=0)


def test_truncated_and_trailing_bytes_are_malformed() -> None:
    """An image cut short or followed by more bytes does not parse."""
    for cut in (0, 5, 9, 11, 100, len(SEALED) - 1):
        with pytest.raises(MalformedMessage):
            parse_unverified_image(SEALED[:cut])
    with pytest.raises(MalformedMessage, match="expected"):
        parse_unverified_image(SEALED + b"\x00")


def test_wrong_cek_is_refused() -> None:
    """Another key does not decrypt: InvalidImage, no plaintext."""
    with pytest.raises(InvalidImage, match="decrypt"):
        open_default(SEALED, cek=bytes(32))


@pytest.mark.parametrize(
    "changes",
    [
        {"security_counter": 4},
        {"version": "1.2.1"},
        {"class_id": class_id(Product("toaster"))},
        {"key_id": b"j" * 16},
        {"iv": bytes(12)},
    ],
)
def test_validly_signed_manifest_with_another_aad_field_does_not_decrypt(
    changes: dict[str, Any],
) -> None:
    """Each AAD field binds the ciphertext: a re-signed manifest changing one fails decryption."""
    sealed = parse_unverified_image(SEALED)
    data = resign(sealed, **changes)
    verify_manifest(parse_unverified_image(data), TRUSTED)  # the signature itself is valid
    with pytest.raises(InvalidImage, match="decrypt"):
        open_default(data)


def test_plaintext_digest_mismatch_is_refused() -> None:
    """A manifest claiming another plaintext digest is refused after decryption."""
    data = resign(parse_unverified_image(SEALED), plaintext_sha256=bytes(32))
    with pytest.raises(InvalidImage, match="plaintext"):
        open_default(data)


def test_rollback_is_refused_before_decryption() -> None:
    """A counter below the minimum raises ImageRolledBack even with a wrong CEK (no decryption)."""
    with pytest.raises(ImageRolledBack):
        open_default(SEALED, cek=bytes(32), min_security_counter=4)
    assert open_default(SEALED, min_security_counter=3) == PLAINTEXT


def test_class_id_mismatch_is_refused_before_decryption() -> None:
    """An image for another product is refused, before decryption, and opens for its own."""
    with pytest.raises(ImageClassMismatch):
        open_default(SEALED, cek=bytes(32), class_id=class_id(Product("toaster")))
    assert open_default(SEALED, class_id=CLASS) == PLAINTEXT


def test_ciphertext_size_mismatch_is_refused() -> None:
    """A hand-built image whose ciphertext is shorter than the manifest says is refused."""
    sealed = parse_unverified_image(SEALED)
    cut = dataclasses.replace(sealed, ciphertext=sealed.ciphertext[:-1])
    with pytest.raises(InvalidImage, match="ciphertext"):
        verify_manifest(cut, TRUSTED)


def test_hand_built_image_with_garbage_manifest_is_refused() -> None:
    """verify_manifest re-reads the signed bytes: garbage there is InvalidImage."""
    sealed = parse_unverified_image(SEALED)
    bad = dataclasses.replace(sealed, manifest_bytes=b"\xd2\x80")
    with pytest.raises(InvalidImage, match="malformed"):
        verify_manifest(bad, TRUSTED)


# --- the parser on crafted headers ---------------------------------------------------------------


def _image(manifest_bytes: bytes, ciphertext: bytes) -> bytes:
    return SealedImage(manifest_bytes, parse_unverified_image(SEALED).manifest, ciphertext).encode()


def _manifest_cose(protected: dict[int, int], kid: bytes, payload: bytes, tag: bool) -> bytes:
    body = [cbor.dumps(protected), {4: kid}, payload, bytes(64)]
    return cbor.dumps(cbor.tagged(18, body) if tag else body)


def test_parser_refuses_crafted_manifests() -> None:
    """Untagged, non-ES256 and kid-mismatched manifests are malformed."""
    sealed = parse_unverified_image(SEALED)
    payload = sealed.manifest.encode()
    ct = bytes(sealed.ciphertext)
    for manifest_bytes, message in [
        (_manifest_cose({1: -7}, VENDOR_ID, payload, False), "tag 18"),
        (_manifest_cose({1: -8}, VENDOR_ID, payload, True), "ES256"),
        (_manifest_cose({1: -7}, OTHER_ID, payload, True), "kid"),
    ]:
        with pytest.raises(MalformedMessage, match=message):
            parse_unverified_image(_image(manifest_bytes, ct))


def test_parser_refuses_bad_heads() -> None:
    """Wrong magic, non-shortest or unsupported heads, oversize manifests and size mismatches."""
    prefix = image.IMAGE_PREFIX
    cases = [
        (b"\xd9\xd9\xf7\x83\x1a\x45\x53\x49\x02" + SEALED[9:], "magic"),
        (prefix + b"\x60", "byte string"),
        (prefix + b"\x58\x10" + bytes(16), "shortest"),
        (prefix + b"\x5b" + bytes(8), "unsupported"),
        (prefix + b"\x5f", "unsupported"),
        (prefix + b"\x59\x01", "truncated head"),
        (prefix + b"\x59\x08\x00" + bytes(2048), "exceeds"),
    ]
    for data, message in cases:
        with pytest.raises(MalformedMessage, match=message):
            parse_unverified_image(data)
    sealed = parse_unverified_image(SEALED)
    with pytest.raises(MalformedMessage, match="ciphertext: expected"):
        parse_unverified_image(_image(sealed.manifest_bytes, bytes(sealed.ciphertext) + b"x"))
    with pytest.raises(MalformedMessage, match="expected bytes"):
        parse_unverified_header("text")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"vendor_id": bytes(31)},
        {"component": "BL2"},
        {"enc_alg": 1},
        {"format_version": 2},
        {"payload_size": image.MAX_APP_BUNDLE_BYTES + 1},
        {"created_s": True},
    ],
)
def test_manifest_refuses_out_of_range_fields(changes: dict[str, Any]) -> None:
    """Each manifest field is checked on construction and so on decoding."""
    with pytest.raises(MalformedMessage, match="manifest"):
        dataclasses.replace(parse_unverified_image(SEALED).manifest, **changes)


def test_manifest_round_trips_and_refuses_unknown_keys() -> None:
    """A manifest decodes to itself; an extra key is refused."""
    manifest = parse_unverified_image(SEALED).manifest
    assert Manifest.decode(manifest.encode()) == manifest
    obj = cbor.loads(manifest.encode(), what="t")
    assert isinstance(obj, dict)
    obj[16] = 0
    with pytest.raises(MalformedMessage, match="unexpected"):
        Manifest.decode(cbor.dumps(obj))


def test_associated_data_is_the_documented_array() -> None:
    """The AAD is CBOR [format, vendor, class, version, counter, key id, IV] (DESIGN §7)."""
    manifest = parse_unverified_image(SEALED).manifest
    expected = cbor.dumps([1, VENDOR_ID, CLASS, "1.2.0", 3, KEY_ID, IV])
    assert image.associated_data(manifest) == expected


# --- decoders on arbitrary input -----------------------------------------------------------------


@SETTINGS
@given(data=st.binary(max_size=600))
def test_decoders_on_arbitrary_bytes_raise_only_malformed(data: bytes) -> None:
    """Random bytes, with or without the image magic, are decoded or refused as malformed."""
    for decoder in (AppBundle.decode, Manifest.decode, parse_unverified_image):
        for candidate in (data, image.IMAGE_PREFIX + data):
            with contextlib.suppress(MalformedMessage):
                decoder(candidate)


@SETTINGS
@given(
    index=st.integers(0, len(SEALED) - 1),
    value=st.integers(0, 255),
    cut=st.integers(0, len(SEALED)),
    insert=st.binary(max_size=4),
)
def test_mutated_images_raise_only_malformed_or_invalid(
    index: int, value: int, cut: int, insert: bytes
) -> None:
    """A mutated, cut or stuffed image parses and fails verification, or is malformed."""
    for mutated in (
        SEALED[:index] + bytes([value]) + SEALED[index + 1 :],
        SEALED[:cut],
        SEALED[:index] + insert + SEALED[index:],
    ):
        if mutated == SEALED:
            continue
        with pytest.raises((MalformedMessage, InvalidImage)):
            open_default(mutated)


_cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.binary(max_size=40)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.integers(0, 20) | st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=10,
)


@SETTINGS
@given(obj=st.dictionaries(st.integers(0, 16), _cbor_values, max_size=16))
def test_decoders_on_arbitrary_maps_raise_only_malformed(obj: dict[int, object]) -> None:
    """Structured but wrong CBOR maps are refused as malformed by the map decoders."""
    data = cbor.dumps(obj)
    for decoder in (AppBundle.decode, Manifest.decode):
        with contextlib.suppress(MalformedMessage):
            decoder(data)


_PATHS = st.from_regex(r"[a-z]{1,8}(/[a-z]{1,8})?\.py", fullmatch=True)


@SETTINGS
@given(
    sources=st.dictionaries(_PATHS, st.binary(max_size=200), min_size=1, max_size=6),
    compiled=st.dictionaries(_PATHS.map(lambda p: p[:-3] + ".mpy"), st.binary(max_size=200)),
)
def test_bundle_pieces_are_its_canonical_encoding_and_seal_alike(
    sources: dict[str, bytes], compiled: dict[str, bytes]
) -> None:
    """``encode_parts`` joins to the deterministic CBOR of the bundle's map, and sealing the
    pieces gives the image sealing the joined bytes gives (same ciphertext, same manifest)."""
    entry = sorted(sources)[0]
    bundle = AppBundle(
        sources=tuple(sources.items()), compiled=tuple(compiled.items()), entry_point=entry
    )
    expected = cbor.dumps({1: 1, 2: sources, 3: compiled, 4: entry})
    assert bundle.encode() == b"".join(bundle.encode_parts()) == expected
    whole = parse_unverified_image(seal(expected, entry_point=entry))
    pieces = parse_unverified_image(seal(bundle.encode_parts(), entry_point=entry))
    assert pieces.ciphertext == whole.ciphertext and pieces.manifest == whole.manifest
    assert open_image(pieces, CEK, trusted_vendors=TRUSTED, min_security_counter=0) == expected
