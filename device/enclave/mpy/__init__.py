"""The MicroPython application runtime of the enclave (DESIGN §11).

The enclave runs an app's source (``main.py`` and its modules, from the decrypted app bundle) under
CPython with MicroPython's module surface only (:data:`SHIM_MODULES`), on a :class:`SimulatedBoard`,
in a thread of the enclave process (:class:`AppRunner`). Output goes to a telemetry sink; a crash is
reported as :class:`AppCrash` (type, file, line; never a traceback or source text).
"""

from __future__ import annotations

from device.enclave.mpy.board import I2CDevice, SimulatedBoard, ThermalModel, Tmp102
from device.enclave.mpy.clock import AppClock, RealAppClock, SimulatedAppClock
from device.enclave.mpy.context import MAX_PAYLOAD_BYTES, PRINT_TOPIC, TelemetrySink
from device.enclave.mpy.runner import (
    ENTRY_POINT,
    AppCrash,
    AppExited,
    AppHung,
    AppResult,
    AppRunner,
    ExitReason,
    HangReason,
)
from device.enclave.mpy.shims import SHIM_MODULES

__all__ = [
    "ENTRY_POINT",
    "MAX_PAYLOAD_BYTES",
    "PRINT_TOPIC",
    "SHIM_MODULES",
    "AppClock",
    "AppCrash",
    "AppExited",
    "AppHung",
    "AppResult",
    "AppRunner",
    "ExitReason",
    "HangReason",
    "I2CDevice",
    "RealAppClock",
    "SimulatedAppClock",
    "SimulatedBoard",
    "TelemetrySink",
    "ThermalModel",
    "Tmp102",
]
