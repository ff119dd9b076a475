"""The door: the normal world's only way into the enclave (DESIGN §3).

``EnclaveDoor`` is a typed client over the door socket (frames of ``device.enclave.frames``). Each
method sends one request and returns a frozen dataclass, or raises:

- ``DoorClosed`` (a ``TransportError``): the enclave process is gone (or stopped answering); ask
  the board to reset (``Board.reset()``) and start over;
- ``BootFailed``: the RoT refused a boot stage, so no enclave runtime is serving;
- ``EnclaveRefused`` (a ``VerificationError``, opaque): a check on what the NW passed failed — a
  result, grant, image, command or sealed blob; ``kind`` says which family, in one word;
- ``EnclaveStateError`` (a ``LocalProtocolError``): a step out of order (``run`` before
  ``accept``, ``confirm`` before the app ran);
- ``MalformedMessage``: the enclave could not read the request (a bug in the NW);
- ``EnclaveFault`` (a ``TransportError``): the enclave failed inside; the door stays open.

Nothing on the door returns a key, plaintext or app source: an app crash is its exception type and
line number, app output leaves as telemetry records.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from device.enclave.frames import Channel, Client, FrameError, PeerClosed, RemoteError
from protocol import cbor, ids
from protocol.errors import LocalProtocolError, MalformedMessage, TransportError, VerificationError
from protocol.ids import DeviceId, Product, ReleaseId
from protocol.results import CommandKind, Lease

#: Seconds the NW waits for one reply before it declares the door closed.
DEFAULT_TIMEOUT_S: Final = 30.0
MAX_TELEMETRY_BATCH: Final = 256


class DoorClosed(TransportError):
    """The enclave process died or stopped answering; ``Board.reset()`` and retry."""


class BootFailed(VerificationError):
    """The RoT refused a boot stage (bad signature, rolled back, missing); nothing is running.

    The board boots only with a valid stage in flash: reinstall the stage and reset.
    """


class EnclaveRefused(VerificationError):
    """The enclave refused what the NW passed; ``kind`` is one of ``REFUSAL_KINDS``."""

    def __init__(self, kind: str, message: str) -> None:
        """Keep the refusal's ``kind`` and one-line ``message``."""
        super().__init__(message)
        self.kind = kind


class EnclaveFault(TransportError):
    """The enclave failed inside (a bug, or the RoT refused it a service); the door stays open.

    Resetting the board is the remedy when it persists.
    """


class EnclaveStateError(LocalProtocolError):
    """The NW asked for a step the enclave's current state does not allow."""


#: Refusal kinds: the signed result, the grant, the sealed image, a rolled-back image, the
#: session (unknown or already used), a signed command, a sealed blob of the NW.
REFUSAL_KINDS: Final = frozenset(
    {"result", "grant", "image", "rolled_back", "session", "command", "unseal"}
)


class AppState(StrEnum):
    """What the enclave's application slot holds."""

    EMPTY = "empty"
    LOADED = "loaded"
    RUNNING = "running"
    EXITED = "exited"
    CRASHED = "crashed"


class OfflineReason(StrEnum):
    """Why ``boot_offline`` allowed or refused an offline boot (DESIGN §8)."""

    OK = "ok"
    NO_LEASE = "no_lease"
    EXPIRED = "expired"
    BOOTS_SPENT = "boots_spent"
    IMAGE_MISSING = "image_missing"
    IMAGE_REFUSED = "image_refused"


@dataclass(frozen=True, slots=True)
class BootInfo:
    """What the enclave found at boot: identity, platform state and the image to run.

    ``release_id``/``image_version``/``image_counter`` describe the image in the boot slot as its
    header says (unverified until ``accept``); ``trial`` when that slot boots once as an update.
    """

    device_id: DeviceId
    product: Product
    lifecycle: int
    secure_boot: bool
    debug_open: bool
    boot_count: int
    counters: tuple[tuple[str, int], ...]
    runtime_version: str
    slot: str | None
    trial: bool
    release_id: ReleaseId | None
    image_version: str | None
    image_counter: int | None
    has_lease: bool


@dataclass(frozen=True, slots=True)
class Attestation:
    """A PSA token and the raw 32-byte X25519 key bound into its nonce (DESIGN §6)."""

    token: bytes
    enclave_key: bytes


@dataclass(frozen=True, slots=True)
class Accepted:
    """The enclave verified the result, opened the grant and decrypted the image into memory."""

    release_id: ReleaseId
    version: str
    security_counter: int
    lease: Lease | None


