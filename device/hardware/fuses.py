"""One-time-programmable fuses of the simulated board (DESIGN §3–§5), kept in ``fuses.bin``.

Only the RoT process reads this file (the fuses are on-die); the debug port sets one flag in it.
Every write replaces the whole file atomically (temp file, fsync, rename) under an advisory lock,
and the OTP rules are checked before anything is written, so a refused write leaves the file
byte-for-byte unchanged.

On-disk format (version 1)::

    offset  size  field
    0       8     magic b"ESFUSES\\x00"
    8       32    SHA-256 of bytes [40, EOF)
    40      ...   canonical CBOR map, to EOF:
                    "format"               uint, 1
                    "huk"                  bstr 32      absent until burned
                    "rotpk_hash"           bstr 32      absent until burned
                    "secure_boot"          bool
                    "lifecycle"            uint 0..0xFFFF (PSA security lifecycle)
                    "counters"             map tstr -> uint (monotonic counters by name)
                    "debug_unlock_pending" bool
                    "device_id"            tstr
                    "product"              tstr

OTP rules, enforced by ``Fuses``: a counter only grows; the lifecycle never decreases (its class
``value >> 8`` never goes back, nor the value within a class); the HUK and the ROTPK hash are
burned once; secure boot can be turned on, never off; the set of counter names is fixed at burn.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import IntEnum
from pathlib import Path
from types import MappingProxyType
from typing import Final

from device.hardware._files import atomic_write, locked
from protocol import cbor
from protocol.errors import MalformedMessage, UsageError
from protocol.ids import device_id as check_device_id
from protocol.ids import product as check_product

FUSES_FILE: Final = "fuses.bin"
FORMAT_VERSION: Final = 1
MAGIC: Final = b"ESFUSES\x00"
HEADER_SIZE: Final = 40
KEY_SIZE: Final = 32
#: A fuse counter is a 32-bit bank.
COUNTER_MAX: Final = 0xFFFF_FFFF
#: "command_seq" holds the highest signed-command sequence number the enclave accepted: in
#: flash it could be rolled back, and a seen command would be new again (DESIGN §8).
DEFAULT_COUNTERS: Final = ("bl2", "runtime", "app", "offline_boots", "command_seq")
_MAX_FILE: Final = 64 * 1024
_COUNTER_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_FIELDS: Final = frozenset(
    {
        "format",
        "huk",
        "rotpk_hash",
        "secure_boot",
        "lifecycle",
        "counters",
        "debug_unlock_pending",
        "device_id",
        "product",
    }
)


class Lifecycle(IntEnum):
    """PSA security lifecycle states (RFC 9783 §4.2.6); compare classes as ``value >> 8``."""

    UNKNOWN = 0x0000
    ASSEMBLY_AND_TEST = 0x1000
    PSA_ROT_PROVISIONING = 0x2000
    SECURED = 0x3000
    NON_PSA_ROT_DEBUG = 0x4000
    RECOVERABLE_PSA_ROT_DEBUG = 0x5000
    DECOMMISSIONED = 0x6000


_KNOWN_CLASSES: Final = frozenset(state.value >> 8 for state in Lifecycle)


class FuseError(UsageError):
    """Raised by ``Fuses`` for a write the OTP rules forbid (lowering, re-burning, turning off).

    Nothing was written. The caller asked for something the silicon cannot do: fix the caller.
    """


class FuseFileError(FuseError):
    """Raised by ``Fuses.load`` when ``fuses.bin`` is missing or corrupt; the message names it.

    A board without a readable fuse file cannot boot: re-run manufacture for a fresh board.
    """


def lifecycle_class(value: int) -> int:
    """The lifecycle class of ``value``: its upper byte (DESIGN §4)."""
    return value >> 8


def check_lifecycle(value: int) -> int:
    """Validate a lifecycle value: 16 bits whose class is a PSA state.

    Raises:
        FuseError: ``value`` is not a PSA security lifecycle value.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise FuseError(f"lifecycle: expected an integer 0..0xFFFF, got {value!r}")
    if lifecycle_class(value) not in _KNOWN_CLASSES:
        raise FuseError(f"lifecycle: 0x{value:04x} is not a PSA lifecycle state")
    return int(value)


