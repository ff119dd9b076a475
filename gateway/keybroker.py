"""The key broker: typed, twice-checked key release with a signed receipt (DESIGN §5, §10).

The release rule: a key is released only for

- an affirming verdict with no finding, or
- a warning whose only finding is ``counter.below_epoch`` (the device needs exactly this update),
  or a warning made under the policy's test-only ``skip_measurement_checks`` whose reason codes
  are at most that one,

and only for an image of the device's product at or above the product's security epoch. Images
below the epoch are never released.

The rule lives in the types: ``KeyBroker.release`` takes a ``ReleasableVerdict``, which only
``releasable_verdict`` can construct (any other construction raises ``TypeError``), and whose
constructor checks the rule. ``KeyBroker.release`` checks it again at run time against the registry
as it is then (the epoch may have been raised since the appraisal) and raises
``KeyReleaseRefused`` if it no longer holds. The verifier session checks it a third time
(``protocol.verifier.may_release``) before sealing the grant.

A release unwraps the release's CEK (stored HPKE-wrapped to the gateway's HPKE key,
``protocol.bundles.unwrap_release_cek``), signs a ``Receipt`` with the KMS result key, records it
in the registry and appends it to the ledger, and attaches the policy's offline lease.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from gateway.appraisal import AppraisalOutcome
from gateway.kms import Kms
from gateway.ledger import Ledger, LedgerKind
from gateway.policy import Policy
from gateway.registry import Registry, ReleaseRecord
from protocol import cbor
from protocol.bundles import unwrap_release_cek
from protocol.errors import VerificationError
from protocol.ids import DeviceId, Product, SessionId
from protocol.reasons import ReasonCode, Status
from protocol.results import Lease, Receipt, sign_receipt
from protocol.verifier import RELEASABLE_WARNINGS, KeyRelease

#: Version of the ledger body of a release event.
RELEASE_EVENT_VERSION: Final = 1

_SEAL: Final = object()


class KeyReleaseRefused(VerificationError):
    """A key release the rule forbids was attempted; no key left the broker.

    Raised by ``ReleasableVerdict`` (the rule does not hold) and ``KeyBroker.release`` (it no
    longer holds at run time: the epoch was raised or the release removed since the appraisal).
    ``code`` is the finding it amounts to. Refuse the session; the device will attest again.
    """

    def __init__(self, message: str, code: ReasonCode) -> None:
        super().__init__(message)
        self.code = code


def check_release_rule(
    *,
    status: Status,
    reasons: tuple[ReasonCode, ...],
    measurements_skipped: bool,
    release: ReleaseRecord,
    product: Product,
    epoch: int,
) -> None:
    """Check the release rule of the module docstring.

    Raises:
        KeyReleaseRefused: the rule does not hold.
    """
    if status is Status.AFFIRMING:
        allowed = not reasons and not measurements_skipped
    elif status is Status.WARNING:
        allowed = set(reasons) <= RELEASABLE_WARNINGS and (bool(reasons) or measurements_skipped)
    else:
        allowed = False
    if not allowed:
        codes = ", ".join(code.value for code in reasons) or "none"
        raise KeyReleaseRefused(
            f"key release: a {status} verdict (reasons: {codes}) releases no key",
            ReasonCode.POLICY_VIOLATION,
        )
    if release.product != product:
        raise KeyReleaseRefused(
            "key release: the release is for another product", ReasonCode.APP_NOT_ASSIGNED
        )
    if release.security_counter < epoch:
        raise KeyReleaseRefused(
            f"key release: security counter {release.security_counter} is below the epoch {epoch}",
            ReasonCode.IMAGE_BELOW_EPOCH,
        )


@dataclass(frozen=True, slots=True)
class ReleasableVerdict:
    """A verdict that meets the release rule; made only by ``releasable_verdict``."""

    device_id: DeviceId
    session_id: SessionId
    product: Product
    status: Status
    reasons: tuple[ReasonCode, ...]
    measurements_skipped: bool
    release: ReleaseRecord
    epoch: int
    _seal: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._seal is not _SEAL:
            raise TypeError("a ReleasableVerdict is made only by keybroker.releasable_verdict()")
        check_release_rule(
            status=self.status,
            reasons=self.reasons,
            measurements_skipped=self.measurements_skipped,
            release=self.release,
            product=self.product,
            epoch=self.epoch,
        )


def releasable_verdict(outcome: AppraisalOutcome) -> ReleasableVerdict | None:
    """The outcome as a ``ReleasableVerdict``, or None when the release rule refuses it."""
    if outcome.release is None or outcome.product is None:
        return None
    try:
        return ReleasableVerdict(
            device_id=outcome.device_id,
            session_id=outcome.session_id,
            product=outcome.product,
            status=outcome.status,
            reasons=outcome.reasons,
            measurements_skipped=outcome.measurements_skipped,
            release=outcome.release,
            epoch=outcome.epoch,
            _seal=_SEAL,
        )
    except KeyReleaseRefused:
        return None


@dataclass(frozen=True, slots=True)
class BrokeredRelease:
    """What the broker hands the verifier session: the key, the lease and the signed receipt."""

    key_release: KeyRelease
    lease: Lease
    receipt: bytes


class KeyBroker:
    """Releases image keys for releasable verdicts, with receipts in the registry and ledger."""

    __slots__ = ("_kms", "_ledger", "_registry")

    def __init__(self, registry: Registry, ledger: Ledger, kms: Kms) -> None:
        """Release keys held in ``registry`` with the keys of ``kms``; log to ``ledger``."""
        self._registry = registry
        self._ledger = ledger
        self._kms = kms

    def release(self, verdict: ReleasableVerdict, *, policy: Policy, now_s: int) -> BrokeredRelease:
        """Unwrap the release's CEK, sign and record a receipt, attach the policy's lease.

        Raises:
            TypeError: ``verdict`` is not a ``ReleasableVerdict``.
            KeyReleaseRefused: the rule no longer holds against the registry as it is now.
            InvalidImage: the stored wrapped CEK does not open with this gateway's HPKE key.
        """
        if not isinstance(verdict, ReleasableVerdict):
            raise TypeError("KeyBroker.release takes a ReleasableVerdict")
        release = self._recheck(verdict)
        digest = bytes.fromhex(release.release_id)
        cek = unwrap_release_cek(release.wrapped_cek, self._kms.hpke_private_key(), digest)
        key_release = KeyRelease(
            cek=cek,
            manifest_digest=digest,
            release_id=release.release_id,
            image_size=release.size_bytes,
        )
        lease = Lease(
            offline_boots=policy.lease.offline_boots, expires_s=now_s + policy.lease.duration_s
        )
        receipt = self._receipt(verdict, release, digest, now_s)
        return BrokeredRelease(key_release=key_release, lease=lease, receipt=receipt)

    def _recheck(self, verdict: ReleasableVerdict) -> ReleaseRecord:
        """Check the rule again against the registry now, not the appraisal's snapshot."""
        release = self._registry.find_release(verdict.release.release_id)
        if release is None:
            raise KeyReleaseRefused(
                "key release: the release is no longer in the registry",
                ReasonCode.APP_UNKNOWN_RELEASE,
            )
        check_release_rule(
            status=verdict.status,
            reasons=verdict.reasons,
            measurements_skipped=verdict.measurements_skipped,
            release=release,
            product=verdict.product,
            epoch=max(verdict.epoch, self._registry.epoch(verdict.product)),
        )
        return release

    def _receipt(
        self, verdict: ReleasableVerdict, release: ReleaseRecord, digest: bytes, now_s: int
    ) -> bytes:
        receipt = Receipt(
            device_id=verdict.device_id,
            session_id=verdict.session_id,
            manifest_digest=digest,
            issued_s=now_s,
        )
        signed = sign_receipt(receipt, self._kms.result_signer())
        self._registry.record_receipt(
            verdict.device_id,
            session_id=verdict.session_id,
            release_id=release.release_id,
            receipt=signed,
            now_s=now_s,
        )
        body = {
            "v": RELEASE_EVENT_VERSION,
            "session_id": verdict.session_id,
            "release_id": release.release_id,
            "receipt": signed,
        }
        self._ledger.append(
            LedgerKind.RELEASE, cbor.dumps(body), device=verdict.device_id, now_s=now_s
        )
        return signed
