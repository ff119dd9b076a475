"""The enclave service: what the measured runtime stage serves on the door (DESIGN §3, §5, §8).

The runtime stage builds one ``EnclaveService`` from its trust anchors and serves the door with it
(``run_enclave``). Requests and replies are those of ``device.enclave.api``; this module keeps the
secrets: the per-session X25519 keys, the CEK while it opens the image, the app bundle plaintext
(only in this process's memory) and the sealing keys from the RoT. Error kinds on the door:
``session``, ``result``, ``grant``, ``image``, ``rolled_back``, ``command``, ``unseal`` (refusals),
``state`` (out of order), ``malformed``, ``internal``.

Trust decisions, in order, for ``accept``: the session's key exists (made by ``attest`` and used
once); the signed result verifies under the anchored gateway result key for this device and
session, and has not expired at the latest gateway time the device has seen (the board clock is
the attacker's, so it is never consulted); it releases exactly the requested image; the grant opens
with the session key; the boot slot holds that image; its manifest is signed by an anchored vendor
for this product; its counter is not below the fuse "app" counter (before decryption); then the
payload decrypts and matches the manifest.

For ``command``: the command verifies under the anchored result key for this device, has not
expired at the latest gateway time seen, and its sequence number is above the highest one
accepted — read from the fuse counter "command_seq" (the NV store's copy in flash is the
attacker's to roll back or erase) — which is advanced before the command acts.
"""

from __future__ import annotations

import collections
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from cryptography.hazmat.primitives.asymmetric import x25519

from device.enclave import api
from device.enclave.frames import Channel, RemoteError, serve
from device.enclave.mpy import (
    AppClock,
    AppCrash,
    AppExited,
    AppHung,
    AppRunner,
    RealAppClock,
    SimulatedBoard,
)
from device.enclave.nvstore import NvState, NvStore, SealedLease, open_blob, seal_blob
from device.enclave.rot_client import RotClient
from device.enclave.vendor_keys import anchored_vendor_key
from device.hardware.flash import FLASH_FILE, Flash
from device.hardware.slots import BootChoice, SlotStore
from protocol import ids, keys, psa
from protocol.cbor import Fields
from protocol.errors import (
    InvalidGrant,
    InvalidImage,
    InvalidSignedMessage,
    LocalProtocolError,
    MalformedMessage,
    UsageError,
    VerificationError,
)
from protocol.grant import open_grant
from protocol.image import (
    AppBundle,
    ImageRolledBack,
    Manifest,
    SealedImage,
    manifest_digest,
    open_image,
    parse_unverified_image,
)
from protocol.reasons import Status
from protocol.results import (
    AttestationResult,
    CommandKind,
    check_release_id,
    verify_command,
    verify_result,
)
from protocol.stage import BootStage, TrustAnchors

#: The PSA client id the enclave runtime signs tokens as (its partition).
CLIENT_ID: Final = 1
MAX_SESSIONS: Final = 8
MAX_TELEMETRY: Final = 1024
MAX_SEAL_BYTES: Final = 64 << 10
MAX_POLL_BYTES: Final = 512 << 10
NW_SEAL_AAD: Final = b"edgeseal/nw-seal/v1"
LEASE_LABEL: Final = "lease"
#: The fuse counter holding the highest signed-command sequence number accepted (DESIGN §8).
COMMAND_COUNTER: Final = "command_seq"
FUSE_COUNTER_MAX: Final = 0xFFFF_FFFF
NW_LABEL: Final = "nw"


class Refused(VerificationError):
    """A door request failed a check; ``kind`` is one of ``api.REFUSAL_KINDS``."""

    def __init__(self, kind: str, message: str) -> None:
        """Keep the refusal's kind."""
        super().__init__(message)
        self.kind = kind


class StateError(LocalProtocolError):
    """A door request out of order."""


class BootContext(Protocol):
    """What the ROM loader hands the runtime stage (``device.enclave.boot.StageLoader``)."""

    home: Path
    rot: RotClient
    door: Channel
    app_clock: AppClock | None


@dataclass(frozen=True, slots=True)
class LoadedApp:
    """An opened image: its verified manifest, digest and the bundle plaintext (memory only)."""

    bundle: AppBundle
    manifest: Manifest
    digest: bytes
    slot: str
    trial: bool

    @property
    def release_id(self) -> ids.ReleaseId:
        """The release id (hex of the manifest digest)."""
        return ids.release_id(self.digest)