@dataclass(frozen=True, slots=True)
class FuseMap:
    """A snapshot of every fuse; ``huk`` and ``rotpk_hash`` are None until burned."""

    huk: bytes | None
    rotpk_hash: bytes | None
    secure_boot: bool
    lifecycle: int
    counters: Mapping[str, int]
    debug_unlock_pending: bool
    device_id: str
    product: str

    def encode(self) -> bytes:
        """The whole ``fuses.bin`` file: magic, SHA-256 of the body, CBOR body."""
        body = cbor.dumps(self._cbor_map())
        return MAGIC + hashlib.sha256(body).digest() + body

    def _cbor_map(self) -> dict[str, object]:
        out: dict[str, object] = {
            "format": FORMAT_VERSION,
            "secure_boot": self.secure_boot,
            "lifecycle": self.lifecycle,
            "counters": dict(self.counters),
            "debug_unlock_pending": self.debug_unlock_pending,
            "device_id": self.device_id,
            "product": self.product,
        }
        if self.huk is not None:
            out["huk"] = self.huk
        if self.rotpk_hash is not None:
            out["rotpk_hash"] = self.rotpk_hash
        return out

    @classmethod
    def decode(cls, data: bytes) -> FuseMap:
        """Decode a whole ``fuses.bin`` file.

        Raises:
            MalformedMessage: wrong magic or digest, bad CBOR, a missing or mistyped field.
        """
        if len(data) < HEADER_SIZE or data[:8] != MAGIC:
            raise MalformedMessage("fuses: expected magic ESFUSES at offset 0")
        body = data[HEADER_SIZE:]
        if hashlib.sha256(body).digest() != data[8:HEADER_SIZE]:
            raise MalformedMessage("fuses: body digest mismatch")
        fields = cbor.Fields(cbor.loads(body, what="fuses", max_bytes=_MAX_FILE), what="fuses")
        fields.only(_FIELDS)
        version = fields.get_int("format")
        if version != FORMAT_VERSION:
            raise MalformedMessage(f"fuses.format: expected {FORMAT_VERSION}, got {version}")
        return cls(
            huk=fields.opt_bytes("huk", size=KEY_SIZE),
            rotpk_hash=fields.opt_bytes("rotpk_hash", size=KEY_SIZE),
            secure_boot=fields.get_bool("secure_boot"),
            lifecycle=fields.get_int("lifecycle", lo=0, hi=0xFFFF),
            counters=_decode_counters(fields.get_map("counters")),
            debug_unlock_pending=fields.get_bool("debug_unlock_pending"),
            device_id=check_device_id(fields.get_str("device_id", max_len=64)),
            product=check_product(fields.get_str("product", max_len=64)),
        )


def _decode_counters(fields: cbor.Fields) -> Mapping[str, int]:
    counters: dict[str, int] = {}
    for name in sorted(fields.keys(), key=repr):
        if not isinstance(name, str) or not _COUNTER_NAME.fullmatch(name):
            raise MalformedMessage(f"{fields.what}: bad counter name {name!r:.40}")
        counters[name] = fields.get_int(name, lo=0, hi=COUNTER_MAX)
    return MappingProxyType(counters)


