"""The normal world's main loop: relay MQTT, write flash, download updates (DESIGN §3, §5, §9).

The NW is untrusted and holds nothing secret: the door (``device.enclave.api``) is its only way
into the enclave, and every byte it relays is either public (certificates, tokens, telemetry) or
ciphertext (images, grants). One thread drives everything: ``MqttLink.poll`` for the network, then
the timers below, so no state is shared between threads.

Life of the agent:

1. Power the board on and ``boot`` through the door; connect to the broker. When the broker
   cannot be reached at start, ask ``boot_offline`` (the enclave decides from its sealed lease).
2. Attest: an ``AttesterSession`` per attempt (a retry is a new session with a new id): hello →
   challenge → ``door.attest`` → evidence → verdict. A refusal, a timeout or a protocol error
   schedules a new session after a jittered exponential backoff.
3. A verdict for the release in the boot slot: ``door.accept``, ``door.run``, and once the app has
   run for ``confirm_after_s``, ``door.confirm`` (MCUboot's confirm of a trial). A verdict for
   another release: download it (``updater.Download``) into the inactive slot, mark it pending
   and reset the board, which boots it as a trial; attest for it (hello state ``update``).
4. While running: telemetry from ``door.poll_telemetry`` to ``…/up/telemetry``, signed commands
   from ``…/down/cmd`` to ``door.command`` (reattest, update, revoke), a retained ``Status`` on
   ``…/up/status`` and in ``nw-status.cbor`` in the board's home (for ``edgeseal-device status``).
5. A dead enclave or RoT (``DoorClosed``, or a pid gone) is noticed and recovered from by
   ``Board.reset()`` and a new boot.

Logs are short ``event key=value`` lines; token and grant contents never appear, only sizes.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from device.enclave.api import (
    AppState,
    BootFailed,
    BootInfo,
    DoorClosed,
    EnclaveDoor,
    EnclaveRefused,
    EnclaveStateError,
    EnclaveStatus,
)
from device.hardware.flash import FLASH_FILE, Flash
from device.hardware.slots import SlotError, SlotStore, Swap
from device.normal_world import mqtt
from device.normal_world.backoff import Backoff, UniformRng
from device.normal_world.public_state import CERTS_PARTITION, write_status_file
from device.normal_world.updater import ChunkVerdict, Download, DownloadError, find_release
from protocol import cbor, messages, topics
from protocol.attester import (
    AttesterSession,
    ChallengeReceived,
    Ignored,
    Refused,
    VerdictReceived,
)
from protocol.errors import MalformedMessage, ProtocolViolation, TransportError, UsageError
from protocol.ids import ReleaseId, SessionId
from protocol.results import CommandKind

log = logging.getLogger("edgeseal.device.nw")


class Phase(StrEnum):
    """What the NW is doing; its value is the ``Status.state`` it publishes."""

    BOOTING = "booting"
    CONNECTING = "connecting"
    ATTESTING = "attesting"
    DOWNLOADING = "downloading"
    RUNNING = "running"
    OFFLINE = "offline"
    REFUSED = "refused"
    NO_RELEASE = "no_release"
    REVOKED = "revoked"
    RECOVERING = "recovering"
    UPDATING = "updating"
    BOOT_FAILED = "boot_failed"
    STOPPED = "stopped"


class BoardPort(Protocol):
    """What the agent needs of the board (``device.hardware.power.Board``)."""

    home: Path

    def power_on(self) -> EnclaveDoor:
        """Start the RoT and the enclave; the door to the enclave."""
        ...

    def reset(self) -> EnclaveDoor:
        """Power-cycle the RoT and the enclave; the new door."""
        ...

    def power_off(self) -> None:
        """Stop the RoT and the enclave."""
        ...

    def alive(self) -> bool:
        """Whether the RoT and enclave processes are still running."""
        ...


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Timing and sizes of the agent; the defaults suit a real broker on a LAN."""

    broker: mqtt.BrokerAddress
    prefix: str = topics.DEFAULT_PREFIX
    attest_timeout_s: int = 10
    connect_timeout_s: float = 3.0
    chunk_bytes: int = 16 * 1024
    chunk_timeout_s: float = 5.0
    confirm_after_s: float = 1.0
    health_every_s: float = 0.5
    telemetry_batch: int = 64
    tick_s: float = 0.02
    retry_base_s: float = 0.5
    retry_cap_s: float = 30.0
    no_release_retry_s: float = 60.0


