"""The leak scanner: looks for secrets in data an attacker can reach (DESIGN §13).

Secrets are indexed by every 32-byte window at stride 1 (a dict window → offset); a haystack is
probed at stride 16. Why any leaked run of 48 bytes or more is found: a run covering haystack
bytes [h, h + L) with L ≥ 48 contains the 16-aligned position p = ⌈h / 16⌉·16 ≤ h + 15, and
p + 32 ≤ h + 47 < h + L, so the window at p lies inside the run; being a copy of secret bytes,
it is one of the secret's stride-1 windows and the probe at p hits it. The hit is then extended
both ways to the whole run. Chunks overlap by a multiple of 16 so alignment and the guarantee
hold across chunk boundaries.

Secrets shorter than 48 bytes (the CEK, HUK-derived keys) and canaries are exact substrings.
Windows made of fewer than four distinct byte values (padding, erased flash) are not indexed:
they would match any haystack and prove nothing.

Haystacks: files (flash, logs, registry, ledger, an MQTT capture) and the readable regions of a
process's memory (``/proc/PID/maps`` then ``/proc/PID/mem``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

WINDOW: Final = 32
STRIDE: Final = 16
MIN_RUN: Final = 48
CHUNK: Final = 16 * 1024 * 1024
MIN_DISTINCT: Final = 4
_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")
_SKIP_REGIONS: Final = frozenset({"[vvar]", "[vsyscall]", "[vvar_vclock]"})
_Reader = Callable[[int], bytes]


@dataclass(frozen=True, slots=True)
class Secret:
    """A named secret: bytes that must never appear in a haystack."""

    name: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Finding:
    """One leak: which secret, where in the haystack, how long a run."""

    secret: str
    haystack: str
    offset: int
    length: int
    secret_offset: int
    kind: str  # "run" (a window hit extended) or "exact" (a short secret or a canary)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (no secret bytes)."""
        return {
            "secret": self.secret,
            "haystack": self.haystack,
            "offset": self.offset,
            "length": self.length,
            "secret_offset": self.secret_offset,
            "kind": self.kind,
        }


@dataclass
class ScanResult:
    """Findings and how much was scanned."""

    findings: list[Finding] = field(default_factory=list)
    scanned_bytes: int = 0
    haystacks: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when nothing leaked."""
        return not self.findings

    def merge(self, other: ScanResult) -> None:
        """Add ``other``'s findings and counts to this result."""
        self.findings.extend(other.findings)
        self.scanned_bytes += other.scanned_bytes
        self.haystacks.extend(other.haystacks)
        self.unreadable.extend(other.unreadable)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {
            "clean": self.clean,
            "findings": [f.to_json() for f in self.findings],
            "scanned_bytes": self.scanned_bytes,
            "haystacks": list(self.haystacks),
            "unreadable": list(self.unreadable),
        }


