"""The enclave runtime's ROM loader: runs boot stages from the bytes the RoT measured (DESIGN §3).

``StageLoader.execute(kind)`` asks the RoT for the stage (the RoT reads it from flash, verifies and
measures it), decodes the payload it returns and executes the stage's code from those bytes in a
fresh namespace (``BOOT``: this loader, ``STAGE``: the decoded stage). Nothing is re-read from disk
and no stage is imported as a module.
"""

from __future__ import annotations

import builtins
from pathlib import Path

from device.enclave.frames import Channel
from device.enclave.mpy import AppClock
from device.enclave.rot_client import RotClient
from protocol.errors import MalformedMessage
from protocol.stage import BootStage


class StageLoader:
    """The ``BOOT`` object a stage sees: the RoT client, the door and the board's home."""

    __slots__ = ("app_clock", "door", "home", "rot")

    def __init__(
        self, home: Path, rot: RotClient, door: Channel, app_clock: AppClock | None = None
    ) -> None:
        """Load stages for the board in ``home`` through ``rot``; stages serve ``door``."""
        self.home = home
        self.rot = rot
        self.door = door
        self.app_clock = app_clock

    def execute(self, kind: str) -> None:
        """Load stage ``kind`` ("BL2" or "RT") through the RoT and run it.

        Raises:
            RemoteError: the RoT refused the stage.
            MalformedMessage: the payload is not a stage of that kind, or not UTF-8 source.
        """
        stage = BootStage.decode(self.rot.load_stage(kind))
        if str(stage.kind) != kind:
            raise MalformedMessage(f"boot: expected stage {kind}, got {stage.kind}")
        try:
            source = stage.code.decode("utf-8")
            code = compile(source, f"<edgeseal stage {kind}>", "exec")
        except (UnicodeDecodeError, SyntaxError) as err:
            raise MalformedMessage(f"boot: stage {kind} is not Python source") from err
        namespace: dict[str, object] = {
            "__name__": f"__edgeseal_stage_{kind.lower()}__",
            "__builtins__": builtins,
            "BOOT": self,
            "STAGE": stage,
        }
        # The measured bytes themselves run: this is the point of the loader (DESIGN §3).
        exec(code, namespace)  # noqa: S102
