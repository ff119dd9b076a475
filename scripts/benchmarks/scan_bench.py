"""Leak-scanner throughput (DESIGN §13): MB/s and the time for a 100 MB haystack.

Secrets: the secret-filter app's files (every 32-byte window indexed) plus a 64 KiB random
secret and two canaries; haystack: ``--mb`` MB of random bytes in a temp file with one 48-byte
leaked run and one canary planted near the end (both must be found). Target: 100 MB in < 30 s.

Run as ``.venv/bin/python -m scripts.benchmarks.scan_bench [--mb 100]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from device.attacks.playbook import APP, CANARY
from device.attacks.scanner import Scanner, Secret, canaries_from_text, secrets_from_files

MB = 1_000_000


def main(argv: Sequence[str] | None = None) -> int:
    """Build the haystack, scan it, print the figures; 1 when a planted leak was missed."""
    parser = argparse.ArgumentParser(prog="scan_bench")
    parser.add_argument("--mb", type=int, default=100, help="Haystack size in MB (default 100).")
    args = parser.parse_args(argv)
    secret = os.urandom(64 * 1024)
    started = time.perf_counter()
    scanner = Scanner(
        [*secrets_from_files([APP]), Secret("random-64k", secret)],
        canaries_from_text([CANARY, "EDGESEAL-BENCH-CANARY"]),
    )
    indexed = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="scan-bench-") as tmp:
        path = Path(tmp) / "haystack.bin"
        size = args.mb * MB
        with path.open("wb") as f:
            for _ in range(size // (8 * MB)):
                f.write(os.urandom(8 * MB))
            f.write(os.urandom(size % (8 * MB)))
        with path.open("r+b") as g:
            g.seek(size - 5000 + 7)
            g.write(secret[1001:1049])
            g.seek(size - 1000)
            g.write(CANARY.encode())
        started = time.perf_counter()
        result = scanner.scan_file(path)
        took = time.perf_counter() - started
    found = {f.secret for f in result.findings}
    ok = "random-64k" in found and any(s.startswith("canary:") for s in found)
    rate = result.scanned_bytes / MB / took
    print(f"index: {indexed * 1000:.1f} ms for the secrets")
    print(f"scan: {result.scanned_bytes / MB:.0f} MB in {took:.2f} s = {rate:.1f} MB/s")
    print(f"100 MB: {100 / rate:.1f} s (target < 30 s)")
    print(f"planted leaks found: {'yes' if ok else 'NO'} ({len(result.findings)} findings)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
