"""Fuses (OTP rules, file format), the debug port and the board clock (device.hardware)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.hardware.clock import CLOCK_FILE, BoardClock, ClockError
from device.hardware.debug import DebugPort, apply_at_reset, debug_port_open
from device.hardware.fuses import (
    FUSES_FILE,
    FuseError,
    FuseFileError,
    FuseMap,
    Fuses,
    Lifecycle,
    check_lifecycle,
)
from protocol import cbor
from protocol.errors import MalformedMessage, UsageError


def _burn(home: Path, rng: random.Random, **kwargs: object) -> Fuses:
    """Burn a board's fuses with a seeded HUK and ROTPK hash."""
    args: dict[str, object] = {
        "device_id": "dev-1",
        "product": "thermostat",
        "huk": rng.randbytes(32),
        "rotpk_hash": rng.randbytes(32),
        "lifecycle": Lifecycle.SECURED,
        "secure_boot": False,
    }
    args.update(kwargs)
    return Fuses.burn(home / FUSES_FILE, **args)  # type: ignore[arg-type]


@pytest.fixture
def fuses(tmp_path: Path, rng: random.Random) -> Fuses:
    """A SECURED board's fuses with the default counters."""
    return _burn(tmp_path, rng)


def test_burn_then_load_round_trips(fuses: Fuses) -> None:
    """Every field burned at manufacture reads back unchanged from the file."""
    loaded = Fuses.load(fuses.path)
    assert loaded.map == fuses.map
    assert loaded.huk == fuses.map.huk
    assert loaded.rotpk_hash == fuses.map.rotpk_hash
    assert loaded.lifecycle == Lifecycle.SECURED
    assert loaded.secure_boot is False
    assert dict(loaded.map.counters) == {
        "bl2": 0,
        "runtime": 0,
        "app": 0,
        "offline_boots": 0,
        "command_seq": 0,
    }
    assert (loaded.map.device_id, loaded.map.product) == ("dev-1", "thermostat")
    assert Fuses.in_home(fuses.path.parent).map == fuses.map


def test_file_starts_with_magic_and_body_digest(fuses: Fuses) -> None:
    """The file is magic, SHA-256 of the body, then a canonical CBOR map with a format version."""
    data = fuses.path.read_bytes()
    assert data[:8] == b"ESFUSES\x00"
    assert data[8:40] == hashlib.sha256(data[40:]).digest()
    body = cbor.Fields(cbor.loads(data[40:], what="t"), what="t")
    assert body.get_int("format") == 1
    assert cbor.dumps(cbor.loads(data[40:], what="t")) == data[40:]


def test_counter_advances_and_never_lowers(fuses: Fuses) -> None:
    """A counter grows; lowering it fails and leaves the file byte-for-byte unchanged."""
    assert fuses.advance_counter("app", 5) == 5
    assert fuses.advance_counter("app", 5) == 5
    before = fuses.path.read_bytes()
    with pytest.raises(FuseError, match="cannot lower"):
        fuses.advance_counter("app", 4)
    assert fuses.path.read_bytes() == before
    assert Fuses.load(fuses.path).counter("app") == 5


def test_counter_refuses_unknown_name_and_out_of_range(fuses: Fuses) -> None:
    """An unknown counter, a negative value, a bool or one past 32 bits is refused unwritten."""
    before = fuses.path.read_bytes()
    with pytest.raises(FuseError, match="no fuse counter"):
        fuses.advance_counter("nope", 1)
    for bad in (-1, 1 << 32, True):
        with pytest.raises(FuseError, match="expected an integer"):
            fuses.advance_counter("app", bad)
    assert fuses.path.read_bytes() == before


def test_increment_counter_counts_up_to_the_limit(tmp_path: Path, rng: random.Random) -> None:
    """increment_counter adds one each time and refuses to wrap past the 32-bit maximum."""
    fuses = _burn(tmp_path, rng, counters={"offline_boots": 0xFFFF_FFFE})
    assert fuses.increment_counter("offline_boots") == 0xFFFF_FFFF
    before = fuses.path.read_bytes()
    with pytest.raises(FuseError):
        fuses.increment_counter("offline_boots")
    with pytest.raises(FuseError, match="no fuse counter"):
        fuses.increment_counter("app")
    assert fuses.path.read_bytes() == before