@dataclass(frozen=True, slots=True)
class CrashInfo:
    """How the app ended badly: exception type name and line (0 when unknown), or a hang."""

    exc_type: str
    line: int


@dataclass(frozen=True, slots=True)
class EnclaveStatus:
    """The app's state, the release loaded, a crash if any, and the platform counters."""

    state: AppState
    release_id: ReleaseId | None
    version: str | None
    crash: CrashInfo | None
    trial: bool
    has_lease: bool
    telemetry_dropped: int
    counters: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class TelemetryItem:
    """One record of app output: the topic suffix (``stdout`` for prints) and the payload."""

    topic_suffix: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """A verified signed command: what the NW must do next (``release_id`` for ``update``)."""

    kind: CommandKind
    seq: int
    release_id: ReleaseId | None


@dataclass(frozen=True, slots=True)
class OfflineBoot:
    """The answer to ``boot_offline``; true when the sealed lease allowed the boot."""

    allowed: bool
    reason: OfflineReason
    release_id: ReleaseId | None
    version: str | None
    boots_left: int

    def __bool__(self) -> bool:
        """Whether the app was loaded from the sealed lease."""
        return self.allowed


@dataclass(frozen=True, slots=True)
class Confirmed:
    """``confirm``: the slot now primary, the fuse "app" counter, whether a trial was confirmed."""

    slot: str
    app_counter: int
    trial_confirmed: bool


# --- wire forms (shared with device.enclave.service) ---------------------------------------------


def _present(wire: dict[str, object]) -> dict[str, object]:
    """``wire`` without its None values (absent fields read as None)."""
    return {key: value for key, value in wire.items() if value is not None}


def counters_wire(counters: tuple[tuple[str, int], ...]) -> dict[str, int]:
    """A counters tuple as a CBOR map."""
    return dict(counters)


def _counters(f: cbor.Fields, key: str) -> tuple[tuple[str, int], ...]:
    raw = f.get_map(key)
    pairs = []
    names = raw.keys()
    for name in names:
        text = cbor.expect_str(name, what=raw.what, max_len=32)
        pairs.append((text, raw.get_int(text, lo=0, hi=0xFFFF_FFFF)))
    return tuple(sorted(pairs))


def _opt_release(f: cbor.Fields, key: str) -> ReleaseId | None:
    value = f.opt_str(key, max_len=64)
    return None if value is None else ReleaseId(value)


def boot_info_wire(info: BootInfo) -> dict[str, object]:
    """The reply map of ``boot``."""
    return _present(
        {
            "device_id": info.device_id,
            "product": info.product,
            "lifecycle": info.lifecycle,
            "secure_boot": info.secure_boot,
            "debug_open": info.debug_open,
            "boot_count": info.boot_count,
            "counters": counters_wire(info.counters),
            "runtime_version": info.runtime_version,
            "slot": info.slot,
            "trial": info.trial,
            "release_id": info.release_id,
            "image_version": info.image_version,
            "image_counter": info.image_counter,
            "has_lease": info.has_lease,
        }
    )


def boot_info_from_wire(f: cbor.Fields) -> BootInfo:
    """Decode the boot info reply map (raises only ``MalformedMessage``)."""
    return BootInfo(
        device_id=ids.device_id(f.get_str("device_id", max_len=64)),
        product=ids.product(f.get_str("product", max_len=64)),
        lifecycle=f.get_int("lifecycle", lo=0, hi=0xFFFF),
        secure_boot=f.get_bool("secure_boot"),
        debug_open=f.get_bool("debug_open"),
        boot_count=f.get_int("boot_count", lo=0),
        counters=_counters(f, "counters"),
        runtime_version=f.get_str("runtime_version", max_len=32),
        slot=f.opt_str("slot", max_len=16),
        trial=f.get_bool("trial"),
        release_id=_opt_release(f, "release_id"),
        image_version=f.opt_str("image_version", max_len=32),
        image_counter=f.opt_int("image_counter", lo=0),
        has_lease=f.get_bool("has_lease"),
    )


def accepted_wire(accepted: Accepted) -> dict[str, object]:
    """The reply map of ``accept``."""
    lease = accepted.lease
    return _present(
        {
            "release_id": accepted.release_id,
            "version": accepted.version,
            "security_counter": accepted.security_counter,
            "lease": None if lease is None else [lease.offline_boots, lease.expires_s],
        }
    )


