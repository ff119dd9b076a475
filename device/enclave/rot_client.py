"""The enclave runtime's typed client of the RoT (requests listed in ``device.rot.service``)."""

from __future__ import annotations

from dataclasses import dataclass

from device.enclave.frames import Client
from protocol import cbor


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What the RoT reports of the board: identity (from the fuses) and platform state."""

    device_id: str
    product: str
    lifecycle: int
    secure_boot: bool
    debug_open: bool
    boot_count: int
    counters: tuple[tuple[str, int], ...]


def _counters(f: cbor.Fields) -> tuple[tuple[str, int], ...]:
    raw = f.get_map("counters")
    pairs = []
    names = raw.keys()
    for name in names:
        text = cbor.expect_str(name, what="counters", max_len=32)
        pairs.append((text, raw.get_int(text, lo=0)))
    return tuple(sorted(pairs))


class RotClient:
    """Calls to the RoT; each raises ``RemoteError`` on a refusal, ``PeerClosed`` if it is gone."""

    __slots__ = ("_client",)

    def __init__(self, client: Client) -> None:
        """Call the RoT over ``client``."""
        self._client = client

    def load_stage(self, kind: str) -> bytes:
        """The measured payload of stage ``kind`` ("BL2" or "RT")."""
        return self._client.call("load_stage", kind=kind).get_bytes("payload")

    def device_info(self) -> DeviceInfo:
        """Identity and platform state."""
        f = self._client.call("device_info")
        return DeviceInfo(
            device_id=f.get_str("device_id", max_len=64),
            product=f.get_str("product", max_len=64),
            lifecycle=f.get_int("lifecycle", lo=0, hi=0xFFFF),
            secure_boot=f.get_bool("secure_boot"),
            debug_open=f.get_bool("debug_open"),
            boot_count=f.get_int("boot_count", lo=0),
            counters=_counters(f),
        )

    def sign_token(self, nonce: bytes, client_id: int) -> bytes:
        """A PSA token over the RoT's measurements with this nonce and client id."""
        return self._client.call("sign_token", nonce=nonce, client_id=client_id).get_bytes("token")

    def set_app(self, manifest_digest: bytes, version: str, signer_id: bytes) -> None:
        """Report the application component (the digest of the manifest the enclave opened)."""
        self._client.call(
            "set_app", manifest_digest=manifest_digest, version=version, signer_id=signer_id
        )

    def clear_app(self) -> None:
        """Report that no application is loaded any more."""
        self._client.call("clear_app")

    def sealing_key(self, label: str) -> bytes:
        """The 32-byte sealing key for ``label``, bound to this runtime's measurement."""
        return self._client.call("sealing_key", label=label).get_bytes("key", size=32)

    def advance_counter(self, name: str, value: int) -> int:
        """Raise fuse counter ``name`` ("app", "offline_boots", "command_seq") to ``value``."""
        return self._client.call("advance_counter", name=name, value=value).get_int("value")

    def count_offline_boot(self) -> int:
        """Increment the "offline_boots" fuse counter; its new value."""
        return self._client.call("count_offline_boot").get_int("value")

    def fuse_counters(self) -> tuple[tuple[str, int], ...]:
        """The fuse counters (without the boot count)."""
        return _counters(self._client.call("fuse_counters"))

    def counter(self, name: str) -> int:
        """One fuse counter's value (0 when absent)."""
        return dict(self.fuse_counters()).get(name, 0)

    def debug_state(self) -> tuple[int, bool]:
        """The lifecycle in force and whether the debug port is open."""
        f = self._client.call("debug_state")
        return f.get_int("lifecycle", lo=0, hi=0xFFFF), f.get_bool("open")

    def confirm_image(self) -> tuple[str, bool]:
        """Confirm a running trial slot; the primary slot and whether a trial was confirmed."""
        f = self._client.call("confirm_image")
        return f.get_str("slot", max_len=16), f.get_bool("confirmed")