def test_write_sees_another_handles_update(fuses: Fuses) -> None:
    """A stale handle re-reads under the lock, so it cannot undo another process's advance."""
    other = Fuses.load(fuses.path)
    other.advance_counter("bl2", 7)
    with pytest.raises(FuseError, match="cannot lower"):
        fuses.advance_counter("bl2", 3)
    fuses.advance_counter("runtime", 2)
    assert dict(Fuses.load(fuses.path).map.counters)["bl2"] == 7


def test_lifecycle_moves_only_forward(fuses: Fuses) -> None:
    """The lifecycle moves forward; restoring SECURED after a debug state is refused unwritten."""
    fuses.set_lifecycle(Lifecycle.SECURED)  # same value: a no-op
    fuses.set_lifecycle(0x3001)
    with pytest.raises(FuseError, match="cannot move back"):
        fuses.set_lifecycle(0x3000)
    fuses.set_lifecycle(Lifecycle.NON_PSA_ROT_DEBUG)
    before = fuses.path.read_bytes()
    with pytest.raises(FuseError, match=r"\(class\)"):
        fuses.set_lifecycle(Lifecycle.SECURED)
    assert fuses.path.read_bytes() == before
    assert Fuses.load(fuses.path).lifecycle == Lifecycle.NON_PSA_ROT_DEBUG


@pytest.mark.parametrize("value", [-1, 0x10000, 0x3100, 0x7000, 0xFF00])
def test_lifecycle_refuses_non_psa_values(value: int) -> None:
    """A value outside 16 bits or whose class is no PSA state is refused."""
    with pytest.raises(FuseError):
        check_lifecycle(value)


def test_huk_and_rotpk_hash_burn_once(tmp_path: Path, rng: random.Random) -> None:
    """An unburned HUK or ROTPK hash can be burned once; re-burning either is refused unwritten."""
    fuses = _burn(tmp_path, rng, huk=None, rotpk_hash=None)
    with pytest.raises(FuseError, match="HUK is not burned"):
        _ = fuses.huk
    with pytest.raises(FuseError, match="ROTPK hash is not burned"):
        _ = fuses.rotpk_hash
    huk, rotpk = rng.randbytes(32), rng.randbytes(32)
    fuses.burn_huk(huk)
    fuses.burn_rotpk_hash(rotpk)
    before = fuses.path.read_bytes()
    with pytest.raises(FuseError, match="already burned"):
        fuses.burn_huk(rng.randbytes(32))
    with pytest.raises(FuseError, match="already burned"):
        fuses.burn_rotpk_hash(rng.randbytes(32))
    with pytest.raises(FuseError, match="32 bytes"):
        fuses.burn_huk(b"short")
    assert fuses.path.read_bytes() == before
    assert (Fuses.load(fuses.path).huk, Fuses.load(fuses.path).rotpk_hash) == (huk, rotpk)


def test_burn_refuses_an_existing_file(fuses: Fuses, rng: random.Random) -> None:
    """Manufacturing a board twice (re-burning every fuse) fails and leaves the file unchanged."""
    before = fuses.path.read_bytes()
    with pytest.raises(FuseError, match="already burned"):
        _burn(fuses.path.parent, rng)
    assert fuses.path.read_bytes() == before


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("device_id", "bad/id"),
        ("product", ""),
        ("huk", b"x" * 31),
        ("lifecycle", 0x9000),
        ("counters", {"Bad": 0}),
        ("counters", {"app": -1}),
    ],
)
def test_burn_refuses_bad_values(
    tmp_path: Path, rng: random.Random, field: str, value: object
) -> None:
    """Burning with a malformed field fails as FuseError (a UsageError) and writes no file."""
    with pytest.raises(FuseError) as info:
        _burn(tmp_path, rng, **{field: value})
    assert isinstance(info.value, UsageError)
    assert not (tmp_path / FUSES_FILE).exists()


