"""Signed bundles between provisioning and the gateway (protocol/bundles.py, DESIGN §7)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import bundles, cbor, cose, keys
from protocol.bundles import (
    ComponentType,
    EnrolledDevice,
    EnrollmentBundle,
    ReferenceValue,
    ReleaseBundle,
    RevocationBundle,
    parse_unverified_bundle,
    sign_bundle,
    unwrap_release_cek,
    verify_bundle,
    wrap_release_cek,
)
from protocol.errors import InvalidImage, InvalidSignedMessage, MalformedMessage
from protocol.ids import ClassId, DeviceId, Product, class_id
from protocol.image import manifest_digest, parse_unverified_image, seal_image

FACTORY = keys.derive_p256(b"test factory secret", b"factory")
VENDOR = keys.derive_p256(b"test vendor secret", b"vendor")
OTHER = keys.derive_p256(b"test other secret", b"other")
FACTORY_ID = keys.signer_id(FACTORY.public_key())
VENDOR_ID = keys.signer_id(VENDOR.public_key())
TRUSTED = {FACTORY_ID: FACTORY.public_key(), VENDOR_ID: VENDOR.public_key()}
GATEWAY_HPKE = x25519.X25519PrivateKey.from_private_bytes(bytes(range(32)))
PRODUCT = Product("thermostat")
CLASS = class_id(PRODUCT)
CEK = bytes(range(1, 33))
SETTINGS = settings(max_examples=120, deadline=None)

BL2_RV = ReferenceValue(ComponentType.BL2, b"\x11" * 32, "1.0.0", b"\x22" * 32, 1)
RT_RV = ReferenceValue(ComponentType.RUNTIME, b"\x33" * 32, "2.0.0", b"\x22" * 32, 2)
DEVICE = EnrolledDevice(
    DeviceId("dev-0001"), b"\x30\x82secured", b"\x30\x82debug", (("boot", 0), ("app", 3))
)
ENROLLMENT = EnrollmentBundle(
    product=PRODUCT,
    class_id=CLASS,
    devices=(DEVICE, dataclasses.replace(DEVICE, device_id=DeviceId("dev-0002"))),
    reference_values=(BL2_RV, RT_RV),
    created_s=1_800_000_000,
)
REVOCATION = RevocationBundle((DeviceId("dev-0001"), DeviceId("dev-0002")), "stolen", 1_800_000_100)
IMAGE = seal_image(
    b"app bundle bytes",
    cek=CEK,
    iv=bytes(12),
    key_id=bytes(16),
    vendor_key=VENDOR,
    class_id=CLASS,
    version="1.2.0",
    security_counter=5,
    min_runtime_version="1.0",
    created_s=1_800_000_000,
)
SEALED = parse_unverified_image(IMAGE)
DIGEST = manifest_digest(SEALED)
APP_RV = ReferenceValue(ComponentType.APP, DIGEST, "1.2.0", VENDOR_ID, 5)
RELEASE = ReleaseBundle(
    product=PRODUCT,
    image=IMAGE,
    reference_value=APP_RV,
    wrapped_cek=wrap_release_cek(CEK, GATEWAY_HPKE.public_key(), DIGEST),
    created_s=1_800_000_200,
)


def flip(data: bytes, index: int) -> bytes:
    """``data`` with the low bit of one byte flipped."""
    out = bytearray(data)
    out[index] ^= 1
    return bytes(out)


def resign_payload(payload: dict[str, Any], key: Any = FACTORY, kid: bytes | None = None) -> bytes:
    """A bundle with an arbitrary payload map, validly signed."""
    point = keys.p256_point(key.public_key())
    body = {"v": 1, "signer": point, "created_s": 0, **payload}
    return cose.sign1_create(
        cbor.dumps(body), key, kid=keys.signer_id(key.public_key()) if kid is None else kid
    )


def test_each_bundle_type_round_trips_and_verifies() -> None:
    """Enrollment, release and revocation bundles sign, parse and verify to themselves."""
    for bundle, key, signer in (
        (ENROLLMENT, FACTORY, FACTORY_ID),
        (RELEASE, VENDOR, VENDOR_ID),
        (REVOCATION, FACTORY, FACTORY_ID),
    ):
        data = sign_bundle(bundle, key)
        assert data[0] == 0xD2
        assert parse_unverified_bundle(data) == (signer, bundle)
        assert verify_bundle(data, TRUSTED) == bundle


def test_untrusted_signer_is_refused() -> None:
    """A bundle signed by a key the operator has not trusted is refused."""
    data = sign_bundle(ENROLLMENT, OTHER)
    assert parse_unverified_bundle(data)[0] == keys.signer_id(OTHER.public_key())
    with pytest.raises(InvalidSignedMessage, match="not trusted"):
        verify_bundle(data, TRUSTED)


def test_trusted_id_under_another_key_is_refused() -> None:
    """A trust map whose entry holds another key for the id does not verify the bundle."""
    data = sign_bundle(ENROLLMENT, FACTORY)
    with pytest.raises(InvalidSignedMessage, match="not trusted"):
        verify_bundle(data, {FACTORY_ID: OTHER.public_key()})


def test_flipped_signature_bit_is_refused() -> None:
    """A changed signature byte fails verification."""
    data = sign_bundle(REVOCATION, FACTORY)
    with pytest.raises(InvalidSignedMessage, match="signature"):
        verify_bundle(flip(data, len(data) - 1), TRUSTED)


def test_forged_payload_with_the_trusted_point_is_refused() -> None:
    """Another key's signature over a payload naming the trusted signer does not verify."""
    point = keys.p256_point(FACTORY.public_key())
    body = {"v": 1, "signer": point, "created_s": 0, "type": "revocation"}
    body |= {"device_ids": ["dev-1"], "reason": "x"}
    data = cose.sign1_create(cbor.dumps(body), OTHER, kid=FACTORY_ID)
    with pytest.raises(InvalidSignedMessage, match="signature"):
        verify_bundle(data, TRUSTED)


