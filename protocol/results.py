"""Signed attestation results, commands and receipts (DESIGN §8, §10).

All three are COSE_Sign1 ES256 (RFC 9052 §4.2) by the gateway result key over a CBOR claims map.
Results have the shape of EAR (draft-ietf-rats-ear §3): the EAT/CWT claim keys ``eat_profile``
(265), ``sub`` (2), ``eat_nonce`` (10), ``iat`` (6), ``exp`` (4) and the EAR keys ``ear.status``
(1000), ``ear.trustworthiness-vector`` (1001), ``ear.verifier-id`` (1004), with one appraisal at the
top level instead of a ``submods`` map (a device is one attester). What EAR lacks travels under
private-use keys below −65536 (RFC 8392 §9.1). ``eat_profile`` is the version field and separates
the three kinds: a signed command never verifies as a result, nor a receipt as either.

Verification is opaque (STYLE.md, "Errors"): any failure — bytes that are not a COSE_Sign1, a bad
signature, the wrong profile, device or session, an expired message, a replayed sequence number —
raises ``InvalidSignedMessage``; its message names which check failed, never key bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from enum import IntEnum, StrEnum
from typing import Final, TypeVar

from cryptography.hazmat.primitives.asymmetric import ec

from protocol import cbor, cose, ids
from protocol.errors import InvalidSignature, InvalidSignedMessage, MalformedMessage
from protocol.ids import DeviceId, ReleaseId, SessionId
from protocol.reasons import REASONS, Claim, ReasonCode, Status, reason_code, worst

PROFILE_RESULT: Final = "tag:edgeseal.example,2026:result/v1"
PROFILE_COMMAND: Final = "tag:edgeseal.example,2026:command/v1"
PROFILE_RECEIPT: Final = "tag:edgeseal.example,2026:receipt/v1"
VERIFIER_DEVELOPER: Final = "edgeseal"

#: Ceiling of a signed result, command or receipt on the wire.
MAX_SIGNED_BYTES: Final = 4096
MAX_REASONS: Final = 64
MAX_VERIFIER_ID: Final = 128
DIGEST_BYTES: Final = 32
_U63: Final = (1 << 63) - 1


class Key(IntEnum):
    """CBOR keys of the signed claims maps (EAT, CWT, EAR and edgeseal private use)."""

    SUB = 2  # RFC 8392 §3.1.2: the device id
    EXP = 4  # RFC 8392 §3.1.4
    IAT = 6  # RFC 8392 §3.1.6
    NONCE = 10  # RFC 9711 eat_nonce: the session id the result answers
    PROFILE = 265  # RFC 9711 eat_profile
    EAR_STATUS = 1000  # draft-ietf-rats-ear §3
    EAR_TRUST_VECTOR = 1001
    EAR_VERIFIER_ID = 1004
    REASONS = -80000
    POLICY_VERSION = -80001
    MANIFEST_DIGEST = -80002
    LEASE = -80003
    SEQ = -80010
    KIND = -80011
    RELEASE_ID = -80012


class Ar4si(IntEnum):
    """Common AR4SI claim values (draft-ietf-rats-ar4si §2.3)."""

    VERIFIER_MALFUNCTION = -1
    NO_CLAIM = 0
    UNEXPECTED_EVIDENCE = 1
    AFFIRMING = 2
    WARNING = 32
    CONTRAINDICATED = 96
    CRYPTO_VALIDATION_FAILED = 99


def tier_of(value: int) -> Status | None:
    """The tier of an AR4SI value: None for −128..1, else affirming 2..31, warning 32..95,
    contraindicated 96..127 (draft-ietf-rats-ar4si §2.3).

    Raises:
        ValueError: ``value`` is outside −128..127.
    """
    if not -128 <= value <= 127:
        raise ValueError(f"AR4SI value: expected -128..127, got {value}")
    if value < Ar4si.AFFIRMING:
        return None
    if value < Ar4si.WARNING:
        return Status.AFFIRMING
    if value < Ar4si.CONTRAINDICATED:
        return Status.WARNING
    return Status.CONTRAINDICATED


def _rank(value: int) -> tuple[int, int]:
    """Order AR4SI values for merging findings: contraindicated > warning > none > affirming."""
    tier = tier_of(value)
    order = {Status.AFFIRMING: 0, None: 1, Status.WARNING: 2, Status.CONTRAINDICATED: 3}
    return (order[tier], value)


@dataclass(frozen=True, slots=True)
class TrustVector:
    """An AR4SI trustworthiness vector (draft-ietf-rats-ar4si §2.3); CBOR keys 0..7 in order."""

    instance_identity: int = 0
    configuration: int = 0
    executables: int = 0
    file_system: int = 0
    hardware: int = 0
    runtime_opaque: int = 0
    storage_opaque: int = 0
    sourced_data: int = 0

    def __post_init__(self) -> None:
        for name in _TRUST_VECTOR_NAMES:
            value = getattr(self, name)
            if type(value) is not int or not -128 <= value <= 127:  # the checked path says why
                cbor.expect_int(value, what=f"trust vector.{name}", lo=-128, hi=127)

    @classmethod
    def baseline(cls) -> TrustVector:
        """What a device passing every check earns: recognized instance, approved configuration
        and executables, genuine hardware, secrets under HUK-derived keys; no other claim."""
        a = int(Ar4si.AFFIRMING)
        return cls(
            instance_identity=a, configuration=a, executables=a, hardware=a, storage_opaque=a
        )

    @classmethod
    def from_reasons(
        cls, reasons: Iterable[ReasonCode], base: TrustVector | None = None
    ) -> TrustVector:
        """Apply each finding's default AR4SI value over ``base`` (default ``baseline()``).

        A finding replaces the base value of its claim; among findings on one claim the worst
        (contraindicated, then warning, then no-claim) wins.
        """
        values = (base or cls.baseline()).as_dict()
        found: dict[Claim, int] = {}
        for code in reasons:
            entry = REASONS[code]
            if entry.claim is not None:
                old = found.get(entry.claim)
                if old is None or _rank(entry.value) > _rank(old):
                    found[entry.claim] = entry.value
        values.update({claim.value: value for claim, value in found.items()})
        return cls(**values)

    def as_dict(self) -> dict[str, int]:
        """The claims by name."""
        return {name: getattr(self, name) for name in _TRUST_VECTOR_NAMES}

    def worst_status(self) -> Status:
        """The worst tier among the claims made (affirming when none is made).

        The tiers rise with the value (``tier_of``): the worst is the highest value's tier, and a
        highest value below 2 (no claim at all) counts as affirming.
        """
        top = max(
            self.instance_identity,
            self.configuration,
            self.executables,
            self.file_system,
            self.hardware,
            self.runtime_opaque,
            self.storage_opaque,
            self.sourced_data,
        )
        if top >= _CONTRAINDICATED_FROM:
            return Status.CONTRAINDICATED
        if top >= _WARNING_FROM:
            return Status.WARNING
        return Status.AFFIRMING

    def to_cbor(self) -> dict[int, int]:
        """The EAR CBOR form: claim index → value, no-claim (0) entries omitted."""
        return {i: v for i, v in enumerate(self.as_dict().values()) if v != Ar4si.NO_CLAIM}

    @classmethod
    def from_cbor(cls, obj: object) -> TrustVector:
        """Read the EAR CBOR form.

        Raises:
            MalformedMessage: not a map of claim index 0..7 to an AR4SI value.
        """
        what = "trust vector"
        entries = cbor.Fields(obj, what=what).only(frozenset(range(8)))
        values: dict[str, int] = {}
        for index, name in enumerate(_TRUST_VECTOR_NAMES):
            value = entries.opt_int(index, lo=-128, hi=127)
            if value is not None:
                values[name] = value
        return cls(**values)


#: The AR4SI claim names in EAR index order (0..7); computed once, read on every result.
_TRUST_VECTOR_NAMES: Final = tuple(field.name for field in fields(TrustVector))
#: Where the warning and contraindicated tiers start (``tier_of``), as plain ints.
_WARNING_FROM: Final = int(Ar4si.WARNING)
_CONTRAINDICATED_FROM: Final = int(Ar4si.CONTRAINDICATED)


@dataclass(frozen=True, slots=True)
class Lease:
    """How long a device may keep running its app without reattesting (DESIGN §8)."""

    #: Boots allowed without the gateway, counted by a fuse counter.
    offline_boots: int
    #: Expiry in gateway time (seconds since the epoch); the board's clock is the attacker's.
    expires_s: int

    def __post_init__(self) -> None:
        cbor.expect_int(self.offline_boots, what="lease.offline_boots", lo=0, hi=0xFFFFFFFF)
        cbor.expect_int(self.expires_s, what="lease.expires_s", lo=0, hi=_U63)


@dataclass(frozen=True, slots=True)
class AttestationResult:
    """The gateway's appraisal of one session, EAR-shaped; the device sees it signed."""

    device_id: DeviceId
    session_id: SessionId
    status: Status
    trust_vector: TrustVector
    reasons: tuple[ReasonCode, ...]
    policy_version: int
    issued_s: int
    expires_s: int
    #: The image the accompanying grant is for (None when no grant).
    manifest_digest: bytes | None
    lease: Lease | None
    verifier_id: str

    def __post_init__(self) -> None:
        what = "result"
        ids.device_id(self.device_id)
        ids.session_id(self.session_id)
        if not isinstance(self.status, Status):
            raise MalformedMessage(f"{what}.status: expected a Status")
        if not isinstance(self.trust_vector, TrustVector):
            raise MalformedMessage(f"{what}.trust_vector: expected a TrustVector")
        _check_reasons(self.reasons, what=f"{what}.reasons")
        cbor.expect_int(self.policy_version, what=f"{what}.policy_version", lo=0, hi=_U63)
        _check_times(self.issued_s, self.expires_s, what=what)
        if self.manifest_digest is not None:
            cbor.expect_bytes(
                self.manifest_digest, what=f"{what}.manifest_digest", size=DIGEST_BYTES
            )
        if self.lease is not None and not isinstance(self.lease, Lease):
            raise MalformedMessage(f"{what}.lease: expected a Lease")
        cbor.expect_str(self.verifier_id, what=f"{what}.verifier_id", max_len=MAX_VERIFIER_ID)
        self._check_consistent()

    def _check_consistent(self) -> None:
        # EAR: the status may not claim more trust than any claim of the vector.
        floor = self.trust_vector.worst_status()
        if worst((self.status, floor)) is not self.status:
            raise MalformedMessage(
                f"result.status: {self.status} is better than the trust vector's {floor}"
            )
        if self.status is Status.CONTRAINDICATED and (
            self.manifest_digest is not None or self.lease is not None
        ):
            raise MalformedMessage("result: a contraindicated result carries no image or lease")

    @property
    def release_id(self) -> ReleaseId | None:
        """The release the grant is for (hex of the manifest digest), if any."""
        return None if self.manifest_digest is None else ids.release_id(self.manifest_digest)