def run_enclave(boot: BootContext, stage: BootStage) -> None:
    """The runtime stage's body: build the service from the stage's anchors and serve the door."""
    if stage.trust_anchors is None:
        raise Refused("image", "runtime stage without trust anchors")
    service = EnclaveService(
        boot.home, boot.rot, stage.trust_anchors, stage.version, app_clock=boot.app_clock
    )
    try:
        serve(boot.door, service.handle, classify)
    finally:
        service.shutdown()


class EnclaveService:
    """The door's request handler (see the module docstring)."""

    def __init__(
        self,
        home: Path,
        rot: RotClient,
        anchors: TrustAnchors,
        runtime_version: str,
        *,
        app_clock: AppClock | None = None,
    ) -> None:
        """Bind to the board in ``home`` through the RoT, trusting ``anchors``."""
        self._rot = rot
        self._anchors = anchors
        self._runtime_version = runtime_version
        info = rot.device_info()
        self._device_id = ids.device_id(info.device_id)
        self._class_id = ids.class_id(ids.product(info.product))
        self._flash = Flash.open(home / FLASH_FILE)
        self._slots = SlotStore(self._flash)
        self._nv = NvStore(self._flash, rot.sealing_key(LEASE_LABEL))
        self._nw_key = rot.sealing_key(NW_LABEL)
        self._choice = self._select_slot()
        self._sessions: collections.OrderedDict[bytes, x25519.X25519PrivateKey] = (
            collections.OrderedDict()
        )
        self._app: LoadedApp | None = None
        self._ran = False
        self._telemetry: collections.deque[tuple[str, bytes]] = collections.deque(
            maxlen=MAX_TELEMETRY
        )
        self._dropped = 0
        board = _make_board(app_clock)
        self._runner = AppRunner(board=board, sink=self._sink, clock=app_clock)

    def handle(self, op: str, args: Fields) -> Mapping[str, object]:
        """Dispatch one door request.

        Raises:
            Refused, StateError, MalformedMessage: see the module docstring.
        """
        handler = _OPS.get(op)
        if handler is None:
            raise MalformedMessage(f"door: unknown op {op!r:.32}")
        return handler(self, args)

    def shutdown(self) -> None:
        """Stop the app (the door closed: the board is going down)."""
        self._runner.stop(timeout_s=1.0)

    # Boot ---------------------------------------------------------------------------------------

    def _select_slot(self) -> BootChoice | None:
        # Once per power-on: consumes a pending trial or reverts an unconfirmed one (DESIGN §5).
        try:
            return self._slots.boot_select()
        except (UsageError, InvalidImage):
            return None

    def _boot(self, _args: Fields) -> Mapping[str, object]:
        info = self._rot.device_info()
        header = self._boot_image_header()
        manifest = None if header is None else header.manifest
        nv = self._nv.load()
        return api.boot_info_wire(
            api.BootInfo(
                device_id=self._device_id,
                product=ids.product(info.product),
                lifecycle=info.lifecycle,
                secure_boot=info.secure_boot,
                debug_open=info.debug_open,
                boot_count=info.boot_count,
                counters=info.counters,
                runtime_version=self._runtime_version,
                slot=None if self._choice is None else self._choice.slot,
                trial=self._choice is not None and self._choice.trial,
                release_id=None if header is None else ids.release_id(manifest_digest(header)),
                image_version=None if manifest is None else manifest.version,
                image_counter=None if manifest is None else manifest.security_counter,
                has_lease=nv.lease is not None,
            )
        )

    def _boot_image_header(self) -> SealedImage | None:
        if self._choice is None:
            return None
        try:
            return parse_unverified_image(self._slots.read_image(self._choice.slot))
        except (MalformedMessage, UsageError, InvalidImage):
            return None

    # Attestation and key release ----------------------------------------------------------------

    def _attest(self, args: Fields) -> Mapping[str, object]:
        session = ids.session_id(args.get_bytes("session_id", max_size=64))
        challenge = args.get_bytes("challenge", size=psa.CHALLENGE_BYTES)
        private = x25519.X25519PrivateKey.generate()
        public = keys.x25519_raw(private.public_key())
        token = self._rot.sign_token(psa.bind_nonce(challenge, public), CLIENT_ID)
        self._sessions[session] = private
        self._sessions.move_to_end(session)
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return {"token": token, "key": public}

    def _accept(self, args: Fields) -> Mapping[str, object]:
        session = ids.session_id(args.get_bytes("session_id", max_size=64))
        release = check_release_id(args.get_str("release_id", max_len=64), what="release_id")
        signed = args.get_bytes("result", max_size=1 << 16)
        grant = args.get_bytes("grant", max_size=1024)
        private = self._sessions.pop(session, None)
        if private is None:
            raise Refused("session", "no attestation is pending for this session")
        nv = self._nv.load()
        digest = bytes.fromhex(release)
        result = self._verify_result(signed, session, digest, nv)
        try:
            cek = open_grant(
                grant,
                private,
                device_id=self._device_id,
                session_id=session,
                manifest_digest=digest,
            )
        except InvalidGrant as err:
            raise Refused("grant", str(err)) from err
        app = self._open(digest, cek)
        lease = None
        if result.lease is not None:
            base = self._rot.counter("offline_boots")
            lease = SealedLease(
                cek, digest, result.lease.offline_boots, base, result.lease.expires_s
            )
        state = NvState(nv.last_seq, nv.last_gateway_s, lease)
        self._nv.save(state.seen_gateway_time(result.issued_s))
        self._install(app)
        manifest = app.manifest
        accepted = api.Accepted(
            app.release_id, manifest.version, manifest.security_counter, result.lease
        )
        return api.accepted_wire(accepted)

    def _verify_result(
        self, signed: bytes, session: ids.SessionId, digest: bytes, nv: NvState
    ) -> AttestationResult:
        """The signed result, for this device and session, releasing image ``digest``."""
        try:
            result = verify_result(
                signed,
                self._anchors.result_key(),
                device_id=self._device_id,
                session_id=session,
                # Gateway time only: the board's clock is the attacker's (DESIGN §8).
                now_s=nv.last_gateway_s,
            )
        except InvalidSignedMessage as err:
            raise Refused("result", str(err)) from err
        if result.status is Status.CONTRAINDICATED or result.manifest_digest != digest:
            raise Refused("result", "the result releases no key for this image")
        return result

    def _open(self, digest: bytes, cek: bytes) -> LoadedApp:
        """Verify and decrypt the image ``digest`` from the boot slot."""
        if self._app is not None and self._app.digest == digest:
            return self._app
        choice = self._choice
        if choice is None:
            raise Refused("image", "no bootable image in the slots")
        try:
            image = parse_unverified_image(self._slots.read_image(choice.slot))
        except (MalformedMessage, UsageError, InvalidImage) as err:
            raise Refused("image", "the boot slot holds no readable image") from err
        if manifest_digest(image) != digest:
            raise Refused("image", "the boot slot holds another release")
        try:
            vendors = anchored_vendor_key(image.manifest_bytes, self._anchors.vendor_signer_ids)
            plaintext = open_image(
                image,
                cek,
                trusted_vendors=vendors,
                min_security_counter=self._rot.counter("app"),
                class_id=self._class_id,
            )
            bundle = AppBundle.decode(plaintext)
        except ImageRolledBack as err:
            raise Refused("rolled_back", str(err)) from err
        except (InvalidImage, MalformedMessage) as err:
            raise Refused("image", "sealed image: refused") from err
        if version_key(self._runtime_version) < version_key(image.manifest.min_runtime_version):
            raise Refused("image", "sealed image: needs a newer runtime stage")
        return LoadedApp(bundle, image.manifest, digest, choice.slot, choice.trial)

    def _install(self, app: LoadedApp) -> None:
        if self._app is not None and self._app.digest != app.digest:
            self._runner.stop()
            self._ran = False
        self._app = app
        self._rot.set_app(app.digest, app.manifest.version, app.manifest.vendor_id)

    # The app ------------------------------------------------------------------------------------

    def _run(self, _args: Fields) -> Mapping[str, object]:
        app = self._require_app()
        if not self._runner.running:
            try:
                self._runner.start(dict(app.bundle.sources), entry=app.bundle.entry_point)
            except UsageError as err:
                raise StateError(f"door: cannot start the app ({err})") from err
            self._ran = True
        return self._status_wire()

    def _stop(self, _args: Fields) -> Mapping[str, object]:
        self._runner.stop()
        return self._status_wire()

    def _status(self, _args: Fields) -> Mapping[str, object]:
        return self._status_wire()

    def _status_wire(self) -> dict[str, object]:
        app = self._app
        state, crash = self._app_state()
        return api.status_wire(
            api.EnclaveStatus(
                state=state,
                release_id=None if app is None else app.release_id,
                version=None if app is None else app.manifest.version,
                crash=crash,
                trial=app is not None and app.trial,
                has_lease=self._nv.load().lease is not None,
                telemetry_dropped=self._dropped,
                counters=self._rot.fuse_counters(),
            )
        )

    def _app_state(self) -> tuple[api.AppState, api.CrashInfo | None]:
        if self._app is None:
            return api.AppState.EMPTY, None
        if self._runner.running:
            return api.AppState.RUNNING, None
        result = self._runner.result
        if isinstance(result, AppCrash):
            return api.AppState.CRASHED, api.CrashInfo(result.exc_type, result.line)
        if isinstance(result, AppHung):
            return api.AppState.CRASHED, api.CrashInfo(f"hang:{result.reason.value}", result.line)
        if isinstance(result, AppExited):
            return api.AppState.EXITED, None
        return api.AppState.LOADED, None

    def _sink(self, topic: str, payload: bytes) -> None:
        # Called from the app thread; deque appends are atomic.
        if len(self._telemetry) == MAX_TELEMETRY:
            self._dropped += 1
        self._telemetry.append((topic, payload))

    def _poll(self, args: Fields) -> Mapping[str, object]:
        limit = args.get_int("max", lo=1, hi=api.MAX_TELEMETRY_BATCH)
        items: list[list[object]] = []
        size = 0
        # Stay well inside one frame (1 MiB): a record is at most 16 KiB of payload.
        while self._telemetry and len(items) < limit and size < MAX_POLL_BYTES:
            topic, payload = self._telemetry.popleft()
            items.append([topic, payload])
            size += len(topic) + len(payload)
        return {"items": items}

    def _require_app(self) -> LoadedApp:
        if self._app is None:
            raise StateError("door: no app accepted (accept or boot_offline first)")
        return self._app

    # Commands, lease and confirmation -----------------------------------------------------------

    def _command(self, args: Fields) -> Mapping[str, object]:
        data = args.get_bytes("command", max_size=1 << 16)
        nv = self._nv.load()
        fuse_seq = self._command_fuse()
        try:
            command = verify_command(
                data,
                self._anchors.result_key(),
                device_id=self._device_id,
                now_s=nv.last_gateway_s,
                # The fuse, not the NV store alone: flash can be rolled back or erased.
                last_seq=max(nv.last_seq, fuse_seq),
            )
        except InvalidSignedMessage as err:
            raise Refused("command", str(err)) from err
        if command.seq > FUSE_COUNTER_MAX:
            raise Refused("command", "signed command: sequence number beyond the fuse counter")
        # Spend the sequence number before the command acts: a power cut in between loses the
        # command (the gateway sends another), never lets it be replayed.
        self._rot.advance_counter(COMMAND_COUNTER, command.seq)
        lease = nv.lease
        if command.kind is CommandKind.REVOKE:
            lease = None
            self._revoke(nv.lease)
        self._nv.save(
            NvState(command.seq, nv.last_gateway_s, lease).seen_gateway_time(command.issued_s)
        )
        return api.outcome_wire(api.CommandOutcome(command.kind, command.seq, command.release_id))

    def _command_fuse(self) -> int:
        """The highest command sequence number accepted, from its fuse counter.

        Raises:
            Refused: the board has no such counter: without one, a replay cannot be ruled out.
        """
        counters = dict(self._rot.fuse_counters())
        if COMMAND_COUNTER not in counters:
            raise Refused("command", "no command sequence fuse counter on this board")
        return counters[COMMAND_COUNTER]

    def _revoke(self, lease: SealedLease | None) -> None:
        """Unload the app and spend the lease's boots in the fuse counter: a restored old sealed
        blob then allows no boot either."""
        self._runner.stop()
        self._app = None
        self._ran = False
        self._rot.clear_app()
        if lease is not None:
            spent = lease.base + lease.boots
            if spent > self._rot.counter("offline_boots"):
                self._rot.advance_counter("offline_boots", spent)

    def _boot_offline(self, _args: Fields) -> Mapping[str, object]:
        return api.offline_wire(self._offline())

    def _offline(self) -> api.OfflineBoot:
        nv = self._nv.load()
        lease = nv.lease
        if lease is None:
            return _offline_refusal(api.OfflineReason.NO_LEASE)
        if lease.expires_s <= nv.last_gateway_s:
            return _offline_refusal(api.OfflineReason.EXPIRED)
        if self._rot.counter("offline_boots") - lease.base >= lease.boots:
            return _offline_refusal(api.OfflineReason.BOOTS_SPENT)
        # Count the boot before decrypting: a failed or interrupted attempt still spends it.
        used = self._rot.count_offline_boot() - lease.base
        try:
            app = self._open(lease.manifest_digest, lease.cek)
        except Refused as err:
            reason = api.OfflineReason.IMAGE_REFUSED
            if err.kind == "image" and self._choice is None:
                reason = api.OfflineReason.IMAGE_MISSING
            return _offline_refusal(reason)
        self._install(app)
        return api.OfflineBoot(
            True, api.OfflineReason.OK, app.release_id, app.manifest.version, lease.boots - used
        )

    def _confirm(self, _args: Fields) -> Mapping[str, object]:
        app = self._require_app()
        if not self._ran:
            raise StateError("door: confirm only after the app has run")
        counter = max(app.manifest.security_counter, self._rot.counter("app"))
        self._rot.advance_counter("app", counter)
        slot, confirmed = self._rot.confirm_image()
        return api.confirmed_wire(api.Confirmed(slot, counter, confirmed))

    # NW data ------------------------------------------------------------------------------------

    def _seal(self, args: Fields) -> Mapping[str, object]:
        data = args.get_bytes("data", max_size=MAX_SEAL_BYTES)
        return {"blob": seal_blob(self._nw_key, data, NW_SEAL_AAD)}

    def _unseal(self, args: Fields) -> Mapping[str, object]:
        blob = args.get_bytes("blob", max_size=MAX_SEAL_BYTES + 64)
        try:
            data = open_blob(self._nw_key, blob, NW_SEAL_AAD, max_bytes=MAX_SEAL_BYTES + 64)
        except Exception as err:  # malformed or not ours: one opaque refusal
            raise Refused("unseal", "sealed blob does not open on this device") from err
        return {"data": data}


