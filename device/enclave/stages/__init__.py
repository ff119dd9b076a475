"""Source templates of the boot stages the factory builds: ``bl2.py.txt``, ``runtime.py.txt``.

Each is Python source run by the enclave runtime from the bytes the RoT measured, in a fresh
namespace holding ``BOOT`` (the loader: ``BOOT.execute(kind)``, ``BOOT.rot``, ``BOOT.door``,
``BOOT.home``) and ``STAGE`` (the decoded ``protocol.stage.BootStage``). ``$version`` is filled in.
"""

from __future__ import annotations

from importlib import resources
from string import Template
from typing import Final

BL2_TEMPLATE: Final = "bl2.py.txt"
RUNTIME_TEMPLATE: Final = "runtime.py.txt"


def render(name: str, *, version: str) -> bytes:
    """The template ``name`` with its version filled in, as UTF-8 source bytes."""
    text = resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
    return Template(text).substitute(version=version).encode("utf-8")