def test_every_byte_flip_fails_parse_or_verify() -> None:
    """No single-byte flip of a signed revocation is accepted."""
    data = sign_bundle(REVOCATION, FACTORY)
    for index in range(len(data)):
        with pytest.raises((MalformedMessage, InvalidSignedMessage)):
            verify_bundle(flip(data, index), TRUSTED)


def test_truncated_and_trailing_bytes_are_malformed() -> None:
    """A cut or extended bundle does not parse."""
    data = sign_bundle(ENROLLMENT, FACTORY)
    for cut in (0, 1, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(MalformedMessage):
            verify_bundle(data[:cut], TRUSTED)
    with pytest.raises(MalformedMessage, match="trailing"):
        verify_bundle(data + b"\x00", TRUSTED)


def test_signing_with_a_callable_needs_the_public_key() -> None:
    """An Es256Signer signs a verifiable bundle when given its public key, and fails without."""
    signer = cose.es256_signer(FACTORY)
    data = sign_bundle(REVOCATION, signer, signer_public=FACTORY.public_key())
    assert verify_bundle(data, TRUSTED) == REVOCATION
    with pytest.raises(TypeError):
        sign_bundle(REVOCATION, signer)


@pytest.mark.parametrize(
    ("payload", "kid", "message"),
    [
        ({"type": "revocation", "device_ids": [], "reason": ""}, b"\x00" * 32, "kid"),
        ({"type": "rollout", "device_ids": [], "reason": ""}, None, "type"),
        ({"type": "revocation", "device_ids": [], "reason": "", "x": 1}, None, "unexpected"),
        ({"type": "revocation", "device_ids": [7], "reason": ""}, None, "device_ids"),
        ({"type": "revocation", "device_ids": ["a/b"], "reason": ""}, None, "device id"),
        ({"type": "revocation", "device_ids": ["a", "a"], "reason": ""}, None, "duplicate"),
    ],
)
def test_parser_refuses_crafted_payloads(
    payload: dict[str, Any], kid: bytes | None, message: str
) -> None:
    """A kid that is not the carried signer, unknown types and bad fields are malformed."""
    with pytest.raises(MalformedMessage, match=message):
        parse_unverified_bundle(resign_payload(payload, kid=kid))


def test_parser_refuses_other_versions_algorithms_and_untagged() -> None:
    """Version 2 payloads, untagged messages and non-ES256 algorithms are malformed."""
    body = {"v": 2, "signer": keys.p256_point(FACTORY.public_key()), "created_s": 0}
    data = cose.sign1_create(cbor.dumps(body), FACTORY, kid=FACTORY_ID)
    with pytest.raises(MalformedMessage, match=r"bundle\.v"):
        parse_unverified_bundle(data)
    untagged = cose.sign1_create(cbor.dumps(body), FACTORY, kid=FACTORY_ID, tagged=False)
    with pytest.raises(MalformedMessage, match="tag 18"):
        parse_unverified_bundle(untagged)
    eddsa = cbor.dumps(cbor.tagged(18, [cbor.dumps({1: -8}), {}, b"", bytes(64)]))
    with pytest.raises(MalformedMessage, match="ES256"):
        parse_unverified_bundle(eddsa)


def test_non_release_bundles_have_a_smaller_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Enrollment and revocation bundles above their limit are malformed; releases are not."""
    data = sign_bundle(REVOCATION, FACTORY)
    release = sign_bundle(RELEASE, VENDOR)
    monkeypatch.setattr(bundles, "MAX_OTHER_BUNDLE_BYTES", len(data) - 1)
    with pytest.raises(MalformedMessage, match="exceeds"):
        parse_unverified_bundle(data)
    assert len(release) > len(data)
    assert parse_unverified_bundle(release)[1] == RELEASE


# --- enrollment ----------------------------------------------------------------------------------


def test_enrollment_validates_its_fields() -> None:
    """Class id, duplicate devices, counters and certificates are checked."""
    with pytest.raises(MalformedMessage, match="class_id"):
        dataclasses.replace(ENROLLMENT, class_id=ClassId(bytes(16)))
    with pytest.raises(MalformedMessage, match="duplicate"):
        dataclasses.replace(ENROLLMENT, devices=(DEVICE, DEVICE))
    with pytest.raises(MalformedMessage, match="created_s"):
        dataclasses.replace(ENROLLMENT, created_s=-1)
    with pytest.raises(MalformedMessage, match="reference_values"):
        dataclasses.replace(ENROLLMENT, reference_values=(BL2_RV,) * 65)
    with pytest.raises(MalformedMessage, match="cert_debug"):
        dataclasses.replace(DEVICE, cert_debug_der=b"")
    with pytest.raises(MalformedMessage, match="counter name"):
        dataclasses.replace(DEVICE, counters=(("Boot Count", 1),))
    with pytest.raises(MalformedMessage, match="distinct"):
        dataclasses.replace(DEVICE, counters=(("boot", 1), ("boot", 2)))
    with pytest.raises(MalformedMessage, match=r"counters\.boot"):
        dataclasses.replace(DEVICE, counters=(("boot", -1),))
    with pytest.raises(MalformedMessage, match="device id"):
        dataclasses.replace(DEVICE, device_id=DeviceId("../x"))


def test_enrollment_device_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """More devices than the limit are refused."""
    monkeypatch.setattr(bundles, "MAX_DEVICES", 1)
    with pytest.raises(MalformedMessage, match="devices"):
        dataclasses.replace(ENROLLMENT)
    with pytest.raises(MalformedMessage, match="device_ids"):
        dataclasses.replace(REVOCATION)


def test_enrollment_decoder_refuses_bad_devices() -> None:
    """Devices with unknown fields or too many counters are malformed."""
    device = DEVICE.to_cbor()
    base = {
        "type": "enrollment",
        "product": "thermostat",
        "class_id": CLASS,
        "reference_values": [],
    }
    with pytest.raises(MalformedMessage, match="unexpected"):
        parse_unverified_bundle(resign_payload({**base, "devices": [{**device, "x": 0}]}))
    counters = {f"c{i}": 0 for i in range(17)}
    with pytest.raises(MalformedMessage, match="counters"):
        parse_unverified_bundle(
            resign_payload({**base, "devices": [{**device, "counters": counters}]})
        )
    bad_rv = {**BL2_RV.to_cbor(), "component": "BL9"}
    with pytest.raises(MalformedMessage, match="component"):
        parse_unverified_bundle(
            resign_payload({**base, "devices": [], "reference_values": [bad_rv]})
        )


# --- release -------------------------------------------------------------------------------------


def test_release_reference_value_must_describe_the_image() -> None:
    """A release whose reference value or product does not match its image is malformed."""
    for changes in (
        {"measurement": bytes(32)},
        {"version": "1.2.1"},
        {"signer_id": bytes(32)},
        {"security_counter": 6},
        {"component": ComponentType.RUNTIME},
    ):
        with pytest.raises(MalformedMessage, match="reference_value"):
            dataclasses.replace(RELEASE, reference_value=dataclasses.replace(APP_RV, **changes))
    with pytest.raises(MalformedMessage, match="another class id"):
        dataclasses.replace(RELEASE, product=Product("toaster"))
    with pytest.raises(MalformedMessage, match="wrapped_cek"):
        dataclasses.replace(RELEASE, wrapped_cek=bytes(79))
    with pytest.raises(MalformedMessage):
        dataclasses.replace(RELEASE, image=IMAGE[:-1])


def test_release_cek_unwraps_only_with_the_gateway_key_and_digest() -> None:
    """The wrapped CEK opens with the gateway key for this manifest, and nothing else."""
    wrapped = RELEASE.wrapped_cek
    assert len(wrapped) == bundles.WRAPPED_CEK_BYTES
    assert unwrap_release_cek(wrapped, GATEWAY_HPKE, DIGEST) == CEK
    other = x25519.X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    with pytest.raises(InvalidImage):
        unwrap_release_cek(wrapped, other, DIGEST)
    with pytest.raises(InvalidImage):
        unwrap_release_cek(wrapped, GATEWAY_HPKE, bytes(32))
    with pytest.raises(InvalidImage):
        unwrap_release_cek(flip(wrapped, 40), GATEWAY_HPKE, DIGEST)
    with pytest.raises(InvalidImage):
        unwrap_release_cek(wrapped[:-1], GATEWAY_HPKE, DIGEST)


def test_wrap_refuses_wrong_sizes() -> None:
    """A CEK or digest of the wrong size is the caller's error."""
    with pytest.raises(ValueError, match="CEK"):
        wrap_release_cek(bytes(16), GATEWAY_HPKE.public_key(), DIGEST)
    with pytest.raises(ValueError, match="digest"):
        wrap_release_cek(CEK, GATEWAY_HPKE.public_key(), bytes(31))


def test_release_cek_opens_the_image() -> None:
    """The CEK from a verified release opens its sealed image (the gateway's use)."""
    from protocol.image import open_image

    release = verify_bundle(sign_bundle(RELEASE, VENDOR), TRUSTED)
    assert isinstance(release, ReleaseBundle)
    sealed = parse_unverified_image(release.image)
    cek = unwrap_release_cek(release.wrapped_cek, GATEWAY_HPKE, manifest_digest(sealed))
    plaintext = open_image(
        sealed, cek, trusted_vendors={VENDOR_ID: VENDOR.public_key()}, min_security_counter=5
    )
    assert plaintext == b"app bundle bytes"


# --- reference values and revocation -------------------------------------------------------------

_rv = st.builds(
    ReferenceValue,
    component=st.sampled_from(ComponentType),
    measurement=st.binary(min_size=32, max_size=32),
    version=st.from_regex(r"[0-9A-Za-z][0-9A-Za-z.+-]{0,31}", fullmatch=True),
    signer_id=st.binary(min_size=32, max_size=32),
    security_counter=st.integers(0, 2**32 - 1),
)


@SETTINGS
@given(rv=_rv)
def test_reference_values_round_trip(rv: ReferenceValue) -> None:
    """Any reference value encodes and decodes to itself."""
    assert ReferenceValue.decode(rv.encode()) == rv


def test_reference_value_refuses_bad_fields() -> None:
    """Sizes, versions, counters and the component type are checked."""
    for changes in (
        {"measurement": bytes(31)},
        {"signer_id": bytes(33)},
        {"version": ""},
        {"security_counter": -1},
        {"component": "APP"},
    ):
        with pytest.raises(MalformedMessage, match="reference value"):
            dataclasses.replace(BL2_RV, **changes)


def test_revocation_validates_its_fields() -> None:
    """Duplicate ids, long reasons and bad times are refused."""
    with pytest.raises(MalformedMessage, match="duplicate"):
        RevocationBundle((DeviceId("a"), DeviceId("a")), "", 0)
    with pytest.raises(MalformedMessage, match="reason"):
        RevocationBundle((), "x" * 257, 0)
    with pytest.raises(MalformedMessage, match="created_s"):
        RevocationBundle((), "", True)


_device_ids = st.lists(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True), unique=True, max_size=5
)


