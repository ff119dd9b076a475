"""Boot-stage images: BL2 and the runtime stage, signed by the ROTPK (DESIGN §3, §4, §5).

A stage image is ``tag 55799 [format id, payload, signature / null]`` (docs/image-format.md §4).
The payload is the stage itself (kind, version, counter, code and, for the runtime stage, its trust
anchors); its measurement is the SHA-256 of the payload bytes, the same signed or not. The signature
is a COSE_Sign1 whose kid is the ROTPK's SEC1 point and whose payload is the statement
``["edgeseal/stage/v1", kind, measurement]``, so the code is stored once. ``verify_stage`` checks
that point against the ROTPK hash from the fuses, then the signature, then the statement.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec

from protocol import cbor, cose, keys
from protocol.errors import InvalidImage, InvalidSignature, MalformedMessage
from protocol.image import check_version_text, es256_signer_and_point

#: Format id of the stage envelope: "ESS" ‖ version 1.
STAGE_FORMAT_ID: Final = 0x45535301
STAGE_FORMAT_VERSION: Final = 1
#: tag 55799, array(3), uint32 format id: the 9 fixed bytes every stage image starts with.
STAGE_PREFIX: Final = b"\xd9\xd9\xf7\x83\x1a" + STAGE_FORMAT_ID.to_bytes(4, "big")
STAGE_STATEMENT_CONTEXT: Final = "edgeseal/stage/v1"
MAX_STAGE_CODE_BYTES: Final = 1 << 20
MAX_STAGE_BYTES: Final = MAX_STAGE_CODE_BYTES + (1 << 14)
MAX_VENDOR_SIGNERS: Final = 64
MAX_COUNTER: Final = 0xFFFF_FFFF
POINT_BYTES: Final = 65
UNSIGNED_SIGNER_ID: Final = bytes(32)

_STAGE_KEYS: Final[frozenset[cbor.Key]] = frozenset({1, 2, 3, 4, 5, 6})
_ANCHOR_KEYS: Final[frozenset[cbor.Key]] = frozenset({1, 2})


class StageKind(StrEnum):
    """Which boot stage; the value is also its PSA software component type (DESIGN §5)."""

    BL2 = "BL2"
    RUNTIME = "RT"


@dataclass(frozen=True, slots=True)
class TrustAnchors:
    """What the enclave runtime trusts, carried inside the signed runtime stage (DESIGN §4)."""

    vendor_signer_ids: tuple[bytes, ...]
    gateway_result_key: bytes

    def __post_init__(self) -> None:
        what = "stage.trust_anchors"
        if len(self.vendor_signer_ids) > MAX_VENDOR_SIGNERS:
            raise MalformedMessage(f"{what}.vendor_signer_ids: more than {MAX_VENDOR_SIGNERS}")
        for signer in self.vendor_signer_ids:
            if not isinstance(signer, bytes) or len(signer) != 32:
                raise MalformedMessage(f"{what}.vendor_signer_ids: expected 32-byte ids")
        if not isinstance(self.gateway_result_key, bytes) or len(self.gateway_result_key) != 65:
            raise MalformedMessage(f"{what}.gateway_result_key: expected a 65-byte SEC1 point")
        keys.p256_from_point(self.gateway_result_key)

    def result_key(self) -> ec.EllipticCurvePublicKey:
        """The gateway result key as a public key object."""
        return keys.p256_from_point(self.gateway_result_key)


@dataclass(frozen=True, slots=True)
class BootStage:
    """One boot stage: the Python source the enclave runtime executes, with its version and counter.

    Only the runtime stage carries trust anchors, and it must.
    """

    kind: StageKind
    version: str
    security_counter: int
    code: bytes
    trust_anchors: TrustAnchors | None = None

    def __post_init__(self) -> None:
        what = "stage"
        if not isinstance(self.kind, StageKind):
            raise MalformedMessage(f"{what}.kind: expected a StageKind")
        check_version_text(self.version, what=f"{what}.version")
        counter = self.security_counter
        if isinstance(counter, bool) or not isinstance(counter, int):
            raise MalformedMessage(f"{what}.security_counter: expected an integer")
        if not 0 <= counter <= MAX_COUNTER:
            raise MalformedMessage(f"{what}.security_counter: expected 0..{MAX_COUNTER}")
        if not isinstance(self.code, bytes) or len(self.code) > MAX_STAGE_CODE_BYTES:
            raise MalformedMessage(f"{what}.code: expected at most {MAX_STAGE_CODE_BYTES} bytes")
        if (self.trust_anchors is None) != (self.kind is StageKind.BL2):
            raise MalformedMessage(f"{what}.trust_anchors: required for RT, forbidden for BL2")

    def encode(self) -> bytes:
        """The stage payload (canonical CBOR map, docs/image-format.md §4)."""
        body: dict[int, object] = {
            1: STAGE_FORMAT_VERSION,
            2: str(self.kind),
            3: self.version,
            4: self.security_counter,
            5: self.code,
        }
        if self.trust_anchors is not None:
            body[6] = {
                1: list(self.trust_anchors.vendor_signer_ids),
                2: self.trust_anchors.gateway_result_key,
            }
        return cbor.dumps(body)

    @classmethod
    def decode(cls, data: bytes) -> BootStage:
        """Decode a stage payload.

        Raises:
            MalformedMessage: not a well-formed version-1 stage payload.
        """
        f = cbor.Fields(
            cbor.loads(data, what="stage", max_bytes=MAX_STAGE_BYTES), what="stage"
        ).only(_STAGE_KEYS)
        f.get_int(1, lo=STAGE_FORMAT_VERSION, hi=STAGE_FORMAT_VERSION)
        kind_text = f.get_str(2, max_len=8)
        try:
            kind = StageKind(kind_text)
        except ValueError as err:
            raise MalformedMessage(f"stage.kind: expected BL2 or RT, got {kind_text!r}") from err
        anchors = None
        if 6 in f:
            a = f.get_map(6).only(_ANCHOR_KEYS)
            ids = a.get_list(1, max_len=MAX_VENDOR_SIGNERS)
            anchors = TrustAnchors(
                vendor_signer_ids=tuple(cbor.expect_bytes(i, what=a.name(1), size=32) for i in ids),
                gateway_result_key=a.get_bytes(2, size=POINT_BYTES),
            )
        return cls(
            kind=kind,
            version=f.get_str(3, max_len=32),
            security_counter=f.get_int(4),
            code=f.get_bytes(5, max_size=MAX_STAGE_CODE_BYTES),
            trust_anchors=anchors,
        )


@dataclass(frozen=True, slots=True)
class ParsedStage:
    """A parsed, UNVERIFIED stage image: the payload bytes, their decoding, the signature if any."""

    payload: bytes
    stage: BootStage
    signature: bytes | None


def _statement(kind: StageKind, measurement: bytes) -> bytes:
    return cbor.dumps([STAGE_STATEMENT_CONTEXT, str(kind), measurement])


def build_stage(
    stage: BootStage,
    rotpk: ec.EllipticCurvePrivateKey | cose.Es256Signer | None,
    *,
    rotpk_public: ec.EllipticCurvePublicKey | None = None,
) -> bytes:
    """The flash image of a stage, signed by the ROTPK, or unsigned when ``rotpk`` is None.

    ``rotpk_public`` is needed only when ``rotpk`` is an ``Es256Signer``.

    Raises:
        TypeError: an ``Es256Signer`` without ``rotpk_public``.
    """
    payload = stage.encode()
    signature = None
    if rotpk is not None:
        signer, point = es256_signer_and_point(rotpk, rotpk_public, what="rotpk")
        statement = _statement(stage.kind, hashlib.sha256(payload).digest())
        signature = cose.sign1_create(statement, signer, kid=point)
    return cbor.dumps(cbor.tagged(55799, [STAGE_FORMAT_ID, payload, signature]))


def parse_unverified_stage(data: bytes) -> ParsedStage:
    """Parse a stage image without verifying it.

    Raises:
        MalformedMessage: not a well-formed version-1 stage image.
    """
    what = "stage image"
    if not isinstance(data, bytes) or not data.startswith(STAGE_PREFIX):
        raise MalformedMessage(f"{what}: expected the magic {STAGE_PREFIX.hex()} at offset 0")
    items = cbor.expect_list(
        cbor.loads(data, what=what, max_bytes=MAX_STAGE_BYTES), what=what, length=3
    )
    payload = cbor.expect_bytes(items[1], what=f"{what}.payload", max_size=MAX_STAGE_BYTES)
    stage = BootStage.decode(payload)
    signature = items[2]
    if signature is not None:
        signature = cbor.expect_bytes(signature, what=f"{what}.signature", max_size=1024)
        _parse_signature(signature)
    return ParsedStage(payload=payload, stage=stage, signature=signature)


def _parse_signature(signature: bytes) -> tuple[cose.CoseMessage, bytes, StageKind, bytes]:
    """Parse a stage signature; return the message, the signer's point, the kind and measurement."""
    what = "stage image.signature"
    if signature[:1] != b"\xd2":
        raise MalformedMessage(f"{what}: expected a COSE_Sign1 with tag 18")
    parsed = cose.sign1_parse_unverified(signature)
    if parsed.alg is not cose.Algorithm.ES256:
        raise MalformedMessage(f"{what}: expected ES256, got {int(parsed.alg)}")
    point = parsed.kid
    if point is None or len(point) != POINT_BYTES:
        raise MalformedMessage(f"{what}.kid: expected the 65-byte SEC1 point of the ROTPK")
    context, kind_text, measurement = cbor.expect_list(
        cbor.loads(parsed.payload, what=f"{what}.payload", max_bytes=256),
        what=f"{what}.payload",
        length=3,
    )
    if context != STAGE_STATEMENT_CONTEXT:
        raise MalformedMessage(f"{what}.payload: expected context {STAGE_STATEMENT_CONTEXT!r}")
    try:
        kind = StageKind(cbor.expect_str(kind_text, what=f"{what}.kind", max_len=8))
    except ValueError as err:
        raise MalformedMessage(f"{what}.kind: expected BL2 or RT") from err
    digest = cbor.expect_bytes(measurement, what=f"{what}.measurement", size=32)
    return parsed, point, kind, digest


