"""The enclave's sealed state in the flash "nvstore" partition (DESIGN §4, §8).

Flash is the attacker's, so the partition holds only ciphertext: a blob (``flash.write_blob``) of
canonical CBOR ``[1, iv (12 bytes), AES-256-GCM ciphertext]`` under the RoT sealing key for the
label ``"lease"`` — bound to the HUK, the lifecycle class and the runtime stage's measurement, so a
clone, a debug-unlocked board or a modified runtime cannot open it. Associated data:
``"edgeseal/nv/v1"``. The plaintext is a canonical CBOR map::

    "v"               1
    "last_seq"        uint   highest signed command sequence number accepted (a copy: the
                             fuse counter "command_seq" is what a replay is checked against)
    "last_gateway_s"  uint   the latest gateway time seen in a verified result or command
    "lease"           null or {"cek": bstr 32, "digest": bstr 32 (manifest digest),
                       "boots": uint (offline boots allowed), "base": uint (the fuse counter
                       "offline_boots" when the lease was issued), "expires_s": uint}

A blob that is missing, torn, rolled to another device's or does not open reads as the empty
state: no lease (the device must attest), sequence 0. Offline boots are counted by the monotonic
fuse counter, so restoring an older blob cannot give boots back (see ``EnclaveService``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from device.hardware.flash import Flash
from protocol import cbor
from protocol.errors import MalformedMessage, UsageError

NV_PARTITION: Final = "nvstore"
NV_VERSION: Final = 1
NV_AAD: Final = b"edgeseal/nv/v1"
IV_BYTES: Final = 12
_MAX_BLOB: Final = 4096
_U63: Final = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class SealedLease:
    """An offline lease as sealed: the CEK, the image it opens and the boots it allows."""

    cek: bytes
    manifest_digest: bytes
    boots: int
    base: int
    expires_s: int


@dataclass(frozen=True, slots=True)
class NvState:
    """The enclave's persistent state."""

    last_seq: int = 0
    last_gateway_s: int = 0
    lease: SealedLease | None = None

    def seen_gateway_time(self, gateway_s: int) -> NvState:
        """A copy whose gateway time is at least ``gateway_s`` (time only moves forward)."""
        return replace(self, last_gateway_s=max(self.last_gateway_s, gateway_s))

    def encode(self) -> bytes:
        """The plaintext map."""
        lease = self.lease
        return cbor.dumps(
            {
                "v": NV_VERSION,
                "last_seq": self.last_seq,
                "last_gateway_s": self.last_gateway_s,
                "lease": None
                if lease is None
                else {
                    "cek": lease.cek,
                    "digest": lease.manifest_digest,
                    "boots": lease.boots,
                    "base": lease.base,
                    "expires_s": lease.expires_s,
                },
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> NvState:
        """Decode the plaintext map.

        Raises:
            MalformedMessage: not a version-1 state.
        """
        f = cbor.Fields(cbor.loads(data, what="nv", max_bytes=_MAX_BLOB), what="nv")
        f.only({"v", "last_seq", "last_gateway_s", "lease"})
        f.get_int("v", lo=NV_VERSION, hi=NV_VERSION)
        lease = None
        if f.opt_raw("lease") is not None:
            g = f.get_map("lease").only({"cek", "digest", "boots", "base", "expires_s"})
            lease = SealedLease(
                cek=g.get_bytes("cek", size=32),
                manifest_digest=g.get_bytes("digest", size=32),
                boots=g.get_int("boots", lo=0, hi=0xFFFF_FFFF),
                base=g.get_int("base", lo=0, hi=0xFFFF_FFFF),
                expires_s=g.get_int("expires_s", lo=0, hi=_U63),
            )
        return cls(
            last_seq=f.get_int("last_seq", lo=0, hi=_U63),
            last_gateway_s=f.get_int("last_gateway_s", lo=0, hi=_U63),
            lease=lease,
        )


def seal_blob(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM under ``key`` with a random IV: canonical CBOR ``[1, iv, ciphertext]``."""
    iv = os.urandom(IV_BYTES)
    return cbor.dumps([NV_VERSION, iv, AESGCM(key).encrypt(iv, plaintext, aad)])


def open_blob(key: bytes, blob: bytes, aad: bytes, *, max_bytes: int) -> bytes:
    """Open a ``seal_blob`` blob.

    Raises:
        MalformedMessage: not a blob of this format.
        InvalidTag: it does not open under ``key`` and ``aad``.
    """
    items = cbor.expect_list(
        cbor.loads(blob, what="sealed blob", max_bytes=max_bytes), what="sealed blob", length=3
    )
    cbor.expect_int(items[0], what="sealed blob.version", lo=NV_VERSION, hi=NV_VERSION)
    iv = cbor.expect_bytes(items[1], what="sealed blob.iv", size=IV_BYTES)
    ciphertext = cbor.expect_bytes(items[2], what="sealed blob.ciphertext", max_size=max_bytes)
    return AESGCM(key).decrypt(iv, ciphertext, aad)


class NvStore:
    """Read and write the sealed state through the flash driver."""

    __slots__ = ("_flash", "_key")

    def __init__(self, flash: Flash, key: bytes) -> None:
        """Use ``flash``'s nvstore partition under the sealing ``key``."""
        self._flash = flash
        self._key = key

    def load(self) -> NvState:
        """The sealed state, or the empty state when there is none that opens."""
        try:
            blob = self._flash.read_blob(NV_PARTITION)
            return NvState.decode(open_blob(self._key, blob, NV_AAD, max_bytes=_MAX_BLOB))
        except (MalformedMessage, UsageError, InvalidTag):
            return NvState()

    def save(self, state: NvState) -> None:
        """Seal ``state`` and write it (one blob write)."""
        self._flash.write_blob(NV_PARTITION, seal_blob(self._key, state.encode(), NV_AAD))