class CommandKind(StrEnum):
    """What a signed command asks of a device (DESIGN §8)."""

    REATTEST = "reattest"
    UPDATE = "update"
    REVOKE = "revoke"


@dataclass(frozen=True, slots=True)
class Command:
    """A signed instruction to one device; ``seq`` strictly increases per device."""

    device_id: DeviceId
    seq: int
    kind: CommandKind
    issued_s: int
    expires_s: int
    #: The release to fetch, for ``update`` only.
    release_id: ReleaseId | None = None

    def __post_init__(self) -> None:
        ids.device_id(self.device_id)
        cbor.expect_int(self.seq, what="command.seq", lo=1, hi=_U63)
        if not isinstance(self.kind, CommandKind):
            raise MalformedMessage("command.kind: expected a CommandKind")
        _check_times(self.issued_s, self.expires_s, what="command")
        if (self.kind is CommandKind.UPDATE) != (self.release_id is not None):
            raise MalformedMessage("command.release_id: required for update, absent otherwise")
        if self.release_id is not None:
            check_release_id(self.release_id, what="command.release_id")


@dataclass(frozen=True, slots=True)
class Receipt:
    """The gateway's signed record that it released a key (DESIGN §10)."""

    device_id: DeviceId
    session_id: SessionId
    manifest_digest: bytes
    issued_s: int

    def __post_init__(self) -> None:
        ids.device_id(self.device_id)
        ids.session_id(self.session_id)
        cbor.expect_bytes(self.manifest_digest, what="receipt.manifest_digest", size=DIGEST_BYTES)
        cbor.expect_int(self.issued_s, what="receipt.issued_s", lo=0, hi=_U63)

    @property
    def release_id(self) -> ReleaseId:
        """The release whose key was released."""
        return ids.release_id(self.manifest_digest)