def _check_key(value: bytes, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != KEY_SIZE:
        raise FuseError(f"{what}: expected {KEY_SIZE} bytes")
    return value


def _check_counter_value(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= COUNTER_MAX:
        raise FuseError(f"counter {name!r}: expected an integer 0..{COUNTER_MAX}, got {value!r}")
    return value


def _check_counters(counters: Mapping[str, int]) -> Mapping[str, int]:
    for name, value in counters.items():
        if not isinstance(name, str) or not _COUNTER_NAME.fullmatch(name):
            raise FuseError(f"counter name: expected [a-z][a-z0-9_]{{0,31}}, got {name!r:.40}")
        _check_counter_value(name, value)
    return MappingProxyType(dict(counters))


def _check_name(check: Callable[[str], str], value: str) -> str:
    try:
        return check(value)
    except MalformedMessage as err:
        raise FuseError(str(err)) from err


class Fuses:
    """A handle on ``fuses.bin``: ``map`` is the snapshot last read; writes re-read under a lock.

    Every mutating method locks the file, reloads it (another process may have written it),
    checks the OTP rule, writes the new file atomically and refreshes ``map``.
    """

    __slots__ = ("map", "path")

    def __init__(self, path: Path, fuse_map: FuseMap) -> None:
        self.path = path
        self.map = fuse_map

    @classmethod
    def burn(
        cls,
        path: Path,
        *,
        device_id: str,
        product: str,
        lifecycle: int,
        secure_boot: bool,
        huk: bytes | None = None,
        rotpk_hash: bytes | None = None,
        counters: Mapping[str, int] | None = None,
    ) -> Fuses:
        """Create ``fuses.bin`` at manufacture; an existing file is never overwritten.

        Args:
            lifecycle: the PSA lifecycle to start in (a product board: ``Lifecycle.SECURED``).
            secure_boot: whether the RoT verifies boot stages (off only on development boards).
            huk, rotpk_hash: 32 bytes each; left unburned when None (``burn_huk`` later).
            counters: initial counter values by name; default: ``DEFAULT_COUNTERS`` at 0.

        Raises:
            FuseError: the file exists already, or a value is out of range.
        """
        fuse_map = FuseMap(
            huk=None if huk is None else _check_key(huk, "huk"),
            rotpk_hash=None if rotpk_hash is None else _check_key(rotpk_hash, "rotpk_hash"),
            secure_boot=bool(secure_boot),
            lifecycle=check_lifecycle(lifecycle),
            counters=_check_counters(
                dict.fromkeys(DEFAULT_COUNTERS, 0) if counters is None else counters
            ),
            debug_unlock_pending=False,
            device_id=_check_name(check_device_id, device_id),
            product=_check_name(check_product, product),
        )
        with locked(path):
            if path.exists():
                raise FuseError(f"{path}: fuses already burned; a board is manufactured once")
            atomic_write(path, fuse_map.encode())
        return cls(path, fuse_map)

    @classmethod
    def load(cls, path: Path) -> Fuses:
        """Read ``fuses.bin``.

        Raises:
            FuseFileError: the file is missing, unreadable or corrupt.
        """
        return cls(path, _read(path))

    @classmethod
    def in_home(cls, home: Path) -> Fuses:
        """Read the fuses of the board whose home directory is ``home``."""
        return cls.load(home / FUSES_FILE)

    def reload(self) -> FuseMap:
        """Re-read the file (another process may have written it) and return the new snapshot."""
        self.map = _read(self.path)
        return self.map

    # Reads ------------------------------------------------------------------------------------

    @property
    def huk(self) -> bytes:
        """The hardware unique key.

        Raises:
            FuseError: the HUK is not burned.
        """
        if self.map.huk is None:
            raise FuseError(f"{self.path}: the HUK is not burned")
        return self.map.huk

    @property
    def rotpk_hash(self) -> bytes:
        """SHA-256 of the boot-stage signing key (ROTPK).

        Raises:
            FuseError: the ROTPK hash is not burned.
        """
        if self.map.rotpk_hash is None:
            raise FuseError(f"{self.path}: the ROTPK hash is not burned")
        return self.map.rotpk_hash

    @property
    def lifecycle(self) -> int:
        """The PSA security lifecycle value."""
        return self.map.lifecycle

    @property
    def secure_boot(self) -> bool:
        """Whether the RoT must verify boot stages against the ROTPK."""
        return self.map.secure_boot

    def counter(self, name: str) -> int:
        """The value of counter ``name``.

        Raises:
            FuseError: no counter of that name was burned.
        """
        if name not in self.map.counters:
            raise FuseError(f"{self.path}: no fuse counter named {name!r}")
        return self.map.counters[name]

    # OTP writes -------------------------------------------------------------------------------

    def burn_huk(self, huk: bytes) -> None:
        """Burn the HUK; allowed once.

        Raises:
            FuseError: the HUK is already burned or is not 32 bytes.
        """
        _check_key(huk, "huk")
        with locked(self.path):
            current = self.reload()
            if current.huk is not None:
                raise FuseError(f"{self.path}: the HUK is already burned")
            self._write(replace(current, huk=huk))

    def burn_rotpk_hash(self, rotpk_hash: bytes) -> None:
        """Burn the ROTPK hash; allowed once.

        Raises:
            FuseError: the ROTPK hash is already burned or is not 32 bytes.
        """
        _check_key(rotpk_hash, "rotpk_hash")
        with locked(self.path):
            current = self.reload()
            if current.rotpk_hash is not None:
                raise FuseError(f"{self.path}: the ROTPK hash is already burned")
            self._write(replace(current, rotpk_hash=rotpk_hash))

    def set_secure_boot(self, enabled: bool) -> None:
        """Turn secure boot on (once, for good); asking for the current state is a no-op.

        Raises:
            FuseError: asked to turn secure boot off after it was turned on.
        """
        with locked(self.path):
            current = self.reload()
            if current.secure_boot == enabled:
                return
            if not enabled:
                raise FuseError(f"{self.path}: secure boot is a fuse; it cannot be turned off")
            self._write(replace(current, secure_boot=True))

    def advance_counter(self, name: str, value: int) -> int:
        """Raise counter ``name`` to ``value``; the same value is a no-op. Returns the value.

        Raises:
            FuseError: ``value`` is below the current value, out of range, or no such counter.
        """
        _check_counter_value(name, value)
        with locked(self.path):
            current = self.reload()
            old = self.counter(name)
            if value < old:
                raise FuseError(
                    f"counter {name!r}: cannot lower a fuse counter from {old} to {value}"
                )
            if value > old:
                self._write_counter(current, name, value)
        return value

    def increment_counter(self, name: str) -> int:
        """Add one to counter ``name`` and return the new value (e.g. "offline_boots").

        Raises:
            FuseError: no such counter, or it is at its maximum.
        """
        with locked(self.path):
            current = self.reload()
            value = _check_counter_value(name, self.counter(name) + 1)
            self._write_counter(current, name, value)
        return value

    def _write_counter(self, current: FuseMap, name: str, value: int) -> None:
        counters = MappingProxyType({**current.counters, name: value})
        self._write(replace(current, counters=counters))

    def set_lifecycle(self, value: int) -> None:
        """Move the lifecycle forward to ``value``; the current value is a no-op.

        Raises:
            FuseError: ``value`` is not a PSA lifecycle value, or it is below the current one
                (a lower class, or a lower value within the same class).
        """
        value = check_lifecycle(value)
        with locked(self.path):
            current = self.reload()
            _check_forward(current.lifecycle, value)
            if value != current.lifecycle:
                self._write(replace(current, lifecycle=value))

    def request_debug_unlock(self) -> None:
        """Set the debug-unlock-pending flag (the debug port's request, DESIGN §4)."""
        with locked(self.path):
            current = self.reload()
            if not current.debug_unlock_pending:
                self._write(replace(current, debug_unlock_pending=True))

    def complete_debug_unlock(self) -> bool:
        """At reset: if an unlock is pending, clear the flag and move to NON_PSA_ROT_DEBUG.

        A board already in a later class (recoverable debug, decommissioned) keeps its lifecycle.
        Flag and lifecycle change in one atomic write. Returns whether an unlock was pending.
        """
        with locked(self.path):
            current = self.reload()
            if not current.debug_unlock_pending:
                return False
            lifecycle = max(current.lifecycle, int(Lifecycle.NON_PSA_ROT_DEBUG))
            self._write(replace(current, debug_unlock_pending=False, lifecycle=lifecycle))
        return True

    def _write(self, fuse_map: FuseMap) -> None:
        atomic_write(self.path, fuse_map.encode())
        self.map = fuse_map


def _check_forward(old: int, new: int) -> None:
    if lifecycle_class(new) < lifecycle_class(old):
        raise FuseError(f"lifecycle: cannot move back from 0x{old:04x} to 0x{new:04x} (class)")
    if new < old:
        raise FuseError(f"lifecycle: cannot move back from 0x{old:04x} to 0x{new:04x}")


def _read(path: Path) -> FuseMap:
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise FuseFileError(f"{path}: fuse file missing; burn it at manufacture") from err
    except OSError as err:
        raise FuseFileError(f"{path}: cannot read the fuse file ({err.strerror})") from err
    if len(data) > _MAX_FILE:
        raise FuseFileError(f"{path}: fuse file corrupt ({len(data)} bytes, too large)")
    try:
        return FuseMap.decode(data)
    except MalformedMessage as err:
        raise FuseFileError(f"{path}: fuse file corrupt ({err})") from err