class Scanner:
    """An index of secrets and canaries, and the probes over haystacks."""

    def __init__(self, secrets: Sequence[Secret] = (), canaries: Sequence[Secret] = ()) -> None:
        """Index ``secrets`` (windows, or exact when short) and ``canaries`` (exact)."""
        self._secrets = list(secrets)
        self._windows: dict[bytes, tuple[int, int]] = {}
        self._exact: list[Secret] = [c for c in canaries if c.data]
        for number, secret in enumerate(self._secrets):
            if len(secret.data) < MIN_RUN:
                if secret.data:
                    self._exact.append(secret)
                continue
            data = secret.data
            for off in range(len(data) - WINDOW + 1):
                window = data[off : off + WINDOW]
                if window not in self._windows and len(set(window)) >= MIN_DISTINCT:
                    self._windows[window] = (number, off)
        longest = max((len(s.data) for s in self._exact), default=0)
        self._overlap = max(MIN_RUN + STRIDE, -(-longest // STRIDE) * STRIDE)

    @property
    def overlap(self) -> int:
        """Bytes each chunk re-reads from the previous one (a multiple of the stride)."""
        return self._overlap

    def scan_bytes(self, data: bytes, name: str, base: int = 0) -> list[Finding]:
        """The findings in ``data``, offsets reported from ``base``."""
        found = self._runs(data, name, base)
        for secret in self._exact:
            start = data.find(secret.data)
            while start >= 0:
                found.append(Finding(secret.name, name, base + start, len(secret.data), 0, "exact"))
                start = data.find(secret.data, start + 1)
        return found

    def _runs(self, data: bytes, name: str, base: int) -> list[Finding]:
        found: list[Finding] = []
        windows = self._windows
        if not windows:
            return found
        end = len(data) - WINDOW + 1
        pos = 0
        while pos < end:
            hit = windows.get(data[pos : pos + WINDOW])
            if hit is None:
                pos += STRIDE
                continue
            finding = self._extend(data, pos, hit, name, base)
            found.append(finding)
            after = finding.offset - base + finding.length
            pos = max(pos + STRIDE, after - WINDOW + 1)
            pos = -(-pos // STRIDE) * STRIDE
        return found

    def _extend(self, data: bytes, pos: int, hit: tuple[int, int], name: str, base: int) -> Finding:
        number, soff = hit
        secret = self._secrets[number].data
        left = 0
        while (
            pos - left > 0 and soff - left > 0 and data[pos - left - 1] == secret[soff - left - 1]
        ):
            left += 1
        right = WINDOW
        while (
            pos + right < len(data)
            and soff + right < len(secret)
            and data[pos + right] == secret[soff + right]
        ):
            right += 1
        return Finding(
            self._secrets[number].name, name, base + pos - left, left + right, soff - left, "run"
        )

    def scan_file(self, path: Path) -> ScanResult:
        """Scan a file in overlapping chunks."""
        result = ScanResult(haystacks=[str(path)])
        try:
            with path.open("rb") as f:
                self._scan_stream(f.read, str(path), 0, None, result)
        except OSError:
            result.unreadable.append(str(path))
        return result

    def _scan_stream(
        self,
        read: _Reader,
        name: str,
        base: int,
        limit: int | None,
        result: ScanResult,
    ) -> None:
        seen: set[tuple[str, int, int]] = set()
        carry = b""
        offset = base  # haystack offset of carry[0]
        remaining = limit
        while True:
            size = CHUNK if remaining is None else min(CHUNK, remaining)
            chunk = read(size) if size > 0 else b""
            if remaining is not None:
                remaining -= len(chunk)
            data = carry + chunk
            if not chunk:
                if carry:
                    self._add(result, seen, self.scan_bytes(data, name, offset))
                return
            result.scanned_bytes += len(chunk)
            self._add(result, seen, self.scan_bytes(data, name, offset))
            keep = min(self._overlap, len(data) - len(data) % STRIDE)
            carry = data[len(data) - keep :] if keep else b""
            offset += len(data) - len(carry)
            if offset % STRIDE:  # keep the probe grid 16-aligned to the haystack
                shift = offset % STRIDE
                carry = data[len(data) - len(carry) - shift :]
                offset -= shift

    @staticmethod
    def _add(result: ScanResult, seen: set[tuple[str, int, int]], found: list[Finding]) -> None:
        for f in found:
            key = (f.secret, f.offset + f.length, f.secret_offset + f.length)
            if key not in seen:  # the same run seen again in the overlap
                seen.add(key)
                result.findings.append(f)

    def scan_process(self, pid: int) -> ScanResult:
        """Scan every readable mapping of process ``pid`` through ``/proc/PID/mem``."""
        name = f"/proc/{pid}/mem"
        result = ScanResult(haystacks=[name])
        try:
            regions = list(readable_regions(pid))
            mem = open(f"/proc/{pid}/mem", "rb", buffering=0)  # noqa: SIM115
        except OSError:
            result.unreadable.append(name)
            return result
        with mem:
            for start, end, label in regions:
                try:
                    mem.seek(start)
                    self._scan_stream(mem.read, f"{name}:{label or hex(start)}", start,
                                      end - start, result)  # fmt: skip
                except (OSError, ValueError, OverflowError):
                    result.unreadable.append(f"{name}:{hex(start)}")
        return result

    def scan_paths(self, paths: Sequence[Path]) -> ScanResult:
        """Scan files and, recursively, the files under directories."""
        result = ScanResult()
        for path in paths:
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for file in files:
                result.merge(self.scan_file(file))
        return result


def readable_regions(pid: int) -> Iterator[tuple[int, int, str]]:
    """The readable mappings of ``pid``: (start, end, label), from ``/proc/PID/maps``."""
    text = Path(f"/proc/{pid}/maps").read_text()
    for line in text.splitlines():
        match = _MAPS_LINE.match(line)
        if match is None:
            continue
        start, end, perms, label = match.groups()
        if perms[0] != "r" or label.strip() in _SKIP_REGIONS:
            continue
        yield int(start, 16), int(end, 16), label.strip()


def secrets_from_files(paths: Sequence[Path]) -> list[Secret]:
    """Secrets read from files (a directory contributes every file under it)."""
    out: list[Secret] = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        out.extend(Secret(str(f), f.read_bytes()) for f in files)
    return out


def canaries_from_text(texts: Sequence[str]) -> list[Secret]:
    """Canaries given as text (UTF-8), also looked for as hex."""
    out: list[Secret] = []
    for text in texts:
        out.append(Secret(f"canary:{text[:24]}", text.encode()))
    return out