Signer = ec.EllipticCurvePrivateKey | cose.Es256Signer


def check_release_id(text: object, *, what: str) -> ReleaseId:
    """Validate a release id: 64 lowercase hex digits.

    Raises:
        MalformedMessage: ``text`` is not a release id.
    """
    value = cbor.expect_str(text, what=what, max_len=64)
    if len(value) != 64 or value.strip("0123456789abcdef"):
        raise MalformedMessage(f"{what}: expected 64 lowercase hex digits")
    return ReleaseId(value)


def _check_reasons(reasons: object, *, what: str) -> None:
    if not isinstance(reasons, tuple) or len(reasons) > MAX_REASONS:
        raise MalformedMessage(f"{what}: expected a tuple of at most {MAX_REASONS} codes")
    for code in reasons:
        if not isinstance(code, ReasonCode):
            raise MalformedMessage(f"{what}: expected ReasonCode, got {type(code).__name__}")


def _check_times(issued_s: object, expires_s: object, *, what: str) -> None:
    issued = cbor.expect_int(issued_s, what=f"{what}.issued_s", lo=0, hi=_U63)
    cbor.expect_int(expires_s, what=f"{what}.expires_s", lo=issued, hi=_U63)


# --- encoding -----------------------------------------------------------------------------------


def result_claims(result: AttestationResult) -> dict[int, object]:
    """The CBOR claims map of a result (what ``sign_result`` signs)."""
    claims: dict[int, object] = {
        Key.PROFILE: PROFILE_RESULT,
        Key.SUB: result.device_id,
        Key.NONCE: result.session_id,
        Key.IAT: result.issued_s,
        Key.EXP: result.expires_s,
        Key.EAR_STATUS: result.status.tier,
        Key.EAR_TRUST_VECTOR: result.trust_vector.to_cbor(),
        Key.EAR_VERIFIER_ID: {0: VERIFIER_DEVELOPER, 1: result.verifier_id},
        Key.REASONS: [code.value for code in result.reasons],
        Key.POLICY_VERSION: result.policy_version,
    }
    if result.manifest_digest is not None:
        claims[Key.MANIFEST_DIGEST] = result.manifest_digest
    if result.lease is not None:
        claims[Key.LEASE] = [result.lease.offline_boots, result.lease.expires_s]
    return claims