def accepted_from_wire(f: cbor.Fields) -> Accepted:
    """Decode the accepted reply map (raises only ``MalformedMessage``)."""
    lease_raw = f.opt_raw("lease")
    lease = None
    if lease_raw is not None:
        boots, expires = cbor.expect_list(lease_raw, what="accepted.lease", length=2)
        lease = Lease(
            offline_boots=cbor.expect_int(boots, what="accepted.lease.0"),
            expires_s=cbor.expect_int(expires, what="accepted.lease.1"),
        )
    return Accepted(
        release_id=ReleaseId(f.get_str("release_id", max_len=64)),
        version=f.get_str("version", max_len=32),
        security_counter=f.get_int("security_counter", lo=0),
        lease=lease,
    )


def status_wire(status: EnclaveStatus) -> dict[str, object]:
    """The reply map of ``status``/``run``/``stop``."""
    crash = status.crash
    return _present(
        {
            "state": str(status.state),
            "release_id": status.release_id,
            "version": status.version,
            "crash": None if crash is None else [crash.exc_type, crash.line],
            "trial": status.trial,
            "has_lease": status.has_lease,
            "telemetry_dropped": status.telemetry_dropped,
            "counters": counters_wire(status.counters),
        }
    )


def status_from_wire(f: cbor.Fields) -> EnclaveStatus:
    """Decode the status reply map (raises only ``MalformedMessage``)."""
    crash_raw = f.opt_raw("crash")
    crash = None
    if crash_raw is not None:
        exc_type, line = cbor.expect_list(crash_raw, what="status.crash", length=2)
        crash = CrashInfo(
            cbor.expect_str(exc_type, what="status.crash.0", max_len=64),
            cbor.expect_int(line, what="status.crash.1", lo=0),
        )
    try:
        state = AppState(f.get_str("state", max_len=16))
    except ValueError as err:
        raise MalformedMessage("status.state: unknown state") from err
    return EnclaveStatus(
        state=state,
        release_id=_opt_release(f, "release_id"),
        version=f.opt_str("version", max_len=32),
        crash=crash,
        trial=f.get_bool("trial"),
        has_lease=f.get_bool("has_lease"),
        telemetry_dropped=f.get_int("telemetry_dropped", lo=0),
        counters=_counters(f, "counters"),
    )


def outcome_wire(outcome: CommandOutcome) -> dict[str, object]:
    """The reply map of ``command``."""
    wire = {"kind": str(outcome.kind), "seq": outcome.seq, "release_id": outcome.release_id}
    return _present(wire)


def outcome_from_wire(f: cbor.Fields) -> CommandOutcome:
    """Decode the outcome reply map (raises only ``MalformedMessage``)."""
    try:
        kind = CommandKind(f.get_str("kind", max_len=16))
    except ValueError as err:
        raise MalformedMessage("command.kind: unknown kind") from err
    return CommandOutcome(kind, f.get_int("seq", lo=1), _opt_release(f, "release_id"))


def offline_wire(boot: OfflineBoot) -> dict[str, object]:
    """The reply map of ``boot_offline``."""
    return _present(
        {
            "allowed": boot.allowed,
            "reason": str(boot.reason),
            "release_id": boot.release_id,
            "version": boot.version,
            "boots_left": boot.boots_left,
        }
    )


def offline_from_wire(f: cbor.Fields) -> OfflineBoot:
    """Decode the offline reply map (raises only ``MalformedMessage``)."""
    try:
        reason = OfflineReason(f.get_str("reason", max_len=16))
    except ValueError as err:
        raise MalformedMessage("offline.reason: unknown reason") from err
    return OfflineBoot(
        allowed=f.get_bool("allowed"),
        reason=reason,
        release_id=_opt_release(f, "release_id"),
        version=f.opt_str("version", max_len=32),
        boots_left=f.get_int("boots_left", lo=0),
    )


def confirmed_wire(confirmed: Confirmed) -> dict[str, object]:
    """The reply map of ``confirm``."""
    return {
        "slot": confirmed.slot,
        "app_counter": confirmed.app_counter,
        "trial_confirmed": confirmed.trial_confirmed,
    }


def confirmed_from_wire(f: cbor.Fields) -> Confirmed:
    """Decode the confirmed reply map (raises only ``MalformedMessage``)."""
    return Confirmed(
        slot=f.get_str("slot", max_len=16),
        app_counter=f.get_int("app_counter", lo=0),
        trial_confirmed=f.get_bool("trial_confirmed"),
    )


