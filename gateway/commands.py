"""Signed commands to devices: re-attest, update, revoke (DESIGN §8; docs/protocol.md §4).

A command gets the device's next sequence number from the registry (atomic across gateway
instances), is signed by the result key, recorded in the ledger, and handed back as the
``CommandEnvelope`` payload to publish on ``…/d/{device}/down/cmd``. Publishing is the caller's job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from gateway.ledger import Ledger, LedgerKind
from gateway.registry import Registry
from protocol import cbor, messages, topics
from protocol.ids import DeviceId, ReleaseId
from protocol.results import Command, CommandKind, Signer, sign_command

#: How long a command stays valid (gateway time).
COMMAND_TTL_S: Final = 3600


@dataclass(frozen=True, slots=True)
class OutgoingCommand:
    """A signed command ready to publish."""

    command: Command
    topic: str
    payload: bytes


class CommandIssuer:
    """Numbers, signs and records commands."""

    def __init__(
        self,
        registry: Registry,
        ledger: Ledger,
        signer: Signer,
        *,
        clock: Callable[[], float],
        prefix: str = topics.DEFAULT_PREFIX,
        ttl_s: int = COMMAND_TTL_S,
    ) -> None:
        """Issue commands signed by ``signer`` (the result key) at ``clock`` time."""
        self._registry = registry
        self._ledger = ledger
        self._signer = signer
        self._clock = clock
        self._prefix = prefix
        self._ttl_s = ttl_s

    def issue(
        self, device: DeviceId, kind: CommandKind, release: ReleaseId | None = None
    ) -> OutgoingCommand:
        """Sign the next command for ``device`` and append it to the ledger.

        Raises:
            UnknownDevice: the device is not enrolled.
            MalformedMessage: ``release`` given for a kind other than update, or missing for it.
        """
        now_s = int(self._clock())
        seq = self._registry.next_command_seq(device)
        command = Command(
            device_id=device,
            seq=seq,
            kind=kind,
            issued_s=now_s,
            expires_s=now_s + self._ttl_s,
            release_id=release,
        )
        signed = sign_command(command, self._signer)
        body = {"kind": kind.value, "seq": seq, "expires_s": command.expires_s}
        if release is not None:
            body["release"] = release
        self._ledger.append(LedgerKind.COMMAND, cbor.dumps(body), device=device, now_s=now_s)
        payload = messages.CommandEnvelope(command=signed).encode()
        return OutgoingCommand(command, topics.cmd_down(device, prefix=self._prefix), payload)
