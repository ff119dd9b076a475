"""Stable reason codes, result statuses and what each code contributes (DESIGN §10).

Reason codes are wire identifiers: dotted, lowercase, frozen once shipped (never renamed, never
reused). The appraisal collects every finding as a ``ReasonCode``; the device receives the codes
only, the explainer adds the human text. ``REASONS`` says, per code, its default severity (hence
its contribution to the EAR status) and which AR4SI trustworthiness claim it sets to which value
(draft-ietf-rats-ar4si §2.3; the numbers are those of the draft, see ``results.Ar4si``).

Status follows EAR (draft-ietf-rats-ear §3, ``ear.status``): ``affirming`` / ``warning`` /
``contraindicated``, carried in CBOR as the AR4SI tier numbers 2 / 32 / 96.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from protocol.errors import MalformedMessage


class Status(StrEnum):
    """The overall verdict of an appraisal (EAR ``ear.status``), best to worst."""

    AFFIRMING = "affirming"
    WARNING = "warning"
    CONTRAINDICATED = "contraindicated"

    @property
    def tier(self) -> int:
        """The AR4SI tier number of this status (draft-ietf-rats-ar4si §2.3): 2, 32 or 96."""
        return _STATUS_TIER[self]

    @classmethod
    def from_tier(cls, tier: int) -> Status:
        """The status whose tier number is ``tier``.

        Raises:
            ValueError: ``tier`` is not 2, 32 or 96.
        """
        for status, number in _STATUS_TIER.items():
            if number == tier:
                return status
        raise ValueError(f"status tier: expected 2, 32 or 96, got {tier}")


_STATUS_TIER: Final = MappingProxyType(
    {Status.AFFIRMING: 2, Status.WARNING: 32, Status.CONTRAINDICATED: 96}
)
_STATUS_RANK: Final = MappingProxyType(
    {Status.AFFIRMING: 0, Status.WARNING: 1, Status.CONTRAINDICATED: 2}
)


def worst(statuses: Iterable[Status]) -> Status:
    """The worst of ``statuses`` (affirming when empty)."""
    return max(statuses, key=_STATUS_RANK.__getitem__, default=Status.AFFIRMING)


class Severity(StrEnum):
    """How much a finding weighs: ``fatal`` refuses the key, ``warning`` may still release it."""

    INFO = "info"
    WARNING = "warning"
    FATAL = "fatal"

    @property
    def status(self) -> Status:
        """The status this severity contributes on its own."""
        return _SEVERITY_STATUS[self]


_SEVERITY_STATUS: Final = MappingProxyType(
    {
        Severity.INFO: Status.AFFIRMING,
        Severity.WARNING: Status.WARNING,
        Severity.FATAL: Status.CONTRAINDICATED,
    }
)


class Claim(StrEnum):
    """The AR4SI trustworthiness claims (draft-ietf-rats-ar4si §2.3)."""

    INSTANCE_IDENTITY = "instance_identity"
    CONFIGURATION = "configuration"
    EXECUTABLES = "executables"
    FILE_SYSTEM = "file_system"
    HARDWARE = "hardware"
    RUNTIME_OPAQUE = "runtime_opaque"
    STORAGE_OPAQUE = "storage_opaque"
    SOURCED_DATA = "sourced_data"


class ReasonCode(StrEnum):
    """A stable, dotted finding of the appraisal; the value is the wire name."""

    # The evidence token itself (RFC 9783).
    EVIDENCE_MALFORMED = "evidence.malformed"
    EVIDENCE_SIGNATURE_INVALID = "evidence.signature.invalid"
    EVIDENCE_BINDING_MISMATCH = "evidence.binding.mismatch"
    EVIDENCE_PROFILE_UNSUPPORTED = "evidence.profile.unsupported"
    # The device certificates and identity.
    CERTIFICATE_UNTRUSTED = "certificate.untrusted"
    CERTIFICATE_EXPIRED = "certificate.expired"
    CERTIFICATE_DEBUG_CLASS = "certificate.debug_class"
    CERTIFICATE_MISMATCH = "certificate.mismatch"
    DEVICE_UNKNOWN = "device.unknown"
    DEVICE_REVOKED = "device.revoked"
    # Freshness.
    CHALLENGE_INVALID = "challenge.invalid"
    CHALLENGE_EXPIRED = "challenge.expired"
    NONCE_REPLAYED = "nonce.replayed"
    # Lifecycle (RFC 9783 §4.2.3; compared as value >> 8).
    LIFECYCLE_DEBUG = "lifecycle.debug"
    LIFECYCLE_NOT_SECURED = "lifecycle.not_secured"
    # Boot chain against reference values.
    BOOT_MEASUREMENT_MISMATCH = "boot.measurement.mismatch"
    BOOT_BL2_MISMATCH = "boot.bl2.mismatch"
    BOOT_RUNTIME_MISMATCH = "boot.runtime.mismatch"
    BOOT_SIGNER_MISMATCH = "boot.signer.mismatch"
    BOOT_STAGE_MISSING = "boot.stage.missing"
    BOOT_STAGE_ROLLBACK = "boot.stage.rollback"
    # The application and its releases.
    APP_NOT_ASSIGNED = "app.not_assigned"
    APP_UNKNOWN_RELEASE = "app.unknown_release"
    APP_NO_RELEASE = "app.no_release"
    IMAGE_BELOW_EPOCH = "image.below_epoch"
    # Anti-rollback counters (DESIGN §5).
    COUNTER_ROLLBACK = "counter.rollback"
    COUNTER_BELOW_EPOCH = "counter.below_epoch"
    # Platform flags against policy.
    PLATFORM_SECURE_BOOT_OFF = "platform.secure_boot_off"
    PLATFORM_DEBUG_PORT_OPEN = "platform.debug_port_open"
    PLATFORM_SMT_ENABLED = "platform.smt_enabled"
    # The verifier's own state.
    POLICY_VIOLATION = "policy.violation"
    RATE_LIMITED = "rate.limited"
    INTERNAL_ERROR = "internal.error"


@dataclass(frozen=True, slots=True)
class ReasonInfo:
    """What a reason code means by default: severity, AR4SI contribution and one line for people."""

    code: ReasonCode
    severity: Severity
    #: The AR4SI claim this finding sets, or None when it concerns no claim (freshness, rate).
    claim: Claim | None
    #: The AR4SI value it sets that claim to (draft-ietf-rats-ar4si §2.3).
    value: int
    description: str

    @property
    def status(self) -> Status:
        """The status this finding contributes."""
        return self.severity.status


_F, _W = Severity.FATAL, Severity.WARNING
_C = Claim
_TABLE: Final[tuple[tuple[ReasonCode, Severity, Claim | None, int, str], ...]] = (
    (ReasonCode.EVIDENCE_MALFORMED, _F, _C.INSTANCE_IDENTITY, 1,
     "The evidence is not a well-formed attestation token."),
    (ReasonCode.EVIDENCE_SIGNATURE_INVALID, _F, _C.INSTANCE_IDENTITY, 99,
     "The token signature does not verify under the device's attestation key."),
    (ReasonCode.EVIDENCE_BINDING_MISMATCH, _F, _C.INSTANCE_IDENTITY, 99,
     "The token nonce does not bind this challenge and enclave key."),
    (ReasonCode.EVIDENCE_PROFILE_UNSUPPORTED, _F, _C.INSTANCE_IDENTITY, 1,
     "The token uses a PSA profile this verifier does not accept."),
    (ReasonCode.CERTIFICATE_UNTRUSTED, _F, _C.INSTANCE_IDENTITY, 97,
     "The device certificate does not chain to a trusted manufacturer CA."),
    (ReasonCode.CERTIFICATE_EXPIRED, _F, _C.INSTANCE_IDENTITY, 96,
     "The device certificate is outside its validity period."),
    (ReasonCode.CERTIFICATE_DEBUG_CLASS, _F, _C.INSTANCE_IDENTITY, 96,
     "The token is signed by the debug-class attestation key."),
    (ReasonCode.CERTIFICATE_MISMATCH, _F, _C.INSTANCE_IDENTITY, 96,
     "The token's instance id is not the enrolled attestation key of this device."),
    (ReasonCode.DEVICE_UNKNOWN, _F, _C.INSTANCE_IDENTITY, 97,
     "No device with this id is enrolled."),
    (ReasonCode.DEVICE_REVOKED, _F, _C.INSTANCE_IDENTITY, 96,
     "The device has been revoked."),
    (ReasonCode.CHALLENGE_INVALID, _F, None, 0,
     "The challenge was not issued by this gateway for this device and session."),
    (ReasonCode.CHALLENGE_EXPIRED, _F, None, 0,
     "The challenge expired before the evidence arrived."),
    (ReasonCode.NONCE_REPLAYED, _F, None, 0,
     "The challenge has already been used; the device must start a new session."),
    (ReasonCode.LIFECYCLE_DEBUG, _F, _C.CONFIGURATION, 96,
     "The device lifecycle is a debug state (debug unlocked)."),
    (ReasonCode.LIFECYCLE_NOT_SECURED, _F, _C.CONFIGURATION, 96,
     "The device lifecycle is not SECURED (e.g. provisioning or decommissioned)."),
    (ReasonCode.BOOT_MEASUREMENT_MISMATCH, _F, _C.EXECUTABLES, 33,
     "A software component's measurement matches no reference value."),
    (ReasonCode.BOOT_BL2_MISMATCH, _F, _C.EXECUTABLES, 33,
     "The BL2 measurement matches no manufacturer reference value."),
    (ReasonCode.BOOT_RUNTIME_MISMATCH, _F, _C.EXECUTABLES, 33,
     "The runtime stage measurement matches no manufacturer reference value."),
    (ReasonCode.BOOT_SIGNER_MISMATCH, _F, _C.EXECUTABLES, 33,
     "A boot stage is signed by a key other than the expected one."),
    (ReasonCode.BOOT_STAGE_MISSING, _F, _C.EXECUTABLES, 33,
     "A required boot stage is absent from the software components."),
    (ReasonCode.BOOT_STAGE_ROLLBACK, _F, _C.EXECUTABLES, 32,
     "A boot stage is a genuine but older version than policy allows."),
    (ReasonCode.APP_NOT_ASSIGNED, _F, _C.EXECUTABLES, 96,
     "The requested or running release is not assigned to this device's product."),
    (ReasonCode.APP_UNKNOWN_RELEASE, _F, _C.EXECUTABLES, 33,
     "The application measurement is no known release."),
    (ReasonCode.APP_NO_RELEASE, _W, None, 0,
     "No release is available for this device; nothing to grant."),
    (ReasonCode.IMAGE_BELOW_EPOCH, _F, _C.EXECUTABLES, 32,
     "The requested image's security counter is below its product's epoch."),
    (ReasonCode.COUNTER_ROLLBACK, _F, _C.HARDWARE, 96,
     "A fuse counter is lower than the gateway has seen before (clone or forgery)."),
    (ReasonCode.COUNTER_BELOW_EPOCH, _W, _C.EXECUTABLES, 32,
     "The device's fuse counter is below its product's epoch; it needs the update."),
    (ReasonCode.PLATFORM_SECURE_BOOT_OFF, _F, _C.CONFIGURATION, 96,
     "Secure boot is off in the fuses: unsigned boot stages can run."),
    (ReasonCode.PLATFORM_DEBUG_PORT_OPEN, _F, _C.CONFIGURATION, 96,
     "The debug port is open."),
    (ReasonCode.PLATFORM_SMT_ENABLED, _W, _C.RUNTIME_OPAQUE, 32,
     "Simultaneous multithreading is on (side-channel exposure)."),
    (ReasonCode.POLICY_VIOLATION, _F, _C.CONFIGURATION, 96,
     "A policy rule not covered by a more specific code failed."),
    (ReasonCode.RATE_LIMITED, _F, None, 0,
     "Too many attestation attempts; retry later."),
    (ReasonCode.INTERNAL_ERROR, _F, None, 0,
     "The verifier failed internally; the appraisal is not a judgement of the device."),
)  # fmt: skip

#: Every code's default meaning, in declaration order.
REASONS: Final[MappingProxyType[ReasonCode, ReasonInfo]] = MappingProxyType(
    {row[0]: ReasonInfo(*row) for row in _TABLE}
)


def info(code: ReasonCode) -> ReasonInfo:
    """The default meaning of ``code``."""
    return REASONS[code]


def status_of(reasons: Iterable[ReasonCode]) -> Status:
    """The status the findings ``reasons`` contribute by default (affirming when none)."""
    return worst(REASONS[code].status for code in reasons)


def reason_code(text: str) -> ReasonCode:
    """Parse a wire reason code.

    Raises:
        MalformedMessage: ``text`` is not a known reason code.
    """
    try:
        return ReasonCode(text)
    except ValueError as err:
        raise MalformedMessage(f"reason code: unknown code {text!r:.80}") from err