def telemetry_from_wire(f: cbor.Fields) -> tuple[TelemetryItem, ...]:
    """Decode the telemetry reply map (raises only ``MalformedMessage``)."""
    items = f.get_list("items", max_len=MAX_TELEMETRY_BATCH)
    out = []
    for item in items:
        topic, payload = cbor.expect_list(item, what="telemetry.item", length=2)
        out.append(
            TelemetryItem(
                cbor.expect_str(topic, what="telemetry.topic", max_len=128),
                cbor.expect_bytes(payload, what="telemetry.payload", max_size=1 << 16),
            )
        )
    return tuple(out)


# --- the client -----------------------------------------------------------------------------------


class EnclaveDoor:
    """The NW's typed client over the door socket (see the module docstring for errors)."""

    __slots__ = ("_client", "_closed")

    def __init__(self, sock: socket.socket, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> None:
        """Talk over ``sock`` (the NW's end of the door socket pair)."""
        sock.settimeout(timeout_s)
        self._client = Client(Channel(sock))
        self._closed = False

    @property
    def transport(self) -> socket.socket:
        """The raw door socket: for the attack bench's malformed frames, not for the NW."""
        return self._client.channel.sock

    def boot(self) -> BootInfo:
        """Identity, platform state and the slot chosen to boot (once per power-on)."""
        return boot_info_from_wire(self._call("boot"))

    def attest(self, session_id: bytes, challenge_nonce: bytes) -> Attestation:
        """A token for ``challenge_nonce`` bound to a fresh enclave key kept for ``session_id``."""
        f = self._call("attest", session_id=session_id, challenge=challenge_nonce)
        return Attestation(f.get_bytes("token", max_size=1 << 15), f.get_bytes("key", size=32))

    def accept(self, session_id: bytes, result: bytes, grant: bytes, release_id: str) -> Accepted:
        """Verify the signed result, open the grant and load image ``release_id`` from its slot."""
        f = self._call(
            "accept", session_id=session_id, result=result, grant=grant, release_id=release_id
        )
        return accepted_from_wire(f)

    def run(self) -> EnclaveStatus:
        """Start the accepted app."""
        return status_from_wire(self._call("run"))

    def stop(self) -> EnclaveStatus:
        """Stop the app (it stays loaded)."""
        return status_from_wire(self._call("stop"))

    def status(self) -> EnclaveStatus:
        """The app's state."""
        return status_from_wire(self._call("status"))

    def poll_telemetry(self, max_items: int = 64) -> tuple[TelemetryItem, ...]:
        """Up to ``max_items`` (1..256) records of app output (≤ ~512 KiB), oldest first."""
        return telemetry_from_wire(self._call("poll_telemetry", max=max_items))

    def command(self, data: bytes) -> CommandOutcome:
        """Verify and apply a signed command (revoke erases the lease and unloads the app)."""
        return outcome_from_wire(self._call("command", command=data))

    def boot_offline(self) -> OfflineBoot:
        """Load the app under the sealed offline lease, if it still allows a boot."""
        return offline_from_wire(self._call("boot_offline"))

    def confirm(self) -> Confirmed:
        """After the app ran: advance the fuse "app" counter and confirm a trial slot."""
        return confirmed_from_wire(self._call("confirm"))

    def seal(self, data: bytes) -> bytes:
        """Seal NW data under a key only this device, lifecycle and runtime can derive."""
        return self._call("seal", data=data).get_bytes("blob")

    def unseal(self, blob: bytes) -> bytes:
        """Open a blob from ``seal``; ``EnclaveRefused("unseal")`` when it does not open."""
        return self._call("unseal", blob=blob).get_bytes("data")

    def close(self) -> None:
        """Close the door (the enclave then shuts down)."""
        if not self._closed:
            self._closed = True
            self._client.channel.close()

    def __enter__(self) -> EnclaveDoor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, op: str, **args: object) -> cbor.Fields:
        if self._closed:
            raise DoorClosed("door: closed")
        try:
            return self._client.call(op, **args)
        except PeerClosed as err:
            self.close()
            raise DoorClosed("door: the enclave is gone; reset the board") from err
        except FrameError as err:
            self.close()
            raise DoorClosed("door: the enclave sent a malformed reply") from err
        except RemoteError as err:
            raise _translate(err) from None


def _translate(err: RemoteError) -> Exception:
    if err.kind == "boot_failed":
        return BootFailed(err.message)
    if err.kind == "state":
        return EnclaveStateError(err.message)
    if err.kind == "malformed":
        return MalformedMessage(err.message)
    if err.kind in REFUSAL_KINDS:
        return EnclaveRefused(err.kind, err.message)
    return EnclaveFault(f"door: enclave failure ({err.kind}: {err.message})")
