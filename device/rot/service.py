"""The root of trust: fuses, boot-stage measurement, token signing, sealing keys (DESIGN §3–§5).

The RoT is the only reader of ``fuses.bin``. It serves one peer, the enclave runtime, over a frame
pipe (``device.enclave.frames``); nothing else on the board can reach it. Requests (``op``: args →
result):

- ``load_stage``: kind ("BL2" then "RT", each once per power-on) → payload. The RoT reads the
  stage from its flash partition itself, verifies it against the ROTPK hash when secure boot is
  on (and refuses a counter below the stage's fuse counter, advancing the counter for a newer
  verified stage), measures it and records the measurement. The enclave executes exactly the
  returned bytes.
- ``device_info``: → device id, product, lifecycle, secure boot, debug port, boot count, counters.
- ``sign_token``: nonce, client id → token. The claims carry the measurements the RoT recorded,
  never any the caller supplies; the IAK is of the lifecycle class in force at power-on.
- ``clear_app``: → {}. The app was unloaded (revoked): tokens carry no application component.
- ``set_app``: manifest digest, version, signer id → {}. The application component. The RoT
  cannot decrypt the app, so it accepts the measurement as the digest of the signed manifest
  the measured runtime stage reports it opened (DESIGN §5: the app's measurement is that digest,
  never of its plaintext). A runtime that lies here is a modified runtime, and its own RT
  measurement, which it cannot influence, gives it away.
- ``sealing_key``: label → 32-byte key, HKDF(HUK) bound to the lifecycle class, the recorded
  runtime measurement and the label. Refused before the runtime stage is measured.
- ``advance_counter``: name ("app", "offline_boots" or "command_seq"), value → value.
  ``count_offline_boot`` → the new "offline_boots" value. ``fuse_counters`` → counters.
  ``debug_state`` → lifecycle, open.
- ``confirm_image``: → the primary slot after confirming a running trial (no-op without one).

Error kinds: ``refused`` (a check failed), ``order`` (a step out of order), ``malformed``,
``internal``. No reply ever carries the HUK or the IAK.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec

from device.hardware.debug import apply_at_reset, debug_port_open
from device.hardware.flash import FLASH_FILE, Flash
from device.hardware.fuses import Fuses
from device.hardware.slots import SlotStore
from protocol import keys, psa
from protocol.cbor import Fields
from protocol.errors import (
    EdgesealError,
    InvalidImage,
    LocalProtocolError,
    MalformedMessage,
    UsageError,
    VerificationError,
)
from protocol.stage import (
    ParsedStage,
    StageKind,
    parse_unverified_stage,
    stage_measurement,
    stage_signer_id,
    verify_stage,
)

#: The PSA implementation id of this simulated RoT (RFC 9783 §4.2.2): a constant of the silicon.
IMPLEMENTATION_ID: Final = hashlib.sha256(b"edgeseal/implementation/simulated-rot/v1").digest()
#: Fuse counter the RoT increments at each power-on; reported as the boot count, not a counter.
BOOT_COUNTER: Final = "boots"
#: Flash partition and fuse counter of each boot stage.
STAGE_PARTITIONS: Final = {StageKind.BL2: "bl2", StageKind.RUNTIME: "runtime"}
STAGE_COUNTERS: Final = {StageKind.BL2: "bl2", StageKind.RUNTIME: "runtime"}
#: Counters the enclave runtime may advance.
ENCLAVE_COUNTERS: Final = frozenset({"app", "offline_boots", "command_seq"})
SEAL_LABEL_MAX: Final = 64
_DIGEST_SIZES: Final = frozenset({32, 48, 64})


class StageRefused(InvalidImage):
    """``load_stage``: the stage is missing, unsigned, signed by another key, or rolled back."""


class OutOfOrder(LocalProtocolError):
    """A request out of the boot order (RT before BL2, a stage twice, a key before the RT)."""


@dataclass(frozen=True, slots=True)
class PowerOn:
    """What the RoT fixes at power-on: the lifecycle in force, its IAK and the boot seed."""

    lifecycle: int
    iak: ec.EllipticCurvePrivateKey
    boot_seed: bytes
    boot_count: int


def power_on(fuses: Fuses, boot_seed: bytes) -> PowerOn:
    """Reset sequence: apply a pending debug unlock, count the boot, derive the IAK.

    Raises:
        FuseError: the HUK is not burned.
    """
    apply_at_reset(fuses)
    boot_count = 0
    if BOOT_COUNTER in fuses.map.counters:
        boot_count = fuses.increment_counter(BOOT_COUNTER)
    lifecycle = fuses.reload().lifecycle
    iak = keys.derive_iak(fuses.huk, psa.lifecycle_class(lifecycle))
    return PowerOn(lifecycle, iak, boot_seed, boot_count)


class RotService:
    """The RoT's request handler for one power-on."""

    __slots__ = ("_app", "_components", "_fuses", "_home", "_power")

    def __init__(self, home: Path, fuses: Fuses, power: PowerOn) -> None:
        """Serve the board in ``home`` with its fuses and the power-on state."""
        self._home = home
        self._fuses = fuses
        self._power = power
        self._components: dict[StageKind, psa.SoftwareComponent] = {}
        self._app: psa.SoftwareComponent | None = None

    def handle(self, op: str, args: Fields) -> Mapping[str, object]:
        """Dispatch one request (see the module docstring).

        Raises:
            MalformedMessage: unknown op or bad arguments.
            StageRefused, OutOfOrder, VerificationError: the request is refused.
        """
        handler = _OPS.get(op)
        if handler is None:
            raise MalformedMessage(f"rot: unknown op {op!r:.40}")
        return handler(self, args)

    # Boot stages ------------------------------------------------------------------------------

    def _load_stage(self, args: Fields) -> Mapping[str, object]:
        kind = _stage_kind(args.get_str("kind", max_len=8))
        if kind in self._components:
            raise OutOfOrder(f"rot: stage {kind} already loaded this power-on")
        if kind is StageKind.RUNTIME and StageKind.BL2 not in self._components:
            raise OutOfOrder("rot: RT requested before BL2")
        flash = Flash.open(self._home / FLASH_FILE)
        try:
            parsed = parse_unverified_stage(flash.read_blob(STAGE_PARTITIONS[kind]))
        except (MalformedMessage, UsageError) as err:
            raise StageRefused(f"rot: stage {kind} is missing or malformed") from err
        if parsed.stage.kind is not kind:
            raise StageRefused(f"rot: partition {STAGE_PARTITIONS[kind]} holds another stage")
        if self._fuses.secure_boot:
            self._verify(kind, parsed.stage.security_counter, parsed)
        self._components[kind] = psa.SoftwareComponent(
            measurement_value=stage_measurement(parsed),
            signer_id=stage_signer_id(parsed),
            measurement_type=str(kind),
            version=parsed.stage.version,
            measurement_desc="sha-256",
        )
        return {"payload": parsed.payload}

    def _verify(self, kind: StageKind, counter: int, parsed: ParsedStage) -> None:
        try:
            verify_stage(parsed, self._fuses.rotpk_hash)
        except InvalidImage as err:
            raise StageRefused(f"rot: stage {kind} does not verify against the ROTPK") from err
        name = STAGE_COUNTERS[kind]
        floor = self._fuses.counter(name) if name in self._fuses.map.counters else 0
        if counter < floor:
            raise StageRefused(f"rot: stage {kind} counter {counter} is below the fuse {floor}")
        if counter > floor and name in self._fuses.map.counters:
            self._fuses.advance_counter(name, counter)

    # Identity and evidence --------------------------------------------------------------------

    def _device_info(self, _args: Fields) -> Mapping[str, object]:
        fuse_map = self._fuses.reload()
        return {
            "device_id": fuse_map.device_id,
            "product": fuse_map.product,
            "lifecycle": self._power.lifecycle,
            "secure_boot": fuse_map.secure_boot,
            "debug_open": debug_port_open(self._power.lifecycle),
            "boot_count": self._power.boot_count,
            "counters": self._counters(),
        }

    def _counters(self) -> dict[str, int]:
        counters = self._fuses.reload().counters
        return {name: value for name, value in counters.items() if name != BOOT_COUNTER}

    def _sign_token(self, args: Fields) -> Mapping[str, object]:
        nonce = args.get_bytes("nonce", max_size=64)
        if len(nonce) not in _DIGEST_SIZES:
            raise MalformedMessage("rot.sign_token.nonce: expected 32, 48 or 64 bytes")
        client_id = args.get_int("client_id", lo=psa.CLIENT_ID_MIN, hi=psa.CLIENT_ID_MAX)
        self._require_runtime()
        components = [self._components[k] for k in (StageKind.BL2, StageKind.RUNTIME)]
        if self._app is not None:
            components.append(self._app)
        claims = psa.PsaClaims(
            profile=psa.PROFILE_RFC9783,
            client_id=client_id,
            lifecycle=self._power.lifecycle,
            implementation_id=IMPLEMENTATION_ID,
            boot_seed=self._power.boot_seed,
            instance_id=keys.instance_id(self._power.iak.public_key()),
            nonce=nonce,
            software_components=tuple(components),
            platform=psa.PlatformClaims.create(
                self._counters(),
                boot_count=self._power.boot_count,
                secure_boot=self._fuses.secure_boot,
                debug_port_open=debug_port_open(self._power.lifecycle),
                smt_enabled=False,
            ),
        )
        return {"token": psa.sign_token(claims, self._power.iak)}

    def _set_app(self, args: Fields) -> Mapping[str, object]:
        self._require_runtime()
        self._app = psa.SoftwareComponent(
            measurement_value=args.get_bytes("manifest_digest", size=32),
            signer_id=args.get_bytes("signer_id", size=32),
            measurement_type="APP",
            version=args.get_str("version", max_len=32),
            measurement_desc="sha-256",
        )
        return {}

    def _clear_app(self, _args: Fields) -> Mapping[str, object]:
        self._require_runtime()
        self._app = None
        return {}

    # Keys and counters ------------------------------------------------------------------------

    def _sealing_key(self, args: Fields) -> Mapping[str, object]:
        label = args.get_str("label", max_len=SEAL_LABEL_MAX)
        runtime = self._require_runtime()
        # DESIGN §4: bound to the lifecycle class and the caller's (the runtime's) measurement;
        # the measurement is 32 bytes, so appending the label is unambiguous.
        binding = runtime.measurement_value + label.encode()
        key = keys.derive_sealing_key(
            self._fuses.huk, psa.lifecycle_class(self._power.lifecycle), binding
        )
        return {"key": key}

    def _advance_counter(self, args: Fields) -> Mapping[str, object]:
        self._require_runtime()
        name = args.get_str("name", max_len=32)
        if name not in ENCLAVE_COUNTERS:
            raise VerificationError(f"rot: counter {name!r:.32} is not the enclave's to advance")
        value = args.get_int("value", lo=0, hi=0xFFFF_FFFF)
        return {"value": self._fuses.advance_counter(name, value)}

    def _count_offline_boot(self, _args: Fields) -> Mapping[str, object]:
        self._require_runtime()
        return {"value": self._fuses.increment_counter("offline_boots")}

    def _fuse_counters(self, _args: Fields) -> Mapping[str, object]:
        return {"counters": self._counters()}

    def _debug_state(self, _args: Fields) -> Mapping[str, object]:
        return {
            "lifecycle": self._power.lifecycle,
            "open": debug_port_open(self._power.lifecycle),
        }

    def _confirm_image(self, _args: Fields) -> Mapping[str, object]:
        self._require_runtime()
        slots = SlotStore(Flash.open(self._home / FLASH_FILE))
        if slots.state().swap.name == "TRIAL":
            return {"slot": slots.confirm(), "confirmed": True}
        return {"slot": slots.active(), "confirmed": False}

    def _require_runtime(self) -> psa.SoftwareComponent:
        runtime = self._components.get(StageKind.RUNTIME)
        if runtime is None:
            raise OutOfOrder("rot: the runtime stage is not measured yet")
        return runtime


def _stage_kind(text: str) -> StageKind:
    try:
        return StageKind(text)
    except ValueError as err:
        raise MalformedMessage(f"rot.load_stage.kind: expected BL2 or RT, got {text!r:.8}") from err


_OPS: Final = {
    "load_stage": RotService._load_stage,
    "device_info": RotService._device_info,
    "sign_token": RotService._sign_token,
    "set_app": RotService._set_app,
    "clear_app": RotService._clear_app,
    "sealing_key": RotService._sealing_key,
    "advance_counter": RotService._advance_counter,
    "count_offline_boot": RotService._count_offline_boot,
    "fuse_counters": RotService._fuse_counters,
    "debug_state": RotService._debug_state,
    "confirm_image": RotService._confirm_image,
}


def classify(err: Exception) -> tuple[str, str]:
    """The error reply for a handler exception: kind and a one-line message (no key bytes)."""
    if isinstance(err, OutOfOrder):
        return "order", str(err)
    if isinstance(err, MalformedMessage):
        return "malformed", str(err)
    if isinstance(err, VerificationError | UsageError | EdgesealError):
        return "refused", str(err)
    return "internal", type(err).__name__
