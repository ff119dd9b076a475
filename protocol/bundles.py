"""Signed bundles, the files between provisioning and gateway (DESIGN §7; image-format.md §5).

A bundle is a tagged COSE_Sign1 (ES256) whose kid is the signer id and whose payload is a versioned
CBOR map with text keys: ``"v"`` (1), ``"type"``, ``"signer"`` (the SEC1 point of the signing key),
``"created_s"`` and the fields of its type. The gateway trusts signers by signer id (SHA-256 of the
point, ``trust add``); ``verify_bundle`` looks the id up, checks the point is the trusted key's and
verifies the signature. A release carries the sealed image and its CEK HPKE-wrapped (RFC 9180 base
mode) to the gateway's X25519 key with info ``"edgeseal/release/v1" ‖ manifest digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from protocol import cbor, cose, keys
from protocol.errors import InvalidImage, InvalidSignature, InvalidSignedMessage, MalformedMessage
from protocol.ids import ClassId, DeviceId, Product, class_id, device_id, product
from protocol.image import (
    check_version_text,
    es256_signer_and_point,
    manifest_digest,
    parse_unverified_image,
)

BUNDLE_FORMAT_VERSION: Final = 1
RELEASE_INFO: Final = b"edgeseal/release/v1"
CEK_BYTES: Final = 32
#: HPKE enc (32) ‖ AES-256-GCM ciphertext of the CEK (32) ‖ tag (16), RFC 9180 §6.1 single-shot.
WRAPPED_CEK_BYTES: Final = 32 + CEK_BYTES + 16
MAX_RELEASE_BYTES: Final = 64 << 20
MAX_OTHER_BUNDLE_BYTES: Final = 16 << 20
MAX_DEVICES: Final = 100_000
MAX_REFERENCE_VALUES: Final = 64
MAX_COUNTERS: Final = 16
MAX_CERT_BYTES: Final = 4096
MAX_REASON_CHARS: Final = 256
MAX_COUNTER_VALUE: Final = 0xFFFF_FFFF
MAX_TIME_S: Final = (1 << 63) - 1
POINT_BYTES: Final = 65

_SUITE: Final = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_COUNTER_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
_RV_KEYS: Final[frozenset[cbor.Key]] = frozenset(
    {"component", "measurement", "version", "signer_id", "security_counter"}
)
_DEVICE_KEYS: Final[frozenset[cbor.Key]] = frozenset(
    {"id", "cert_secured", "cert_debug", "counters"}
)
_COMMON_KEYS: Final = frozenset({"v", "type", "signer", "created_s"})


class BundleType(StrEnum):
    """The ``"type"`` of a bundle payload."""

    ENROLLMENT = "enrollment"
    RELEASE = "release"
    REVOCATION = "revocation"


class ComponentType(StrEnum):
    """The software component a reference value describes (PSA measurement type, DESIGN §5)."""

    BL2 = "BL2"
    RUNTIME = "RT"
    APP = "APP"


def _check_uint(value: int, hi: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
        raise MalformedMessage(f"{what}: expected an integer in 0..{hi}")


def _check_size(value: bytes, size: int, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise MalformedMessage(f"{what}: expected {size} bytes")


@dataclass(frozen=True, slots=True)
class ReferenceValue:
    """The expected measurement of one software component (the gateway's registry reuses it)."""

    component: ComponentType
    measurement: bytes
    version: str
    signer_id: bytes
    security_counter: int

    def __post_init__(self) -> None:
        what = "reference value"
        if not isinstance(self.component, ComponentType):
            raise MalformedMessage(f"{what}.component: expected a ComponentType")
        _check_size(self.measurement, 32, f"{what}.measurement")
        _check_size(self.signer_id, 32, f"{what}.signer_id")
        check_version_text(self.version, what=f"{what}.version")
        _check_uint(self.security_counter, MAX_COUNTER_VALUE, f"{what}.security_counter")

    def to_cbor(self) -> dict[str, object]:
        """The CBOR map of this reference value, ready for ``cbor.dumps``."""
        return {
            "component": str(self.component),
            "measurement": self.measurement,
            "version": self.version,
            "signer_id": self.signer_id,
            "security_counter": self.security_counter,
        }

    @classmethod
    def from_cbor(cls, obj: object, *, what: str = "reference value") -> ReferenceValue:
        """Read a reference value from a decoded CBOR map.

        Raises:
            MalformedMessage: not a well-formed reference value.
        """
        f = cbor.Fields(obj, what=what).only(_RV_KEYS)
        component = f.get_str("component", max_len=8)
        try:
            kind = ComponentType(component)
        except ValueError as err:
            raise MalformedMessage(f"{f.name('component')}: expected BL2, RT or APP") from err
        return cls(
            component=kind,
            measurement=f.get_bytes("measurement"),
            version=f.get_str("version", max_len=32),
            signer_id=f.get_bytes("signer_id"),
            security_counter=f.get_int("security_counter"),
        )

    def encode(self) -> bytes:
        """Canonical CBOR of ``to_cbor()``."""
        return cbor.dumps(self.to_cbor())

    @classmethod
    def decode(cls, data: bytes) -> ReferenceValue:
        """Decode ``encode()``'s bytes.

        Raises:
            MalformedMessage: not a well-formed reference value.
        """
        return cls.from_cbor(cbor.loads(data, what="reference value", max_bytes=1024))


@dataclass(frozen=True, slots=True)
class EnrolledDevice:
    """One manufactured device: its id, both certificates (DER) and its initial fuse counters."""

    device_id: DeviceId
    cert_secured_der: bytes
    cert_debug_der: bytes
    counters: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        what = f"enrollment.device {self.device_id!r:.70}"
        device_id(self.device_id)
        for name, cert in (
            ("cert_secured", self.cert_secured_der),
            ("cert_debug", self.cert_debug_der),
        ):
            if not isinstance(cert, bytes) or not 0 < len(cert) <= MAX_CERT_BYTES:
                raise MalformedMessage(f"{what}.{name}: expected 1-{MAX_CERT_BYTES} bytes of DER")
        ordered = tuple(sorted(self.counters))
        if len(ordered) > MAX_COUNTERS or len({n for n, _ in ordered}) != len(ordered):
            raise MalformedMessage(f"{what}.counters: at most {MAX_COUNTERS} distinct names")
        for name, value in ordered:
            if not isinstance(name, str) or not _COUNTER_NAME.fullmatch(name):
                raise MalformedMessage(f"{what}.counters: invalid counter name {name!r:.40}")
            _check_uint(value, MAX_COUNTER_VALUE, f"{what}.counters.{name}")
        object.__setattr__(self, "counters", ordered)

    def to_cbor(self) -> dict[str, object]:
        """The CBOR map of this device."""
        return {
            "id": self.device_id,
            "cert_secured": self.cert_secured_der,
            "cert_debug": self.cert_debug_der,
            "counters": dict(self.counters),
        }

    @classmethod
    def from_cbor(cls, obj: object, *, what: str) -> EnrolledDevice:
        """Read a device from a decoded CBOR map."""
        f = cbor.Fields(obj, what=what).only(_DEVICE_KEYS)
        counters = f.get_map("counters")
        names = counters.keys()
        if len(names) > MAX_COUNTERS:
            raise MalformedMessage(f"{counters.what}: more than {MAX_COUNTERS} counters")
        pairs = []
        for name in names:
            text = cbor.expect_str(name, what=f"{counters.what} key", max_len=32)
            pairs.append((text, counters.get_int(text)))
        return cls(
            device_id=device_id(f.get_str("id", max_len=64)),
            cert_secured_der=f.get_bytes("cert_secured", max_size=MAX_CERT_BYTES),
            cert_debug_der=f.get_bytes("cert_debug", max_size=MAX_CERT_BYTES),
            counters=tuple(pairs),
        )


@dataclass(frozen=True, slots=True)
class EnrollmentBundle:
    """Factory → gateway: manufactured devices and the boot stages' reference values (§7)."""

    product: Product
    class_id: ClassId
    devices: tuple[EnrolledDevice, ...]
    reference_values: tuple[ReferenceValue, ...]
    created_s: int

    def __post_init__(self) -> None:
        what = "enrollment"
        product(self.product)
        if self.class_id != class_id(self.product):
            raise MalformedMessage(f"{what}.class_id: not the class id of product {self.product}")
        if len(self.devices) > MAX_DEVICES:
            raise MalformedMessage(f"{what}.devices: more than {MAX_DEVICES}")
        if len({d.device_id for d in self.devices}) != len(self.devices):
            raise MalformedMessage(f"{what}.devices: duplicate device id")
        if len(self.reference_values) > MAX_REFERENCE_VALUES:
            raise MalformedMessage(f"{what}.reference_values: more than {MAX_REFERENCE_VALUES}")
        _check_uint(self.created_s, MAX_TIME_S, f"{what}.created_s")


@dataclass(frozen=True, slots=True)
class ReleaseBundle:
    """Vendor → gateway: a sealed image, its reference value and its wrapped CEK (§7).

    The reference value must describe the image: component APP, measurement = manifest digest,
    and the manifest's version, vendor id and counter; the product's class id must be the
    manifest's. Checked on construction (unverified: the gateway verifies the manifest itself).
    """

    product: Product
    image: bytes
    reference_value: ReferenceValue
    wrapped_cek: bytes
    created_s: int

    def __post_init__(self) -> None:
        what = "release"
        product(self.product)
        _check_size(self.wrapped_cek, WRAPPED_CEK_BYTES, f"{what}.wrapped_cek")
        _check_uint(self.created_s, MAX_TIME_S, f"{what}.created_s")
        sealed = parse_unverified_image(self.image)
        manifest = sealed.manifest
        rv = self.reference_value
        expected = ReferenceValue(
            component=ComponentType.APP,
            measurement=manifest_digest(sealed),
            version=manifest.version,
            signer_id=manifest.vendor_id,
            security_counter=manifest.security_counter,
        )
        if rv != expected:
            raise MalformedMessage(f"{what}.reference_value: does not describe the image")
        if manifest.class_id != class_id(self.product):
            raise MalformedMessage(f"{what}.product: the image is for another class id")


@dataclass(frozen=True, slots=True)
class RevocationBundle:
    """Operator or vendor → gateway: devices to refuse from now on (§7)."""

    device_ids: tuple[DeviceId, ...]
    reason: str
    created_s: int

    def __post_init__(self) -> None:
        what = "revocation"
        if len(self.device_ids) > MAX_DEVICES:
            raise MalformedMessage(f"{what}.device_ids: more than {MAX_DEVICES}")
        for dev in self.device_ids:
            device_id(dev)
        if len(set(self.device_ids)) != len(self.device_ids):
            raise MalformedMessage(f"{what}.device_ids: duplicate device id")
        if not isinstance(self.reason, str) or len(self.reason) > MAX_REASON_CHARS:
            raise MalformedMessage(f"{what}.reason: expected at most {MAX_REASON_CHARS} chars")
        _check_uint(self.created_s, MAX_TIME_S, f"{what}.created_s")


Bundle = EnrollmentBundle | ReleaseBundle | RevocationBundle


# --- encoding ------------------------------------------------------------------------------------


def _body(bundle: Bundle) -> dict[str, object]:
    if isinstance(bundle, EnrollmentBundle):
        return {
            "type": str(BundleType.ENROLLMENT),
            "product": bundle.product,
            "class_id": bundle.class_id,
            "devices": [d.to_cbor() for d in bundle.devices],
            "reference_values": [r.to_cbor() for r in bundle.reference_values],
        }
    if isinstance(bundle, ReleaseBundle):
        return {
            "type": str(BundleType.RELEASE),
            "product": bundle.product,
            "image": bundle.image,
            "reference_value": bundle.reference_value.to_cbor(),
            "wrapped_cek": bundle.wrapped_cek,
        }
    return {
        "type": str(BundleType.REVOCATION),
        "device_ids": list(bundle.device_ids),
        "reason": bundle.reason,
    }


def sign_bundle(
    bundle: Bundle,
    signer_key: ec.EllipticCurvePrivateKey | cose.Es256Signer,
    *,
    signer_public: ec.EllipticCurvePublicKey | None = None,
) -> bytes:
    """Sign ``bundle`` as a tagged COSE_Sign1 (ES256, kid = signer id).

    ``signer_public`` is needed only when ``signer_key`` is an ``Es256Signer``.

    Raises:
        TypeError: an ``Es256Signer`` without ``signer_public``.
    """
    signer, point = es256_signer_and_point(signer_key, signer_public, what="signer_key")
    payload = {
        **_body(bundle),
        "v": BUNDLE_FORMAT_VERSION,
        "signer": point,
        "created_s": bundle.created_s,
    }
    return cose.sign1_create(cbor.dumps(payload), signer, kid=hashlib.sha256(point).digest())


# --- decoding ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Parsed:
    message: cose.CoseMessage
    signer_point: bytes
    signer_id: bytes
    bundle: Bundle


def _parse(data: bytes) -> _Parsed:
    what = "bundle"
    if not isinstance(data, bytes) or data[:1] != b"\xd2":
        raise MalformedMessage(f"{what}: expected a COSE_Sign1 with tag 18")
    message = cose.sign1_parse_unverified(data)
    if message.alg is not cose.Algorithm.ES256:
        raise MalformedMessage(f"{what}: expected ES256, got {int(message.alg)}")
    f = cbor.Fields(cbor.loads(message.payload, what=what, max_bytes=MAX_RELEASE_BYTES), what=what)
    f.get_int("v", lo=BUNDLE_FORMAT_VERSION, hi=BUNDLE_FORMAT_VERSION)
    point = f.get_bytes("signer", size=POINT_BYTES)
    signer = hashlib.sha256(point).digest()
    if message.kid != signer:
        raise MalformedMessage(f"{what}: kid is not the signer id of the carried key")
    type_text = f.get_str("type", max_len=16)
    try:
        kind = BundleType(type_text)
    except ValueError as err:
        raise MalformedMessage(f"{what}.type: unknown bundle type {type_text!r}") from err
    if kind is not BundleType.RELEASE and len(data) > MAX_OTHER_BUNDLE_BYTES:
        raise MalformedMessage(f"{what}: {len(data)} bytes exceeds {MAX_OTHER_BUNDLE_BYTES}")
    bundle = _DECODERS[kind](f, f.get_int("created_s"))
    return _Parsed(message, point, signer, bundle)


def _decode_enrollment(f: cbor.Fields, created_s: int) -> EnrollmentBundle:
    f.only(_COMMON_KEYS | {"product", "class_id", "devices", "reference_values"})
    devices = f.get_list("devices", max_len=MAX_DEVICES)
    rvs = f.get_list("reference_values", max_len=MAX_REFERENCE_VALUES)
    return EnrollmentBundle(
        product=product(f.get_str("product", max_len=64)),
        class_id=ClassId(f.get_bytes("class_id", size=16)),
        devices=tuple(
            EnrolledDevice.from_cbor(d, what=f"bundle.devices[{i}]") for i, d in enumerate(devices)
        ),
        reference_values=tuple(
            ReferenceValue.from_cbor(r, what=f"bundle.reference_values[{i}]")
            for i, r in enumerate(rvs)
        ),
        created_s=created_s,
    )


def _decode_release(f: cbor.Fields, created_s: int) -> ReleaseBundle:
    f.only(_COMMON_KEYS | {"product", "image", "reference_value", "wrapped_cek"})
    return ReleaseBundle(
        product=product(f.get_str("product", max_len=64)),
        image=f.get_bytes("image", max_size=MAX_RELEASE_BYTES),
        reference_value=ReferenceValue.from_cbor(
            f.raw("reference_value"), what="bundle.reference_value"
        ),
        wrapped_cek=f.get_bytes("wrapped_cek", size=WRAPPED_CEK_BYTES),
        created_s=created_s,
    )


def _decode_revocation(f: cbor.Fields, created_s: int) -> RevocationBundle:
    f.only(_COMMON_KEYS | {"device_ids", "reason"})
    ids = f.get_list("device_ids", max_len=MAX_DEVICES)
    return RevocationBundle(
        device_ids=tuple(
            device_id(cbor.expect_str(d, what="bundle.device_ids", max_len=64)) for d in ids
        ),
        reason=f.get_str("reason", max_len=MAX_REASON_CHARS),
        created_s=created_s,
    )


_DECODERS: Final[Mapping[BundleType, Callable[[cbor.Fields, int], Bundle]]] = {
    BundleType.ENROLLMENT: _decode_enrollment,
    BundleType.RELEASE: _decode_release,
    BundleType.REVOCATION: _decode_revocation,
}


def parse_unverified_bundle(data: bytes) -> tuple[bytes, Bundle]:
    """Parse a signed bundle without verifying it; return (signer id as carried, bundle).

    Raises:
        MalformedMessage: not a well-formed version-1 bundle.
    """
    parsed = _parse(data)
    return parsed.signer_id, parsed.bundle


def verify_bundle(
    data: bytes, trusted_signers: Mapping[bytes, ec.EllipticCurvePublicKey]
) -> Bundle:
    """Verify a signed bundle against the operator's trusted signers and return it.

    Args:
        data: the bundle file's bytes.
        trusted_signers: signer id (SHA-256 of the SEC1 point) → public key.

    Raises:
        MalformedMessage: not a well-formed version-1 bundle.
        InvalidSignedMessage: the signer is not trusted, or the signature does not verify.
    """
    parsed = _parse(data)
    key = trusted_signers.get(parsed.signer_id)
    if key is None or not hmac.compare_digest(keys.p256_point(key), parsed.signer_point):
        raise InvalidSignedMessage("bundle: signer is not trusted")
    try:
        cose.verify_parsed(parsed.message, key)
    except InvalidSignature as err:
        raise InvalidSignedMessage("bundle: signature does not verify") from err
    return parsed.bundle


# --- the release CEK -----------------------------------------------------------------------------


def _release_info(manifest_digest: bytes) -> bytes:
    if len(manifest_digest) != 32:
        raise ValueError(f"manifest digest must be 32 bytes, got {len(manifest_digest)}")
    return RELEASE_INFO + manifest_digest


def wrap_release_cek(
    cek: bytes, gateway_hpke_public: x25519.X25519PublicKey, manifest_digest: bytes
) -> bytes:
    """HPKE-wrap a release CEK to the gateway (RFC 9180 base mode; info binds the manifest).

    Raises:
        ValueError: ``cek`` is not 32 bytes or ``manifest_digest`` not 32 bytes.
    """
    if len(cek) != CEK_BYTES:
        raise ValueError(f"CEK must be {CEK_BYTES} bytes, got {len(cek)}")
    return _SUITE.encrypt(cek, gateway_hpke_public, info=_release_info(manifest_digest))


def unwrap_release_cek(
    wrapped: bytes, gateway_hpke_private: x25519.X25519PrivateKey, manifest_digest: bytes
) -> bytes:
    """Open a wrapped release CEK with the gateway's HPKE key.

    Raises:
        InvalidImage: the wrap does not open with this key for this manifest digest.
    """
    info = _release_info(manifest_digest)
    if len(wrapped) != WRAPPED_CEK_BYTES:
        raise InvalidImage("release: wrapped CEK does not open")
    try:
        return _SUITE.decrypt(wrapped, gateway_hpke_private, info=info)
    except (InvalidTag, ValueError) as err:
        raise InvalidImage("release: wrapped CEK does not open") from err