@SETTINGS
@given(ids=_device_ids, reason=st.text(max_size=50), created=st.integers(0, 2**63 - 1))
def test_revocations_round_trip(ids: list[str], reason: str, created: int) -> None:
    """Any revocation signs, verifies and comes back equal."""
    bundle = RevocationBundle(tuple(DeviceId(i) for i in ids), reason, created)
    assert verify_bundle(sign_bundle(bundle, FACTORY), TRUSTED) == bundle


@SETTINGS
@given(
    counters=st.dictionaries(
        st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,31}", fullmatch=True),
        st.integers(0, 2**32 - 1),
        max_size=16,
    ),
    rvs=st.lists(_rv, max_size=3),
)
def test_enrollments_round_trip(counters: dict[str, int], rvs: list[ReferenceValue]) -> None:
    """Any enrollment signs, parses and comes back equal (counters sorted by name)."""
    device = dataclasses.replace(DEVICE, counters=tuple(counters.items()))
    bundle = dataclasses.replace(ENROLLMENT, devices=(device,), reference_values=tuple(rvs))
    assert parse_unverified_bundle(sign_bundle(bundle, FACTORY))[1] == bundle


# --- decoders on arbitrary input -----------------------------------------------------------------


@SETTINGS
@given(data=st.binary(max_size=400))
def test_decoders_on_arbitrary_bytes_raise_only_malformed(data: bytes) -> None:
    """Random bytes, tagged as COSE_Sign1 or not, are refused as malformed only."""
    for candidate in (data, b"\xd2" + data, b"\xd2\x84" + data):
        with contextlib.suppress(MalformedMessage):
            parse_unverified_bundle(candidate)
        with contextlib.suppress(MalformedMessage):
            ReferenceValue.decode(candidate)


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.binary(max_size=70)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=15,
)
_keys = st.sampled_from(
    [
        "product",
        "class_id",
        "devices",
        "reference_values",
        "image",
        "reference_value",
        "wrapped_cek",
        "device_ids",
        "reason",
        "id",
        "counters",
    ]
)


@SETTINGS
@given(
    kind=st.sampled_from(["enrollment", "release", "revocation"]),
    extra=st.dictionaries(_keys, _values, max_size=6),
)
def test_signed_but_wrong_payloads_raise_only_malformed(kind: str, extra: dict[str, Any]) -> None:
    """A validly signed payload with wrong fields is malformed, never another error."""
    data = resign_payload({"type": kind, **extra})
    with contextlib.suppress(MalformedMessage):
        verify_bundle(data, TRUSTED)
