"""The gateway's ``VerifierHooks``: enrollment, single use and appraisal over the registry.

``RegistryHooks`` implements ``protocol.verifier.VerifierHooks`` (DESIGN §9, §10):

- ``device_keys``: the enrolled IAK points of both lifecycle classes;
- ``appraise``: single use of the challenge through the registry's primary key (atomic across
  every gateway process sharing the database), the appraisal (``gateway.appraisal``) under the
  policy in force, then the key broker (``gateway.keybroker``) when the release rule holds; the
  verdict — status, reasons, policy version, explanation — is recorded in the registry and
  appended to the ledger, and a non-contraindicated verdict advances the fuse counters last seen
  for the device. A challenge used before raises ``InvalidChallenge`` and nothing is kept.

Refusals the verifier session makes before any appraisal (unknown device, bad signature, binding,
challenge expired or replayed) never reach ``appraise``; the MQTT service records them with
``record_rejection``.

The hooks keep no state of their own beyond caches (the key broker's unwrapped CEKs, the
appraisal's verified certificates, and on SQLite the snapshots and ledger head of
``gateway.hotcache``, used only while the database provably has not changed): two gateway
processes may use two instances on one database at once. The registry makes each step atomic;
ledger appends are serialized by the ledger.

The hot path (registry and ledger on one engine, as in the gateway) is ONE write transaction.
It reads what the appraisal judges — the device, anchors, reference values, epoch, assignment
and the newest stored policy (``Registry.appraisal_snapshot_in``; on SQLite kept from an
earlier transaction when nothing was committed since, ``gateway.hotcache``) — appraises, takes
the ledger lock (``db.take_write_lock``; on SQLite the writer lock is held from the start), then
writes: first the challenge marked used (a replay fails there, before any key is touched, and
rolls everything back), then the key broker's run-time recheck (on PostgreSQL it reads the
release and the epoch again under the lock), the receipt, the verdict, both ledger entries
(release, then verdict; one head read, or the head kept) and the counters — so a used
challenge, its verdict, its receipt and their ledger entries are kept together or not at all.
With the registry and the ledger on two engines the challenge is marked used in its own
transaction first, then each step is its own transaction.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from sqlalchemy.engine import Connection

from gateway import db
from gateway.appraisal import AppraisalOutcome, FindRelease, appraise, failure, unknown_device
from gateway.explain import explain_reasons, explanation_json
from gateway.hotcache import SnapshotCache
from gateway.keybroker import BrokeredRelease, KeyBroker, KeyReleaseRefused, releasable_verdict
from gateway.kms import Kms
from gateway.ledger import LEDGER_LOCK_KEY, Ledger, LedgerEvent, LedgerHead, LedgerKind
from gateway.policy import Policy, PolicyProvider, RegistryPolicy, policy_of_record
from gateway.registry import (
    AppraisalSnapshot,
    Registry,
    ReleaseRecord,
    TrustAnchorKind,
    VerdictRecord,
)
from protocol import cbor
from protocol.errors import InvalidChallenge, InvalidImage
from protocol.ids import DeviceId, ReleaseId, SessionId
from protocol.keys import p256_from_point
from protocol.reasons import ReasonCode, Status
from protocol.verifier import Appraisal, AppraisalRequest, DeviceKeys, Rejected

#: Version of the ledger body of a verdict event.
VERDICT_EVENT_VERSION: Final = 1

#: Devices whose IAK public keys are kept in memory (least recently used dropped first).
DEVICE_KEYS_CACHE_SIZE: Final = 100_000

#: The gateway's clock: seconds since the epoch.
Clock = Callable[[], int]


class RegistryHooks:
    """``VerifierHooks`` over the registry, the ledger and the KMS."""

    __slots__ = (
        "_broker",
        "_cache",
        "_clock",
        "_keys",
        "_keys_lock",
        "_ledger",
        "_policy",
        "_registry",
        "_writer",
    )

    def __init__(
        self,
        registry: Registry,
        ledger: Ledger,
        kms: Kms,
        policy_provider: PolicyProvider,
        clock: Clock,
    ) -> None:
        """Hooks over ``registry`` and ``ledger``, releasing keys with ``kms``.

        Args:
            policy_provider: called once per appraisal for the policy in force
                (``gateway.policy.RegistryPolicy`` in the gateway).
            clock: gateway time, for single use (appraisals use the session's ``now_s``).
        """
        self._registry = registry
        self._ledger = ledger
        self._policy = policy_provider
        self._clock = clock
        self._broker = KeyBroker(registry, ledger, kms)
        self._keys: OrderedDict[DeviceId, DeviceKeys] = OrderedDict()
        self._keys_lock = threading.Lock()
        self._cache = SnapshotCache()
        self._writer = db.PinnedWriter(registry.engine)

    def close(self) -> None:
        """Give back the connection the hot path keeps (``db.PinnedWriter``)."""
        self._writer.close()

    def device_keys(self, device_id: DeviceId) -> DeviceKeys | None:
        """The enrolled IAKs of ``device_id`` (revoked devices too: the appraisal refuses them).

        Kept in memory once found: a device's IAK points never change once enrolled (the
        registry updates only status and counters and never deletes a device), and revocation
        is judged by the appraisal from the device row read then. Unknown devices are asked
        again every time.
        """
        with self._keys_lock:
            found = self._keys.get(device_id)
            if found is not None:
                self._keys.move_to_end(device_id)
                return found
        points = self._registry.iak_points(device_id)
        if points is None:
            return None
        secured, debug = points
        keys = DeviceKeys(secured=p256_from_point(secured), debug=p256_from_point(debug))
        with self._keys_lock:
            self._keys[device_id] = keys
            while len(self._keys) > DEVICE_KEYS_CACHE_SIZE:
                self._keys.popitem(last=False)
        return keys

    def consume_challenge(self, device_id: DeviceId, nonce: bytes, expires_s: int) -> bool:
        """Mark the challenge ``nonce`` used on its own, once across every process; False when
        it was used before (or has expired by the gateway clock). ``appraise`` does this itself."""
        try:
            self._registry.consume_challenge(
                nonce, device=device_id, expires_s=expires_s, now_s=self._clock()
            )
        except InvalidChallenge:
            return False
        return True

    def appraise(self, request: AppraisalRequest) -> Appraisal:
        """Mark the challenge used, appraise, release a key when the rule holds, record the
        verdict; see the module.

        Raises:
            InvalidChallenge: the challenge was used before or has expired by the gateway clock;
                nothing was kept.
        """
        if self._registry.engine is self._ledger.engine:
            return self._appraise_in_one_transaction(request)
        challenge = request.challenge
        self._registry.consume_challenge(
            challenge.nonce,
            device=request.device_id,
            expires_s=challenge.expires_s,
            now_s=self._clock(),
        )
        policy = self._policy()
        outcome = self._appraise(request, policy)
        outcome, brokered = self._release(outcome, policy, request.now_s)
        self._record(outcome, request.now_s)
        self._remember_counters(outcome, request)
        if brokered is None:
            return outcome.to_appraisal()
        return outcome.to_appraisal(brokered.key_release, brokered.lease)

    def record_rejection(
        self, device_id: DeviceId, session_id: SessionId, event: Rejected, *, now_s: int
    ) -> VerdictRecord | None:
        """Record a refusal the session made before any appraisal (None when ``appraise``
        already recorded it)."""
        if event.appraisal is not None:
            return None
        explanations = explain_reasons(event.reasons, device=device_id)
        record = self._registry.record_verdict(
            device_id,
            session_id=session_id,
            status=Status.CONTRAINDICATED,
            reasons=[code.value for code in event.reasons],
            policy_version=self._policy().version,
            explanation_json=explanation_json(explanations),
            now_s=now_s,
        )
        self._log_verdict(record)
        return record

    # --- the hot path: one read snapshot, one write transaction

    def _appraise_in_one_transaction(self, request: AppraisalRequest) -> Appraisal:
        try:
            return self._appraise_in_transaction(request)
        except BaseException:
            self._cache.forget()
            raise

    def _appraise_in_transaction(self, request: AppraisalRequest) -> Appraisal:
        now_s = request.now_s
        challenge = request.challenge
        engine = self._registry.engine
        cache = self._cache
        with self._writer.transaction() as conn:
            opened = db.change_mark(conn)
            cache.open(opened)
            snapshot = cache.snapshot(opened, request.device_id)
            if snapshot is None:
                snapshot = self._registry.appraisal_snapshot_in(conn, request.device_id)
                if snapshot is not None:
                    cache.keep_snapshot(opened, snapshot)
            policy = self._policy_with(snapshot)
            if snapshot is None:
                outcome = unknown_device(request, policy)
            else:
                outcome = self._appraise_snapshot(request, policy, snapshot)
            # SQLite: the writer lock is held since BEGIN IMMEDIATE, so the snapshot is what the
            # database holds until this commits. PostgreSQL: the ledger lock is taken only now
            # (other gateways append meanwhile), so the broker reads the release rule's inputs
            # again under it.
            db.take_write_lock(conn, LEDGER_LOCK_KEY)
            recheck = not db.is_sqlite(engine)
            self._registry.consume_challenge_in(
                conn,
                challenge.nonce,
                device=request.device_id,
                expires_s=challenge.expires_s,
                now_s=self._clock(),
            )
            outcome, brokered, events = self._release_in(conn, outcome, policy, now_s, recheck)
            record = VerdictRecord(
                device_id=outcome.device_id,
                session_id=outcome.session_id,
                status=outcome.status,
                reasons=outcome.recorded_reasons,
                policy_version=outcome.policy_version,
                explanation_json=explanation_json(outcome.explanations),
                at_s=now_s,
            )
            self._registry.record_verdict_in(conn, record)
            events.append(LedgerEvent(LedgerKind.VERDICT, _verdict_body(record), record.device_id))
            entries = self._ledger.append_in(conn, events, now_s=now_s, head=cache.head(opened))
            platform = request.claims.platform
            changed = None
            if (
                outcome.status is not Status.CONTRAINDICATED
                and platform is not None
                and snapshot is not None
                and _raises(platform.fuse_counters, snapshot.device.counters)
            ):
                self._registry.raise_counters_in(
                    conn, request.device_id, dict(platform.fuse_counters)
                )
                changed = request.device_id
            after = None if opened is None else opened.after_own_writes()
        last = entries[-1]
        cache.committed(opened, after, head=LedgerHead(last.seq, last.entry_hash), changed=changed)
        if brokered is None:
            return outcome.to_appraisal()
        return outcome.to_appraisal(brokered.key_release, brokered.lease)

    def _policy_with(self, snapshot: AppraisalSnapshot | None) -> Policy:
        """The policy in force: the newest stored one read with ``snapshot`` when the provider
        reads this registry's stored policies (no read transaction of its own), else the
        provider's."""
        provider = self._policy
        if (
            snapshot is not None
            and isinstance(provider, RegistryPolicy)
            and provider.registry is self._registry
        ):
            return policy_of_record(snapshot.policy)
        return provider()

    def _appraise_snapshot(
        self, request: AppraisalRequest, policy: Policy, snapshot: AppraisalSnapshot
    ) -> AppraisalOutcome:
        registry = self._registry
        assigned_release = snapshot.assigned_release

        def find_release(release: ReleaseId) -> ReleaseRecord | None:
            if assigned_release is not None and release == assigned_release.release_id:
                return assigned_release
            return registry.find_release(release)

        finder: FindRelease = find_release
        return appraise(
            request,
            device=snapshot.device,
            policy=policy,
            anchors=snapshot.anchors,
            reference_values=snapshot.reference_values,
            epoch=snapshot.epoch,
            assigned=snapshot.assigned,
            find_release=finder,
        )

    def _release_in(
        self,
        conn: Connection,
        outcome: AppraisalOutcome,
        policy: Policy,
        now_s: int,
        recheck: bool,
    ) -> tuple[AppraisalOutcome, BrokeredRelease | None, list[LedgerEvent]]:
        verdict = releasable_verdict(outcome)
        if verdict is None:
            return outcome, None, []
        try:
            brokered, event = self._broker.release_in(
                conn, verdict, policy=policy, now_s=now_s, reread=recheck
            )
        except KeyReleaseRefused as err:
            return failure(outcome, err.code, got=str(err)), None, []
        except InvalidImage:
            got = "a stored wrapped CEK that does not open with this gateway's HPKE key"
            return failure(outcome, ReasonCode.INTERNAL_ERROR, got=got), None, []
        return outcome, brokered, [event]

    # --- steps of appraise (registry and ledger on two engines)

    def _appraise(self, request: AppraisalRequest, policy: Policy) -> AppraisalOutcome:
        registry = self._registry
        device = registry.find_device(request.device_id)
        if device is None:
            return unknown_device(request, policy)
        return appraise(
            request,
            device=device,
            policy=policy,
            anchors=registry.list_trust_anchors(TrustAnchorKind.MANUFACTURER_CA),
            reference_values=registry.reference_values(device.product),
            epoch=registry.epoch(device.product),
            assigned=registry.assignment(device.device_id),
            find_release=registry.find_release,
        )

    def _release(
        self, outcome: AppraisalOutcome, policy: Policy, now_s: int
    ) -> tuple[AppraisalOutcome, BrokeredRelease | None]:
        verdict = releasable_verdict(outcome)
        if verdict is None:
            return outcome, None
        try:
            return outcome, self._broker.release(verdict, policy=policy, now_s=now_s)
        except KeyReleaseRefused as err:
            return failure(outcome, err.code, got=str(err)), None
        except InvalidImage:
            got = "a stored wrapped CEK that does not open with this gateway's HPKE key"
            return failure(outcome, ReasonCode.INTERNAL_ERROR, got=got), None

    def _record(self, outcome: AppraisalOutcome, now_s: int) -> None:
        record = self._registry.record_verdict(
            outcome.device_id,
            session_id=outcome.session_id,
            status=outcome.status,
            reasons=outcome.recorded_reasons,
            policy_version=outcome.policy_version,
            explanation_json=explanation_json(outcome.explanations),
            now_s=now_s,
        )
        self._log_verdict(record)

    def _log_verdict(self, record: VerdictRecord) -> None:
        self._ledger.append(
            LedgerKind.VERDICT, _verdict_body(record), device=record.device_id, now_s=record.at_s
        )

    def _remember_counters(self, outcome: AppraisalOutcome, request: AppraisalRequest) -> None:
        """Advance the counters last seen (never lower them) after a verdict that is not
        contraindicated: the next token must carry at least these (``counter.rollback``)."""
        platform = request.claims.platform
        if outcome.status is Status.CONTRAINDICATED or platform is None:
            return
        device = self._registry.find_device(request.device_id)
        if device is None:
            return
        merged = dict(device.counters)
        for name, value in platform.fuse_counters:
            merged[name] = max(merged.get(name, 0), value)
        if merged != dict(device.counters):
            self._registry.set_counters(device.device_id, merged)


def _raises(seen: Iterable[tuple[str, int]], known: Mapping[str, int]) -> bool:
    """Whether a counter ``seen`` in a token is new to, or above, the one the snapshot ``known``
    holds.

    When none is, raising the stored counters to ``seen`` changes nothing and the write
    transaction skips it: the hot path only ever raises counters, so whatever was stored since
    the snapshot is at least what the snapshot saw (and a concurrent ``set_counters`` simply
    comes after this appraisal, as it would had it committed a moment later).
    """
    return any(name not in known or value > known[name] for name, value in seen)


def _verdict_body(record: VerdictRecord) -> bytes:
    """The ledger body of a verdict event: canonical CBOR."""
    body = {
        "v": VERDICT_EVENT_VERSION,
        "session_id": record.session_id,
        "status": record.status.value,
        "reasons": list(record.reasons),
        "policy_version": record.policy_version,
    }
    # Written in canonical key order by hand (cbor.dumps_ordered): the ledger refuses any other.
    return cbor.dumps_ordered({key: body[key] for key in _VERDICT_BODY_ORDER})


_VERDICT_BODY_ORDER: Final = cbor.canonical_order(
    ("v", "session_id", "status", "reasons", "policy_version")
)
