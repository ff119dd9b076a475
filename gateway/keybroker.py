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

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from sqlalchemy.engine import Connection

from gateway.appraisal import AppraisalOutcome
from gateway.kms import Kms
from gateway.ledger import Ledger, LedgerEvent, LedgerKind
from gateway.policy import Policy
from gateway.registry import DeviceRecord, ReceiptRecord, Registry, ReleaseRecord
from protocol import cbor
from protocol.bundles import unwrap_release_cek
from protocol.errors import VerificationError
from protocol.ids import DeviceId, Product, SessionId
from protocol.reasons import ReasonCode, Status
from protocol.results import Lease, Receipt, sign_receipt
from protocol.verifier import RELEASABLE_WARNINGS, KeyRelease

#: Version of the ledger body of a release event.
RELEASE_EVENT_VERSION: Final = 1
#: Unwrapped CEKs kept in memory per broker (one per release; least recently used dropped first).
CEK_CACHE_SIZE: Final = 256

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

    __slots__ = ("_cek_lock", "_ceks", "_kms", "_ledger", "_registry")

    def __init__(self, registry: Registry, ledger: Ledger, kms: Kms) -> None:
        """Release keys held in ``registry`` with the keys of ``kms``; log to ``ledger``."""
        self._registry = registry
        self._ledger = ledger
        self._kms = kms
        self._ceks: OrderedDict[tuple[str, bytes, int], bytes] = OrderedDict()
        self._cek_lock = threading.Lock()

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
        key_release, lease = self._key_and_lease(release, digest, policy, now_s)
        receipt = self._receipt(verdict, release, digest, now_s)
        return BrokeredRelease(key_release=key_release, lease=lease, receipt=receipt)

    def _key_and_lease(
        self, release: ReleaseRecord, digest: bytes, policy: Policy, now_s: int
    ) -> tuple[KeyRelease, Lease]:
        """The unwrapped key of ``release`` and the offline lease the policy grants with it."""
        key_release = KeyRelease(
            cek=self._cek(release, digest),
            manifest_digest=digest,
            release_id=release.release_id,
            image_size=release.size_bytes,
        )
        lease = Lease(
            offline_boots=policy.lease.offline_boots, expires_s=now_s + policy.lease.duration_s
        )
        return key_release, lease

    def release_in(
        self,
        conn: Connection,
        verdict: ReleasableVerdict,
        *,
        policy: Policy,
        now_s: int,
        reread: bool = True,
    ) -> tuple[BrokeredRelease, LedgerEvent]:
        """``release`` inside the caller's write transaction ``conn``: the rule is rechecked
        against the registry as ``conn`` sees it, the receipt is inserted through ``conn``, and
        the release's ledger event is returned for the caller to append in the same transaction
        (``Ledger.append_in``). Nothing is kept unless the caller commits.

        With ``reread`` False the rule is checked again against the release and the epoch the
        verdict carries, without reading them again: for a caller whose transaction read them
        under the lock that serializes every change to them (SQLite's writer lock).

        Raises:
            TypeError: ``verdict`` is not a ``ReleasableVerdict``.
            KeyReleaseRefused: the rule no longer holds against the registry as it is now.
            InvalidImage: the stored wrapped CEK does not open with this gateway's HPKE key.
        """
        if not isinstance(verdict, ReleasableVerdict):
            raise TypeError("KeyBroker.release_in takes a ReleasableVerdict")
        if reread:
            release = self._recheck_in(conn, verdict)
        else:
            release = _recheck_rule(verdict, verdict.release, lambda: verdict.epoch)
        digest = bytes.fromhex(release.release_id)
        key_release, lease = self._key_and_lease(release, digest, policy, now_s)
        signed = self._sign_receipt(verdict, digest, now_s)
        self._registry.record_receipt_in(
            conn,
            ReceiptRecord(verdict.device_id, verdict.session_id, release.release_id, signed, now_s),
        )
        event = LedgerEvent(
            LedgerKind.RELEASE,
            _release_body(verdict.session_id, release.release_id, signed),
            verdict.device_id,
        )
        brokered = BrokeredRelease(key_release=key_release, lease=lease, receipt=signed)
        return brokered, event

    def _cek(self, release: ReleaseRecord, digest: bytes) -> bytes:
        """The release's CEK, unwrapped once per (release, wrapped CEK, HPKE key) and kept."""
        hpke_key = self._kms.hpke_private_key()
        key = (release.release_id, release.wrapped_cek, id(hpke_key))
        with self._cek_lock:
            cached = self._ceks.get(key)
            if cached is not None:
                self._ceks.move_to_end(key)
                return cached
        cek = unwrap_release_cek(release.wrapped_cek, hpke_key, digest)
        with self._cek_lock:
            self._ceks[key] = cek
            while len(self._ceks) > CEK_CACHE_SIZE:
                self._ceks.popitem(last=False)
        return cek

    def _recheck_in(self, conn: Connection, verdict: ReleasableVerdict) -> ReleaseRecord:
        """``_recheck`` inside the caller's transaction."""
        _recheck_device(self._registry.find_device_in(conn, verdict.device_id))
        release = self._registry.find_release_in(conn, verdict.release.release_id)
        return _recheck_rule(
            verdict, release, lambda: self._registry.epoch_in(conn, verdict.product)
        )

    def _sign_receipt(self, verdict: ReleasableVerdict, digest: bytes, now_s: int) -> bytes:
        receipt = Receipt(
            device_id=verdict.device_id,
            session_id=verdict.session_id,
            manifest_digest=digest,
            issued_s=now_s,
        )
        return sign_receipt(receipt, self._kms.result_signer())

    def _recheck(self, verdict: ReleasableVerdict) -> ReleaseRecord:
        """Check the rule again against the registry now, not the appraisal's snapshot."""
        _recheck_device(self._registry.find_device(verdict.device_id))
        release = self._registry.find_release(verdict.release.release_id)
        return _recheck_rule(verdict, release, lambda: self._registry.epoch(verdict.product))

    def _receipt(
        self, verdict: ReleasableVerdict, release: ReleaseRecord, digest: bytes, now_s: int
    ) -> bytes:
        signed = self._sign_receipt(verdict, digest, now_s)
        self._registry.record_receipt(
            verdict.device_id,
            session_id=verdict.session_id,
            release_id=release.release_id,
            receipt=signed,
            now_s=now_s,
        )
        body = _release_body(verdict.session_id, release.release_id, signed)
        self._ledger.append(LedgerKind.RELEASE, body, device=verdict.device_id, now_s=now_s)
        return signed


def _release_body(session_id: SessionId, release_id: str, receipt: bytes) -> bytes:
    """The ledger body of a release event: canonical CBOR."""
    body = {
        "v": RELEASE_EVENT_VERSION,
        "session_id": session_id,
        "release_id": release_id,
        "receipt": receipt,
    }
    # Written in canonical key order by hand (cbor.dumps_ordered): the ledger refuses any other.
    return cbor.dumps_ordered({key: body[key] for key in _RELEASE_BODY_ORDER})


_RELEASE_BODY_ORDER: Final = cbor.canonical_order(("v", "session_id", "release_id", "receipt"))


def _recheck_device(device: DeviceRecord | None) -> None:
    """Refuse a device revoked (or gone) since the appraisal read it."""
    if device is None or device.revoked:
        raise KeyReleaseRefused(
            "key release: the device was revoked after its appraisal read it",
            ReasonCode.DEVICE_REVOKED,
        )


def _recheck_rule(
    verdict: ReleasableVerdict, release: ReleaseRecord | None, current_epoch: Callable[[], int]
) -> ReleaseRecord:
    """The release rule against the release and epoch as the registry holds them now."""
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
        epoch=max(verdict.epoch, current_epoch()),
    )
    return release
