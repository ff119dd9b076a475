"""The leak scanner: 48-byte runs at any alignment, canaries, short secrets, no false positives."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from device.attacks.scanner import (
    MIN_RUN,
    Scanner,
    Secret,
    canaries_from_text,
    readable_regions,
    secrets_from_files,
)

SECRET = random.Random(7).randbytes(4096)


def haystack_with(run: bytes, at: int, size: int = 8192, seed: int = 1) -> bytes:
    """Random bytes of ``size`` with ``run`` copied in at offset ``at``."""
    hay = bytearray(random.Random(seed).randbytes(size))
    hay[at : at + len(run)] = run
    return bytes(hay)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, len(SECRET) - MIN_RUN),
    st.integers(0, 8192 - 200),
    st.integers(MIN_RUN, 200),
)
def test_any_48_byte_run_is_found_at_every_alignment(src: int, at: int, length: int) -> None:
    """A run of ≥ 48 secret bytes anywhere in the haystack is found, with its full extent."""
    length = min(length, len(SECRET) - src)
    scanner = Scanner([Secret("s", SECRET)])
    found = scanner.scan_bytes(haystack_with(SECRET[src : src + length], at), "hay")
    assert any(
        f.offset <= at and f.offset + f.length >= at + length and f.secret == "s" for f in found
    ), (src, at, length, found)


def test_every_offset_mod_16_is_covered() -> None:
    """Exactly 48 bytes at each of the 16 alignments and each secret offset mod 16."""
    scanner = Scanner([Secret("s", SECRET)])
    for shift in range(16):
        for src in range(100, 116):
            found = scanner.scan_bytes(haystack_with(SECRET[src : src + 48], 1000 + shift), "h")
            assert len(found) == 1, (shift, src)
            start, end = found[0].offset, found[0].offset + found[0].length
            assert start <= 1000 + shift and end >= 1048 + shift  # random neighbours may match
            assert found[0].secret_offset - start == src - 1000 - shift


def test_no_false_positives_on_random_data() -> None:
    """Four MiB of random bytes match no window of a random secret and no canary."""
    scanner = Scanner([Secret("s", SECRET)], canaries_from_text(["EDGESEAL-CANARY-x"]))
    assert scanner.scan_bytes(os.urandom(4 << 20), "noise") == []


def test_canaries_and_short_secrets_are_exact_substrings() -> None:
    """A canary and a 32-byte key are found exactly, every occurrence."""
    key = os.urandom(32)
    scanner = Scanner([Secret("cek", key)], canaries_from_text(["EDGESEAL-CANARY-7f3a"]))
    hay = b"x" * 10 + key + b"y" * 7 + b"EDGESEAL-CANARY-7f3a" + key[:31]
    found = scanner.scan_bytes(hay, "h")
    assert sorted((f.secret, f.offset, f.kind) for f in found) == [
        ("canary:EDGESEAL-CANARY-7f3a", 49, "exact"),
        ("cek", 10, "exact"),
    ]


def test_a_47_byte_run_may_escape_but_a_shorter_window_is_never_reported() -> None:
    """Runs under 32 bytes never match (the floor of what the index can see)."""
    scanner = Scanner([Secret("s", SECRET)])
    assert scanner.scan_bytes(haystack_with(SECRET[50:81], 333), "h") == []


def test_file_scan_spans_chunk_boundaries(tmp_path: Path) -> None:
    """A run and a canary straddling a chunk boundary are found once, at file offsets."""
    import device.attacks.scanner as scanner_module

    setattr(scanner_module, "CHUNK", 4096)  # noqa: B010 - small chunks for the test
    try:
        hay = bytearray(os.urandom(3 * 4096))
        hay[4096 - 30 : 4096 + 70] = SECRET[500:600]
        hay[8192 - 5 : 8192 + 15] = b"CANARY-ACROSS-CHUNKS"
        path = tmp_path / "flash.bin"
        path.write_bytes(bytes(hay))
        scanner = Scanner([Secret("s", SECRET)], canaries_from_text(["CANARY-ACROSS-CHUNKS"]))
        result = scanner.scan_file(path)
    finally:
        setattr(scanner_module, "CHUNK", 16 * 1024 * 1024)  # noqa: B010
    offsets = {(f.secret, f.offset, f.length) for f in result.findings}
    assert ("s", 4096 - 30, 100) in offsets
    assert ("canary:CANARY-ACROSS-CHUNKS", 8192 - 5, 20) in offsets
    assert result.scanned_bytes == len(hay)


def test_scan_paths_walks_directories_and_secrets_from_files(tmp_path: Path) -> None:
    """Secrets read from a directory; a log under a directory that copies 60 bytes is flagged."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "algo.py").write_bytes(SECRET[:1000])
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "nw.log").write_bytes(b"boot ok\n" + SECRET[200:260] + b"\n")
    (logs / "clean.log").write_bytes(b"nothing here\n" * 100)
    result = Scanner(secrets_from_files([app])).scan_paths([logs])
    assert [(Path(f.haystack).name, f.length) for f in result.findings] == [("nw.log", 60)]
    assert not result.clean and result.to_json()["clean"] is False


def test_proc_self_mem_finds_a_secret_held_in_memory() -> None:
    """This process holds the secret; scanning /proc/self/mem through its maps finds it."""
    held = bytes(SECRET[1000:1100])  # a live object in this process's heap
    scanner = Scanner([Secret("s", SECRET)], canaries_from_text(["EDGESEAL-MEM-CANARY-91"]))
    marker = b"EDGESEAL-MEM-CANARY-91"
    result = scanner.scan_process(os.getpid())
    assert held and marker
    assert any(f.secret == "s" for f in result.findings)
    assert any(f.secret.startswith("canary:") for f in result.findings)
    assert result.scanned_bytes > 1 << 20
    assert list(readable_regions(os.getpid()))


def test_unreadable_process_is_reported_not_raised() -> None:
    """A pid that does not exist is listed as unreadable."""
    result = Scanner([Secret("s", SECRET)]).scan_process(2**22 + 12345)
    assert result.unreadable and result.clean


def test_scan_leaks_cli_exits_1_on_a_leak_and_0_when_clean(tmp_path: Path) -> None:
    """``scan-leaks`` prints JSON findings, exit 1 with a leak, exit 0 on a clean haystack."""
    from click.testing import CliRunner

    from device.attacks.cli import scan_leaks

    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET)
    leaky = tmp_path / "leaky.log"
    leaky.write_bytes(b"....." + SECRET[7:71] + b"CANARY-XYZ-123")
    clean = tmp_path / "clean.log"
    clean.write_bytes(os.urandom(10_000))
    runner = CliRunner()
    args = ["--secret", str(secret), "--canary", "CANARY-XYZ-123", "--json", "--haystack"]
    bad = runner.invoke(scan_leaks, [*args, str(leaky)])
    assert bad.exit_code == 1
    found = json.loads(bad.output)["findings"]
    assert sorted((f["kind"], f["offset"], f["length"]) for f in found) == [
        ("exact", 69, 14),
        ("run", 5, 64),
    ]
    good = runner.invoke(scan_leaks, [*args, str(clean)])
    assert good.exit_code == 0 and json.loads(good.output)["clean"] is True
    usage = runner.invoke(scan_leaks, ["--haystack", str(clean)])
    assert usage.exit_code != 0