def _result_from_claims(obj: object) -> AttestationResult:
    f = _claims(obj, PROFILE_RESULT, _RESULT_KEYS)
    verifier = cbor.Fields(f.raw(Key.EAR_VERIFIER_ID), what="result.verifier_id").only({0, 1})
    verifier.get_str(0, max_len=MAX_VERIFIER_ID)
    lease_raw = f.opt_raw(Key.LEASE)
    lease = None
    if lease_raw is not None:
        boots, lease_exp = cbor.expect_list(lease_raw, what="result.lease", length=2)
        lease = Lease(
            offline_boots=cbor.expect_int(boots, what="result.lease.0"),
            expires_s=cbor.expect_int(lease_exp, what="result.lease.1"),
        )
    reasons = f.get_list(Key.REASONS, max_len=MAX_REASONS)
    try:
        status = Status.from_tier(f.get_int(Key.EAR_STATUS))
    except ValueError as err:
        raise MalformedMessage(f"result.status: {err}") from err
    return AttestationResult(
        device_id=ids.device_id(f.get_str(Key.SUB)),
        session_id=ids.session_id(f.get_bytes(Key.NONCE)),
        status=status,
        trust_vector=TrustVector.from_cbor(f.raw(Key.EAR_TRUST_VECTOR)),
        reasons=tuple(reason_code(cbor.expect_str(r, what="result.reasons")) for r in reasons),
        policy_version=f.get_int(Key.POLICY_VERSION),
        issued_s=f.get_int(Key.IAT),
        expires_s=f.get_int(Key.EXP),
        manifest_digest=f.opt_bytes(Key.MANIFEST_DIGEST),
        lease=lease,
        verifier_id=verifier.get_str(1, max_len=MAX_VERIFIER_ID),
    )