def version_key(version: str) -> tuple[int, ...]:
    """The numeric release part of a version ("1.10.2-rc1" → (1, 10, 2)) for ordering."""
    release = re.split(r"[-+]", version, maxsplit=1)[0]
    return tuple(int(part) if part.isdigit() else 0 for part in release.split("."))


def _offline_refusal(reason: api.OfflineReason) -> api.OfflineBoot:
    return api.OfflineBoot(False, reason, None, None, 0)


def _make_board(clock: AppClock | None) -> SimulatedBoard:
    # Sensor noise only; nothing secret depends on this generator.
    return SimulatedBoard(clock=clock or RealAppClock(), rng=random.Random())  # noqa: S311


_OPS: Final[dict[str, Callable[[EnclaveService, Fields], Mapping[str, object]]]] = {
    "boot": EnclaveService._boot,
    "attest": EnclaveService._attest,
    "accept": EnclaveService._accept,
    "run": EnclaveService._run,
    "stop": EnclaveService._stop,
    "status": EnclaveService._status,
    "poll_telemetry": EnclaveService._poll,
    "command": EnclaveService._command,
    "boot_offline": EnclaveService._boot_offline,
    "confirm": EnclaveService._confirm,
    "seal": EnclaveService._seal,
    "unseal": EnclaveService._unseal,
}


def classify(err: Exception) -> tuple[str, str]:
    """The door's error reply for a handler exception (never key bytes or plaintext)."""
    if isinstance(err, Refused):
        return err.kind, str(err)
    if isinstance(err, StateError):
        return "state", str(err)
    if isinstance(err, MalformedMessage):
        return "malformed", str(err)
    if isinstance(err, RemoteError):
        return "internal", f"rot refused: {err.kind}"
    return "internal", type(err).__name__


__all__ = ["BootContext", "EnclaveService", "Refused", "classify", "run_enclave"]