def test_secure_boot_turns_on_never_off(fuses: Fuses) -> None:
    """Secure boot goes on once; turning it off afterwards is refused and nothing is written."""
    fuses.set_secure_boot(False)  # already off: a no-op
    fuses.set_secure_boot(True)
    fuses.set_secure_boot(True)
    before = fuses.path.read_bytes()
    with pytest.raises(FuseError, match="cannot be turned off"):
        fuses.set_secure_boot(False)
    assert fuses.path.read_bytes() == before
    assert Fuses.load(fuses.path).secure_boot is True


def test_interrupted_write_keeps_the_old_file(
    fuses: Fuses, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails before the rename leaves the old file and no temp file behind."""
    before = fuses.path.read_bytes()

    def fail(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        fuses.advance_counter("app", 9)
    monkeypatch.undo()
    assert fuses.path.read_bytes() == before
    assert sorted(p.name for p in fuses.path.parent.iterdir()) == [FUSES_FILE, FUSES_FILE + ".lock"]


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    """Loading a board with no fuse file raises FuseFileError naming the path."""
    path = tmp_path / FUSES_FILE
    with pytest.raises(FuseFileError, match=str(path)):
        Fuses.load(path)


def test_unreadable_file_names_the_file(tmp_path: Path) -> None:
    """A fuse path that cannot be read (a directory) raises FuseFileError naming it."""
    path = tmp_path / FUSES_FILE
    path.mkdir()
    with pytest.raises(FuseFileError, match="cannot read"):
        Fuses.load(path)


def test_oversized_file_is_corrupt(tmp_path: Path) -> None:
    """A fuse file past 64 KiB is refused before decoding."""
    path = tmp_path / FUSES_FILE
    path.write_bytes(b"\x00" * (65 * 1024))
    with pytest.raises(FuseFileError, match="too large"):
        Fuses.load(path)


def test_flipped_bit_anywhere_is_detected(fuses: Fuses) -> None:
    """Flipping any single bit of the file (magic, digest or body) makes it corrupt."""
    data = fuses.path.read_bytes()
    for index in range(len(data)):
        flipped = bytearray(data)
        flipped[index] ^= 0x01
        fuses.path.write_bytes(bytes(flipped))
        with pytest.raises(FuseFileError, match="corrupt"):
            Fuses.load(fuses.path)


@pytest.mark.parametrize("cut", [0, 8, 39, 40, 60])
def test_truncated_file_is_corrupt(fuses: Fuses, cut: int) -> None:
    """A truncated fuse file raises FuseFileError, not a decoder crash."""
    fuses.path.write_bytes(fuses.path.read_bytes()[:cut])
    with pytest.raises(FuseFileError, match="corrupt"):
        Fuses.load(fuses.path)


def _rehash(body: object) -> bytes:
    """A fuse file with a valid digest over ``body``."""
    raw = cbor.dumps(body)
    return b"ESFUSES\x00" + hashlib.sha256(raw).digest() + raw


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"format": 2}, "format"),
        ({"extra": 1}, "unexpected field"),
        ({"huk": b"\x00" * 31}, "huk"),
        ({"lifecycle": "secured"}, "lifecycle"),
        ({"counters": {"app": -1}}, "counters"),
        ({"counters": {1: 2}}, "counter name"),
        ({"secure_boot": 1}, "secure_boot"),
        ({"device_id": "a/b"}, "device id"),
    ],
)
def test_well_hashed_but_invalid_body_is_corrupt(
    fuses: Fuses, change: dict[str, object], match: str
) -> None:
    """A correctly hashed body with a wrong version or a mistyped field is still refused."""
    body = cbor.loads(fuses.path.read_bytes()[40:], what="t")
    assert isinstance(body, dict)
    fuses.path.write_bytes(_rehash({**body, **change}))
    with pytest.raises(FuseFileError, match=match):
        Fuses.load(fuses.path)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_decoder_raises_only_malformed(data: bytes) -> None:
    """Arbitrary bytes, with or without a valid header, decode or raise only MalformedMessage."""
    for candidate in (data, b"ESFUSES\x00" + hashlib.sha256(data).digest() + data):
        with contextlib.suppress(MalformedMessage):
            FuseMap.decode(candidate)


def test_debug_unlock_takes_effect_at_reset(fuses: Fuses) -> None:
    """A debug unlock only sets a flag; the reset moves to NON_PSA_ROT_DEBUG for good."""
    port = DebugPort(fuses.path.parent)
    assert port.is_open() is False
    port.request_unlock()
    port.request_unlock()  # twice: still one pending request
    assert Fuses.load(fuses.path).map.debug_unlock_pending is True
    assert port.is_open() is False
    fuses.reload()
    assert apply_at_reset(fuses) is True
    assert fuses.lifecycle == Lifecycle.NON_PSA_ROT_DEBUG
    assert port.is_open() is True
    assert apply_at_reset(fuses) is False
    with pytest.raises(FuseError):
        fuses.set_lifecycle(Lifecycle.SECURED)
    assert Fuses.load(fuses.path).map.debug_unlock_pending is False


def test_debug_unlock_never_lowers_a_later_lifecycle(fuses: Fuses) -> None:
    """On a decommissioned board, a pending unlock is consumed and the lifecycle kept."""
    fuses.set_lifecycle(Lifecycle.DECOMMISSIONED)
    DebugPort(fuses.path.parent).request_unlock()
    assert apply_at_reset(fuses) is True
    assert fuses.lifecycle == Lifecycle.DECOMMISSIONED


@pytest.mark.parametrize(
    ("lifecycle", "is_open"),
    [
        (Lifecycle.UNKNOWN, True),
        (Lifecycle.ASSEMBLY_AND_TEST, True),
        (Lifecycle.PSA_ROT_PROVISIONING, True),
        (Lifecycle.SECURED, False),
        (0x3007, False),
        (Lifecycle.NON_PSA_ROT_DEBUG, True),
        (Lifecycle.RECOVERABLE_PSA_ROT_DEBUG, True),
        (Lifecycle.DECOMMISSIONED, False),
    ],
)
def test_debug_port_claim_follows_lifecycle_class(lifecycle: int, is_open: bool) -> None:
    """The debug-port platform claim is closed only in the SECURED and DECOMMISSIONED classes."""
    assert debug_port_open(lifecycle) is is_open


def test_board_clock_follows_the_stored_offset(tmp_path: Path) -> None:
    """Board time is host time plus the offset set_board_time stores, and survives a new handle."""
    host = [1_800_000_000.7]
    clock = BoardClock(tmp_path, host_time=lambda: host[0])
    assert clock.now_s() == 1_800_000_000
    clock.set_board_time(1_700_000_000)
    assert clock.offset_s() == -100_000_000
    host[0] += 50
    assert BoardClock(tmp_path, host_time=lambda: host[0]).now_s() == 1_700_000_050
    assert cbor.loads((tmp_path / CLOCK_FILE).read_bytes(), what="t") == {
        "format": 1,
        "offset_s": -100_000_000,
    }


def test_board_clock_default_host_time(tmp_path: Path) -> None:
    """Without a stored offset and with the real host clock, board time is a plausible epoch."""
    assert BoardClock(tmp_path).now_s() > 1_600_000_000


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff", cbor.dumps({"format": 2, "offset_s": 0}), cbor.dumps({"offset_s": 1})],
)
def test_corrupt_clock_file_names_the_file(tmp_path: Path, data: bytes) -> None:
    """A corrupt clock file raises ClockError naming the file."""
    (tmp_path / CLOCK_FILE).write_bytes(data)
    with pytest.raises(ClockError, match=CLOCK_FILE):
        BoardClock(tmp_path).now_s()


def test_board_time_out_of_range_is_refused(tmp_path: Path) -> None:
    """A board time whose offset does not fit 63 bits is refused and nothing is written."""
    with pytest.raises(ClockError, match="out of range"):
        BoardClock(tmp_path, host_time=lambda: 0.0).set_board_time(1 << 64)
    assert not (tmp_path / CLOCK_FILE).exists()