def command_claims(command: Command) -> dict[int, object]:
    """The CBOR claims map of a command (what ``sign_command`` signs)."""
    claims: dict[int, object] = {
        Key.PROFILE: PROFILE_COMMAND,
        Key.SUB: command.device_id,
        Key.SEQ: command.seq,
        Key.KIND: command.kind.value,
        Key.IAT: command.issued_s,
        Key.EXP: command.expires_s,
    }
    if command.release_id is not None:
        claims[Key.RELEASE_ID] = command.release_id
    return claims


def _command_from_claims(obj: object) -> Command:
    f = _claims(obj, PROFILE_COMMAND, _COMMAND_KEYS)
    kind_text = f.get_str(Key.KIND, max_len=32)
    try:
        kind = CommandKind(kind_text)
    except ValueError as err:
        raise MalformedMessage(f"command.kind: unknown kind {kind_text!r}") from err
    release = f.opt_raw(Key.RELEASE_ID)
    return Command(
        device_id=ids.device_id(f.get_str(Key.SUB)),
        seq=f.get_int(Key.SEQ),
        kind=kind,
        issued_s=f.get_int(Key.IAT),
        expires_s=f.get_int(Key.EXP),
        release_id=None if release is None else check_release_id(release, what="command.release"),
    )


def receipt_claims(receipt: Receipt) -> dict[int, object]:
    """The CBOR claims map of a receipt (what ``sign_receipt`` signs)."""
    return {
        Key.PROFILE: PROFILE_RECEIPT,
        Key.SUB: receipt.device_id,
        Key.NONCE: receipt.session_id,
        Key.MANIFEST_DIGEST: receipt.manifest_digest,
        Key.IAT: receipt.issued_s,
    }


def _receipt_from_claims(obj: object) -> Receipt:
    f = _claims(obj, PROFILE_RECEIPT, _RECEIPT_KEYS)
    return Receipt(
        device_id=ids.device_id(f.get_str(Key.SUB)),
        session_id=ids.session_id(f.get_bytes(Key.NONCE)),
        manifest_digest=f.get_bytes(Key.MANIFEST_DIGEST),
        issued_s=f.get_int(Key.IAT),
    )


_RESULT_KEYS: Final = frozenset(
    {
        Key.PROFILE, Key.SUB, Key.NONCE, Key.IAT, Key.EXP, Key.EAR_STATUS, Key.EAR_TRUST_VECTOR,
        Key.EAR_VERIFIER_ID, Key.REASONS, Key.POLICY_VERSION, Key.MANIFEST_DIGEST, Key.LEASE,
    }
)  # fmt: skip
_COMMAND_KEYS: Final = frozenset(
    {Key.PROFILE, Key.SUB, Key.SEQ, Key.KIND, Key.IAT, Key.EXP, Key.RELEASE_ID}
)
_RECEIPT_KEYS: Final = frozenset({Key.PROFILE, Key.SUB, Key.NONCE, Key.MANIFEST_DIGEST, Key.IAT})


def _claims(obj: object, profile: str, allowed: frozenset[Key]) -> cbor.Fields:
    f = cbor.Fields(obj, what="claims")
    if f.opt_raw(Key.PROFILE) != profile:
        raise MalformedMessage(f"claims.profile: expected {profile!r}")
    return f.only({int(k) for k in allowed})


# --- signing and verifying ----------------------------------------------------------------------


#: Every claim key in canonical CBOR order: a claims map put in this order is written as it is.
_CLAIM_ORDER: Final = cbor.canonical_order(Key)


