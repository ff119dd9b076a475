"""The simulated board behind the ``machine`` shim (DESIGN §11): pins, ADC channels, I2C devices.

The default board is a thermostat bench: a heater on a GPIO pin warms a room whose temperature a
TMP36-style analog sensor reports on an ADC pin (and a TMP102-style sensor reports on I2C). The room
follows a first-order model toward ambient or ambient plus the heater's gain; the sensor adds
Gaussian noise from a seeded RNG, so a run is reproducible.
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass
from typing import Final, Protocol

from device.enclave.mpy.clock import AppClock

#: ADC reference and the TMP36 transfer function: 500 mV at 0 °C, 10 mV per °C.
ADC_REF_MV: Final = 3300
TMP36_OFFSET_MV: Final = 500
TMP36_MV_PER_C: Final = 10
#: The default wiring (ESP32 pin numbers).
HEATER_PIN: Final = 2
TEMP_ADC_PIN: Final = 34
TMP102_ADDR: Final = 0x48


@dataclass(frozen=True, slots=True)
class ThermalModel:
    """A room heated by an on/off heater: first-order toward ``ambient_c`` (+ ``heater_gain_c``)."""

    ambient_c: float = 18.0
    heater_gain_c: float = 30.0
    tau_s: float = 120.0
    noise_c: float = 0.05
    start_c: float = 18.0


class I2CDevice(Protocol):
    """A device on the simulated I2C bus."""

    def write(self, data: bytes) -> None:
        """Receive ``data`` from the controller."""
        ...

    def read(self, nbytes: int) -> bytes:
        """Return ``nbytes`` to the controller."""
        ...


class SimulatedBoard:
    """Pins, ADC and I2C of one simulated board; thread-safe, shared by successive app runs."""

    def __init__(
        self,
        *,
        clock: AppClock,
        rng: random.Random,
        unique_id: bytes = b"\x24\x0a\xc4\x00\x00\x01",
        heater_pin: int = HEATER_PIN,
        temp_adc_pin: int = TEMP_ADC_PIN,
        model: ThermalModel | None = None,
    ) -> None:
        """Wire a heater on ``heater_pin`` and a temperature sensor on ``temp_adc_pin``."""
        self._lock = threading.RLock()
        self._clock = clock
        self._rng = rng
        self.unique_id = bytes(unique_id)
        self.heater_pin = heater_pin
        self.temp_adc_pin = temp_adc_pin
        self.model = model or ThermalModel()
        self._pins: dict[int, int] = {}
        self._temp_c = self.model.start_c
        self._last_ms = clock.ticks_ms()
        self._i2c: dict[int, I2CDevice] = {TMP102_ADDR: Tmp102(self)}

    @property
    def clock(self) -> AppClock:
        """The clock that drives the physics and the app."""
        return self._clock

    def pin_value(self, pin: int) -> int:
        """The level of ``pin`` (0 when never driven)."""
        with self._lock:
            return self._pins.get(pin, 0)

    def set_pin(self, pin: int, value: int) -> None:
        """Drive ``pin`` to 0 or 1 (the heater's state changes from now on)."""
        with self._lock:
            self._advance()
            self._pins[pin] = 1 if value else 0

    def temperature_c(self) -> float:
        """The room's true temperature now (no noise)."""
        with self._lock:
            self._advance()
            return self._temp_c

    def read_adc_u16(self, pin: int) -> int:
        """A 16-bit ADC reading of ``pin``: the temperature sensor, or 0 for an unwired pin."""
        if pin != self.temp_adc_pin:
            return 0
        with self._lock:
            measured = self.temperature_c() + self._rng.gauss(0.0, self.model.noise_c)
        millivolts = TMP36_OFFSET_MV + TMP36_MV_PER_C * measured
        return max(0, min(0xFFFF, round(millivolts * 0xFFFF / ADC_REF_MV)))

    def attach_i2c(self, address: int, device: I2CDevice) -> None:
        """Put ``device`` on the I2C bus at 7-bit ``address``."""
        if not 0x08 <= address <= 0x77:
            raise ValueError(f"I2C address: expected 0x08..0x77, got {address:#x}")
        with self._lock:
            self._i2c[address] = device

    def i2c_device(self, address: int) -> I2CDevice | None:
        """The device at ``address``, or None when nothing answers there."""
        with self._lock:
            return self._i2c.get(address)

    def i2c_addresses(self) -> list[int]:
        """The addresses that answer, ascending (what ``I2C.scan`` returns)."""
        with self._lock:
            return sorted(self._i2c)

    def _advance(self) -> None:
        """Integrate the thermal model up to the clock's now."""
        now_ms = self._clock.ticks_ms()
        dt_s = max(now_ms - self._last_ms, 0) / 1000
        self._last_ms = now_ms
        heating = self._pins.get(self.heater_pin, 0)
        target = self.model.ambient_c + (self.model.heater_gain_c if heating else 0.0)
        self._temp_c += (target - self._temp_c) * (1 - math.exp(-dt_s / self.model.tau_s))


class Tmp102:
    """A TMP102-style I2C sensor: register 0 holds the temperature in 1/16 °C, 12 bits BE."""

    def __init__(self, board: SimulatedBoard) -> None:
        """Report ``board``'s room temperature."""
        self._board = board
        self._pointer = 0

    def write(self, data: bytes) -> None:
        """The first byte selects the register."""
        if data:
            self._pointer = data[0]

    def read(self, nbytes: int) -> bytes:
        """Read from the selected register (only register 0 is populated)."""
        raw = 0
        if self._pointer == 0:
            sixteenths = round(self._board.temperature_c() * 16) & 0xFFF
            raw = sixteenths << 4
        return (raw.to_bytes(2, "big") + bytes(max(nbytes - 2, 0)))[:nbytes]