@dataclass(slots=True)
class _Attempt:
    """The attestation under way: its session and why it was started."""

    session: AttesterSession
    state: messages.HelloState
    requested: ReleaseId | None


@dataclass(slots=True)
class _Running:
    """The app the enclave accepted, and whether it still has to be confirmed."""

    release_id: ReleaseId
    version: str
    started_at: float
    confirm_due: bool


@dataclass(slots=True)
class _Counters:
    """What the NW last learnt from the enclave, for hellos and status."""

    counters: messages.Counters = ()
    boot_count: int = 0
    resets: int = 0
    telemetry_seq: int = 0
    detail: str = ""


class Agent:
    """The normal world of one board (see the module docstring)."""

    def __init__(
        self,
        board: BoardPort,
        config: AgentConfig,
        *,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        on_status: Callable[[messages.Status], None] | None = None,
    ) -> None:
        """Bind to ``board``; nothing starts until ``run``.

        Args:
            board: the board (powered off).
            config: timings and the broker.
            rng: session ids and backoff jitter (``random.SystemRandom`` by default).
            wall_clock: seconds since the epoch, for the attester's timeouts.
            monotonic: a monotonic clock for the agent's own timers.
            on_status: called with every new status (an observation seam for tests and tools).
        """
        self.board = board
        self.config = config
        self._rng: random.Random = rng if rng is not None else random.SystemRandom()
        self._wall = wall_clock
        self._now = monotonic
        jitter: UniformRng = self._rng
        self._attest_backoff = Backoff(jitter, config.retry_base_s, config.retry_cap_s)
        self._link_backoff = Backoff(jitter, config.retry_base_s, config.retry_cap_s)
        self.phase = Phase.BOOTING
        self.door: EnclaveDoor | None = None
        self.info: BootInfo | None = None
        self.link: mqtt.MqttLink | None = None
        self._attempt: _Attempt | None = None
        self._download: Download | None = None
        self._download_deadline = 0.0
        self._running: _Running | None = None
        self._retry_at: float | None = None
        self._recover_at: float | None = None
        self._reconnect_at: float | None = None
        self._connect_started: float | None = None
        self._next_health = 0.0
        self._offline_tried = False
        self._stats = _Counters()
        self._last_status: bytes | None = None
        self._last_written: bytes | None = None
        self._on_status = on_status
        #: Unexpected exceptions caught at the loop boundary (a healthy agent has none).
        self.errors = 0

    # --- the loop ------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set; then stop the app and power the board off."""
        try:
            self._power_on(reset=False)
            if self.phase is not Phase.BOOT_FAILED:
                self._open_link()
            while not stop.is_set():
                self.step()
        finally:
            self._shutdown()

    def step(self) -> None:
        """One iteration: network events, then timers; a dead enclave is recovered here."""
        if self.link is None:  # the board did not boot: nothing to relay, nothing to say
            time.sleep(self.config.tick_s)
            return
        try:
            for event in self.link.poll(self.config.tick_s):
                self._on_link_event(event)
            self._on_tick()
        except DoorClosed as err:
            self._recover(f"door closed ({err})")
        except Exception:  # the agent's boundary: log, count, and start the exchange again
            self.errors += 1
            log.exception("agent.error action=retry")
            self._download = None
            self._retry_later("internal error")

    # --- boot and recovery ---------------------------------------------------------------------

    def _power_on(self, *, reset: bool, phase: Phase = Phase.RECOVERING) -> None:
        self._set_phase(phase if reset else Phase.BOOTING)
        self._attempt, self._running, self._download = None, None, None
        self.door = self.board.reset() if reset else self.board.power_on()
        try:
            self.info = self.door.boot()
        except BootFailed as err:
            log.error("boot.failed reason=%s", err)
            self._stats.detail = "boot failed"
            self._set_phase(Phase.BOOT_FAILED)
            return
        info = self.info
        self._stats.counters = info.counters
        self._stats.boot_count = info.boot_count
        log.info(
            "boot device=%s slot=%s trial=%s release=%s",
            info.device_id,
            info.slot,
            info.trial,
            (info.release_id or "-")[:16],
        )

    def _recover(self, why: str) -> None:
        """The enclave or RoT died: reset the board, boot again, attest again."""
        log.warning("enclave.dead reason=%s action=reset", why)
        self._stats.resets += 1
        self._stats.detail = f"recovering: reset {self._stats.resets}"
        self._reboot(Phase.RECOVERING)

    def _reboot(self, phase: Phase) -> None:
        """Reset the board and boot; a board that does not come back is tried again later."""
        self._recover_at = None
        if self.door is not None:
            self.door.close()
        try:
            self._power_on(reset=True, phase=phase)
        except (DoorClosed, UsageError) as err:
            delay = self._attest_backoff.next_delay_s()
            self._recover_at = self._now() + delay
            log.error("board.reset_failed retry_in=%.2fs reason=%s", delay, str(err)[:80])
            return
        if self.phase is not Phase.BOOT_FAILED:
            self._after_boot()

    def _after_boot(self) -> None:
        """Start attesting when the broker is there (a trial boot attests as an update)."""
        self._set_phase(Phase.CONNECTING)
        if self.link is not None and self.link.connected:
            self._start_attempt(*self._boot_reason())

    def _boot_reason(self) -> tuple[messages.HelloState, ReleaseId | None]:
        info = self._info()
        if info.trial and info.release_id is not None:
            return messages.HelloState.UPDATE, info.release_id
        return messages.HelloState.BOOT, None

    def _check_health(self) -> None:
        if not self.board.alive():
            raise DoorClosed("a board process died")
        if self._running is None:
            return
        status = self._door().status()
        self._note_status(status)
        self._maybe_confirm(status)

    def _shutdown(self) -> None:
        if self.door is not None:
            with contextlib.suppress(DoorClosed, EnclaveStateError, BootFailed):
                self.door.stop()
            self.door.close()
        self._set_phase(Phase.STOPPED)
        if self.link is not None:
            self.link.disconnect()
        self.board.power_off()

    # --- the broker ----------------------------------------------------------------------------

    def _open_link(self) -> None:
        info = self._info()
        prefix = self.config.prefix
        will = mqtt.Will(
            topics.status_up(info.device_id, prefix=prefix),
            messages.Status("lost", None, info.counters, info.boot_count, False).encode(),
        )
        self.link = mqtt.MqttLink(
            self.config.broker,
            f"edgeseal-nw-{info.device_id}",
            topics.device_filters(info.device_id, prefix=prefix),
            connect_timeout_s=self.config.connect_timeout_s,
            will=will,
        )
        self._set_phase(Phase.CONNECTING)
        self._connect()

    def _connect(self) -> None:
        link = self._link()
        self._reconnect_at = None
        try:
            link.connect()
        except TransportError as err:
            self._connect_failed(str(err))
            return
        self._connect_started = self._now()

    def _connect_failed(self, why: str) -> None:
        self._connect_started = None
        delay = self._link_backoff.next_delay_s()
        self._reconnect_at = self._now() + delay
        log.info("broker.unreachable retry_in=%.2fs reason=%s", delay, why[:80])
        if not self._offline_tried:
            self._offline_tried = True
            self._try_offline()

    def _try_offline(self) -> None:
        """Broker unreachable at start: the enclave decides from its sealed lease (DESIGN §8)."""
        if self._running is not None or self.phase is Phase.BOOT_FAILED:
            return
        offline = self._door().boot_offline()
        log.info("offline.boot allowed=%s reason=%s", offline.allowed, offline.reason)
        if not offline:
            self._stats.detail = f"offline boot refused: {offline.reason}"
            self._publish_status()
            return
        status = self._door().run()
        release = offline.release_id or ReleaseId("0" * 64)
        self._running = _Running(release, offline.version or "", self._now(), confirm_due=False)
        self._note_status(status)
        self._set_phase(Phase.OFFLINE)

    def _on_link_event(self, event: mqtt.LinkEvent) -> None:
        if isinstance(event, mqtt.LinkUp):
            self._on_link_up()
        elif isinstance(event, mqtt.LinkDown):
            self._on_link_down(event.reason)
        else:
            self._on_message(event)

    def _on_link_up(self) -> None:
        log.info("broker.connected url=%s", self.config.broker.url)
        self._connect_started = None
        self._offline_tried = True  # offline start only before the broker was ever reached
        self._link_backoff.reset()
        self._last_status = None
        self._publish_status()
        if self._download is not None:
            self._request_chunk()  # resume where the download stopped
        elif self.phase is Phase.RUNNING:
            return
        elif self.phase is Phase.OFFLINE:
            self._start_attempt(messages.HelloState.REATTEST, None)
        elif self.phase in (Phase.CONNECTING, Phase.ATTESTING, Phase.RECOVERING):
            self._start_attempt(*self._boot_reason())

    def _on_link_down(self, why: str) -> None:
        log.warning("broker.lost reason=%s", why[:80])
        self._connect_failed(why)

    def _on_message(self, message: mqtt.Received) -> None:
        try:
            ref = topics.parse_topic(message.topic, self.config.prefix)
        except MalformedMessage:
            return
        if ref.device_id != self._info().device_id:
            return
        handlers = {
            topics.Channel.ATTEST: self._on_attest_down,
            topics.Channel.CHUNK: self._on_chunk,
            topics.Channel.CMD: self._on_command,
        }
        handler = handlers.get(ref.channel)
        if handler is not None:
            handler(message.payload)

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        link = self.link
        if link is None or not link.connected:
            return False
        try:
            link.publish(topic, payload, retain=retain)
        except TransportError as err:
            log.warning("publish.failed reason=%s", str(err)[:80])
            return False
        return True

    # --- attestation ---------------------------------------------------------------------------

    def _start_attempt(self, state: messages.HelloState, requested: ReleaseId | None) -> None:
        info = self._info()
        session_id = SessionId(self._rng.randbytes(16))
        session = AttesterSession(
            info.device_id, session_id, timeout_s=self.config.attest_timeout_s
        )
        hello = session.start(
            now_s=int(self._wall()),
            certificates=read_certificates(self.board.home),
            requested_release=requested,
            state=state,
            counters=self._stats.counters,
        )
        self._attempt = _Attempt(session, state, requested)
        self._retry_at = None
        if self._running is None:
            self._set_phase(Phase.ATTESTING)
        log.info("attest.hello session=%s state=%s", session_id.hex()[:8], state)
        self._publish(topics.attest_up(info.device_id, prefix=self.config.prefix), hello)

    def _retry_later(self, why: str, delay_s: float | None = None) -> None:
        self._attempt = None
        delay = self._attest_backoff.next_delay_s() if delay_s is None else delay_s
        self._retry_at = self._now() + delay
        log.info("attest.retry in=%.2fs reason=%s", delay, why)

    def _on_attest_down(self, payload: bytes) -> None:
        attempt = self._attempt
        if attempt is None:
            return
        try:
            event = attempt.session.receive_data(payload)
        except ProtocolViolation as err:
            self._retry_later(f"protocol error ({str(err)[:60]})")
            return
        if isinstance(event, ChallengeReceived):
            self._on_challenge(attempt, event)
        elif isinstance(event, VerdictReceived):
            self._on_verdict(attempt, event.verdict)
        elif isinstance(event, Refused):
            self._on_refused(event)
        elif isinstance(event, Ignored):
            log.debug("attest.ignored reason=%s", event.reason)

    def _on_challenge(self, attempt: _Attempt, event: ChallengeReceived) -> None:
        session = attempt.session
        attestation = self._door().attest(session.session_id, event.gateway_nonce)
        evidence = session.send_evidence(
            token=attestation.token, enclave_key=attestation.enclave_key, now_s=int(self._wall())
        )
        log.info("attest.evidence token_bytes=%d", len(attestation.token))
        self._publish(topics.attest_up(self._info().device_id, prefix=self.config.prefix), evidence)

    def _on_refused(self, event: Refused) -> None:
        reasons = ",".join(code.value for code in event.reasons)
        self._stats.detail = f"refused: {reasons}"[: messages.MAX_DETAIL]
        if self._running is None:
            self._set_phase(Phase.REFUSED)
        self._retry_later(f"refused ({reasons[:80]})")

    def _on_verdict(self, attempt: _Attempt, verdict: messages.Verdict) -> None:
        self._attempt = None
        release = verdict.release_id
        log.info(
            "attest.verdict result_bytes=%d grant=%s release=%s",
            len(verdict.result),
            verdict.grant is not None,
            (release or "-")[:16],
        )
        if verdict.grant is None or release is None:
            self._stats.detail = "no release"
            if self._running is None:
                self._set_phase(Phase.NO_RELEASE)
            self._retry_later("no release", self.config.no_release_retry_s)
            return
        self._attest_backoff.reset()
        if release != self._info().release_id:
            self._update_to(release, verdict.image_size, attempt.session.session_id)
            return
        self._accept_and_run(attempt.session.session_id, verdict, release)

    def _accept_and_run(
        self, session_id: SessionId, verdict: messages.Verdict, release: ReleaseId
    ) -> None:
        door = self._door()
        assert verdict.grant is not None
        try:
            accepted = door.accept(session_id, verdict.result, verdict.grant, release)
        except EnclaveRefused as err:
            self._stats.detail = f"enclave refused: {err.kind}"
            log.warning("enclave.refused kind=%s", err.kind)
            self._retry_later(f"enclave refused {err.kind}")
            return
        status = door.run()  # a no-op for the app already running (a reattest)
        running = self._running
        if running is None or running.release_id != accepted.release_id:
            self._running = _Running(accepted.release_id, accepted.version, self._now(), True)
        self._stats.detail = ""
        log.info("app.run release=%s version=%s", release[:16], accepted.version)
        self._note_status(status)
        self._set_phase(Phase.RUNNING)

    def _maybe_confirm(self, status: EnclaveStatus) -> None:
        """Confirm the app once it has run long enough (or exited cleanly); never a crash."""
        running = self._running
        if running is None or not running.confirm_due:
            return
        ran_long = self._now() - running.started_at >= self.config.confirm_after_s
        if status.state is AppState.EXITED or (status.state is AppState.RUNNING and ran_long):
            confirmed = self._door().confirm()
            running.confirm_due = False
            log.info(
                "app.confirmed slot=%s trial=%s app_counter=%d",
                confirmed.slot,
                confirmed.trial_confirmed,
                confirmed.app_counter,
            )
            self._stats.counters = tuple(
                (n, confirmed.app_counter if n == "app" else v) for n, v in self._stats.counters
            )
            self._publish_status(force=True)

    # --- updates -------------------------------------------------------------------------------

    def _slots(self) -> SlotStore:
        return SlotStore(Flash.open(self.board.home / FLASH_FILE))

    def _update_to(
        self, release: ReleaseId, size: int | None, session_id: SessionId | None
    ) -> None:
        """Get ``release`` into the inactive slot (unless it is there already) and boot it.

        A release already pending in the inactive slot is booted; the confirmed primary's release,
        asked for during a trial, is reverted to by a reset (the trial was never confirmed).
        """
        if self._download is not None and self._download.release_id == release:
            self._request_chunk()  # already under way
            return
        slots = self._slots()
        found = find_release(slots, release)
        pending = found is not None and found.slot != slots.active()
        if pending and slots.state().swap is Swap.PENDING:
            self._boot_update(release)
            return
        if found is not None and found.slot == slots.active() and self._info().trial:
            self._boot_update(release)
            return
        try:
            self._download = Download(
                slots,
                release,
                total_size=size,
                chunk_bytes=self.config.chunk_bytes,
                session_id=session_id,
            )
        except SlotError as err:
            self._stats.detail = "update does not fit"
            self._retry_later(f"download refused ({str(err)[:60]})")
            return
        log.info("update.download release=%s size=%s", release[:16], size)
        if self._running is None:
            self._set_phase(Phase.DOWNLOADING)
        self._request_chunk()

    def _request_chunk(self) -> None:
        download = self._download
        if download is None:
            return
        request = download.next_request()
        if request is None:
            return
        self._download_deadline = self._now() + self.config.chunk_timeout_s
        topic = topics.fetch_up(self._info().device_id, prefix=self.config.prefix)
        self._publish(topic, request.encode())

    def _on_chunk(self, payload: bytes) -> None:
        download = self._download
        if download is None:
            return
        try:
            verdict = download.on_chunk(messages.Chunk.decode(payload))
        except MalformedMessage:
            return
        except (DownloadError, SlotError) as err:
            self._download = None
            self._stats.detail = "download failed"
            self._retry_later(f"download failed ({str(err)[:60]})")
            return
        if verdict is ChunkVerdict.WRITTEN:
            self._request_chunk()
        elif verdict is ChunkVerdict.COMPLETE:
            self._download = None
            log.info(
                "update.downloaded release=%s bytes=%d", download.release_id[:16], download.offset
            )
            self._boot_update(download.release_id)

    def _boot_update(self, release: ReleaseId) -> None:
        """The update is pending in the inactive slot: reset, so it boots once as a trial."""
        log.info("update.reboot release=%s", release[:16])
        self._reboot(Phase.UPDATING)

    # --- commands ------------------------------------------------------------------------------

    def _on_command(self, payload: bytes) -> None:
        try:
            envelope = messages.CommandEnvelope.decode(payload)
            outcome = self._door().command(envelope.command)
        except (MalformedMessage, EnclaveRefused) as err:
            log.warning("command.refused reason=%s", type(err).__name__)
            return
        log.info("command kind=%s seq=%d", outcome.kind, outcome.seq)
        if outcome.kind is CommandKind.REATTEST:
            self._start_attempt(messages.HelloState.REATTEST, None)
        elif outcome.kind is CommandKind.UPDATE and outcome.release_id is not None:
            if outcome.release_id != self._info().release_id:
                self._update_to(outcome.release_id, None, None)
        elif outcome.kind is CommandKind.REVOKE:
            self._revoke()

    def _revoke(self) -> None:
        with contextlib.suppress(EnclaveStateError):
            self._door().stop()
        self._running = None
        self._attempt = None
        self._download = None
        self._retry_at = None
        self._stats.detail = "revoked"
        self._set_phase(Phase.REVOKED)

    # --- timers --------------------------------------------------------------------------------

    def _on_tick(self) -> None:
        now = self._now()
        if self._recover_at is not None:
            if now >= self._recover_at:
                self._reboot(Phase.RECOVERING)
            return
        if self.phase is Phase.BOOT_FAILED:
            return
        self._tick_link(now)
        self._tick_attempt(now)
        if self._download is not None and now >= self._download_deadline:
            log.info("update.chunk_timeout offset=%d", self._download.offset)
            self._request_chunk()
        if self._running is not None:
            self._pump_telemetry()
        if now >= self._next_health:
            self._next_health = now + self.config.health_every_s
            self._check_health()

    def _tick_link(self, now: float) -> None:
        link = self._link()
        if link.connected:
            return
        if self._connect_started is not None:
            if now - self._connect_started >= self.config.connect_timeout_s:
                link.disconnect()
                self._connect_failed("no CONNACK")
        elif self._reconnect_at is not None and now >= self._reconnect_at:
            self._connect()

    def _tick_attempt(self, now: float) -> None:
        attempt = self._attempt
        if attempt is not None and attempt.session.check_timeout(int(self._wall())):
            self._retry_later("timeout")
            return
        link = self._link()
        if self._retry_at is not None and now >= self._retry_at and link.connected:
            self._start_attempt(*self._retry_reason())

    def _retry_reason(self) -> tuple[messages.HelloState, ReleaseId | None]:
        if self._running is not None:
            return messages.HelloState.REATTEST, None
        return self._boot_reason()

    def _pump_telemetry(self) -> None:
        # Offline, the records wait in the enclave (its newest 1,024; older ones are dropped and
        # counted in its status) and leave in order once the link is back.
        if not self._link().connected:
            return
        items = self._door().poll_telemetry(self.config.telemetry_batch)
        if not items:
            return
        topic = topics.telemetry_up(self._info().device_id, prefix=self.config.prefix)
        for item in items:
            payload = item.payload[: messages.MAX_TELEMETRY_PAYLOAD]
            seq = self._stats.telemetry_seq
            self._stats.telemetry_seq += 1
            message = messages.Telemetry(seq, payload, int(self._wall() * 1000))
            self._publish(topic, message.encode())

    # --- status --------------------------------------------------------------------------------

    def _set_phase(self, phase: Phase) -> None:
        if phase is not self.phase:
            log.info("phase %s -> %s", self.phase, phase)
        self.phase = phase
        self._publish_status()

    def _note_status(self, status: EnclaveStatus) -> None:
        self._stats.counters = status.counters
        if status.crash is not None:
            self._stats.detail = f"app crashed: {status.crash.exc_type} line {status.crash.line}"
        if self._running is not None and status.state in (AppState.CRASHED, AppState.EXITED):
            log.info("app.ended state=%s", status.state)
        self._publish_status()

    def status_message(self) -> messages.Status:
        """The NW's current status, as published."""
        running = self._running
        return messages.Status(
            state=str(self.phase),
            version=None if running is None else running.version or None,
            counters=self._stats.counters,
            boot_count=self._stats.boot_count,
            running=running is not None and self.phase in (Phase.RUNNING, Phase.OFFLINE),
            detail=self._stats.detail[: messages.MAX_DETAIL],
        )

    def _publish_status(self, *, force: bool = False) -> None:
        """Write the status file and publish the retained status, when either is stale."""
        status = self.status_message()
        encoded = status.encode()
        if encoded != self._last_written or force:
            device = None if self.info is None else self.info.device_id
            write_status_file(self.board.home, device, status)
            self._last_written = encoded
            if self._on_status is not None:
                self._on_status(status)
        if self.info is None or (encoded == self._last_status and not force):
            return
        topic = topics.status_up(self.info.device_id, prefix=self.config.prefix)
        if self._publish(topic, encoded, retain=True):
            self._last_status = encoded

    # --- accessors -----------------------------------------------------------------------------

    def _door(self) -> EnclaveDoor:
        if self.door is None:
            raise DoorClosed("door: not powered on")
        return self.door

    def _info(self) -> BootInfo:
        if self.info is None:
            raise DoorClosed("door: not booted")
        return self.info

    def _link(self) -> mqtt.MqttLink:
        assert self.link is not None
        return self.link


def read_certificates(home: Path) -> tuple[bytes, ...]:
    """The device certificates (public) the factory wrote to the "certs" partition.

    The blob is canonical CBOR ``{"v": 1, "secured": der, "debug": der}`` (``device.factory``).
    An unreadable partition gives no certificates: the gateway then refuses, with a reason.
    """
    try:
        blob = Flash.open(home / FLASH_FILE).read_blob(CERTS_PARTITION)
        fields = cbor.Fields(cbor.loads(blob, what="certs", max_bytes=1 << 16), what="certs")
        fields.get_int("v", lo=1, hi=1)
        return tuple(
            fields.get_bytes(key, max_size=messages.MAX_CERTIFICATE_BYTES)
            for key in ("secured", "debug")
        )
    except (MalformedMessage, UsageError) as err:
        log.warning("certificates.unreadable reason=%s", str(err)[:80])
        return ()