def _claims_bytes(claims: dict[int, object]) -> bytes:
    """``cbor.dumps(claims)``, the map put in canonical order here (``cbor.dumps_ordered``): its
    nested maps (trust vector, verifier id) are built in order already."""
    ordered = {key: claims[key] for key in _CLAIM_ORDER if key in claims}
    if len(ordered) != len(claims):  # a key outside ``Key``: let the encoder sort
        return cbor.dumps(claims)
    return cbor.dumps_ordered(ordered)


def sign_result(result: AttestationResult, key: Signer) -> bytes:
    """Sign a result as COSE_Sign1 ES256 with the gateway result key (or an HSM signer)."""
    return cose.sign1_create(_claims_bytes(result_claims(result)), key)


def sign_command(command: Command, key: Signer) -> bytes:
    """Sign a command as COSE_Sign1 ES256 with the gateway result key."""
    return cose.sign1_create(_claims_bytes(command_claims(command)), key)


def sign_receipt(receipt: Receipt, key: Signer) -> bytes:
    """Sign a key-release receipt as COSE_Sign1 ES256 with the gateway result key."""
    return cose.sign1_create(_claims_bytes(receipt_claims(receipt)), key)


def verify_result(
    data: bytes,
    result_public_key: ec.EllipticCurvePublicKey,
    *,
    device_id: DeviceId,
    session_id: SessionId,
    now_s: int,
) -> AttestationResult:
    """Verify a signed result for this device and session at gateway time ``now_s``.

    Raises:
        InvalidSignedMessage: malformed, bad signature, not a result, another device or session,
            or expired (``now_s >= expires_s``).
    """
    result = _decode_signed(data, result_public_key, _result_from_claims, "result")
    if result.device_id != device_id:
        raise InvalidSignedMessage("signed result: wrong device")
    if result.session_id != session_id:
        raise InvalidSignedMessage("signed result: wrong session")
    if now_s >= result.expires_s:
        raise InvalidSignedMessage("signed result: expired")
    return result


def verify_command(
    data: bytes,
    key: ec.EllipticCurvePublicKey,
    *,
    device_id: DeviceId,
    now_s: int,
    last_seq: int,
) -> Command:
    """Verify a signed command for this device, refusing any sequence number already seen.

    Args:
        last_seq: the highest sequence number this device has accepted (0 when none).

    Raises:
        InvalidSignedMessage: malformed, bad signature, not a command, another device, expired,
            or ``seq <= last_seq`` ("replayed sequence number").
    """
    command = _decode_signed(data, key, _command_from_claims, "command")
    if command.device_id != device_id:
        raise InvalidSignedMessage("signed command: wrong device")
    if command.seq <= last_seq:
        raise InvalidSignedMessage("signed command: replayed sequence number")
    if now_s >= command.expires_s:
        raise InvalidSignedMessage("signed command: expired")
    return command


def verify_receipt(data: bytes, key: ec.EllipticCurvePublicKey) -> Receipt:
    """Verify a signed receipt (receipts do not expire).

    Raises:
        InvalidSignedMessage: malformed, bad signature or not a receipt.
    """
    return _decode_signed(data, key, _receipt_from_claims, "receipt")


_T = TypeVar("_T")


def _decode_signed(
    data: bytes, key: ec.EllipticCurvePublicKey, parse: Callable[[object], _T], what: str
) -> _T:
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise TypeError("the result key is a P-256 public key")
    try:
        if not isinstance(data, bytes) or len(data) > MAX_SIGNED_BYTES:
            raise MalformedMessage(f"signed {what}: expected at most {MAX_SIGNED_BYTES} bytes")
        parsed = cose.sign1_parse_unverified(data)
        if parsed.alg is not cose.Algorithm.ES256:
            raise MalformedMessage(f"signed {what}: expected ES256")
        cose.verify_parsed(parsed, key)
        return parse(cbor.loads(parsed.payload, what=what, max_bytes=MAX_SIGNED_BYTES))
    except InvalidSignature as err:
        raise InvalidSignedMessage(f"signed {what}: signature does not verify") from err
    except MalformedMessage as err:
        raise InvalidSignedMessage(f"signed {what}: malformed") from err