def stage_measurement(parsed: ParsedStage) -> bytes:
    """SHA-256 of the stage payload bytes: the stage's measurement, signed or not (DESIGN §5)."""
    return hashlib.sha256(parsed.payload).digest()


def stage_signer_id(parsed: ParsedStage) -> bytes:
    """SHA-256 of the signer's SEC1 point as carried (unverified); 32 zero bytes when unsigned."""
    if parsed.signature is None:
        return UNSIGNED_SIGNER_ID
    _, point, _, _ = _parse_signature(parsed.signature)
    return hashlib.sha256(point).digest()


def verify_stage(parsed: ParsedStage, rotpk_hash: bytes) -> ec.EllipticCurvePublicKey:
    """Verify a stage against the ROTPK hash from the fuses; return the ROTPK.

    Raises:
        InvalidImage: unsigned, signed by a key whose hash is not ``rotpk_hash``, a signature that
            does not verify, or a statement for other bytes or another kind of stage.
    """
    if parsed.signature is None:
        raise InvalidImage("boot stage: unsigned")
    try:
        message, point, kind, measurement = _parse_signature(parsed.signature)
        if not hmac.compare_digest(hashlib.sha256(point).digest(), rotpk_hash):
            raise InvalidImage("boot stage: signed by a key other than the ROTPK")
        rotpk = keys.p256_from_point(point)
        cose.verify_parsed(message, rotpk)
    except (MalformedMessage, InvalidSignature) as err:
        raise InvalidImage("boot stage: signature does not verify") from err
    if kind is not parsed.stage.kind or not hmac.compare_digest(
        measurement, stage_measurement(parsed)
    ):
        raise InvalidImage("boot stage: signature is for another stage")
    return rotpk
