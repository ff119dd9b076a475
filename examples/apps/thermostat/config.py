# Thermostat configuration (edgeseal example app).
from micropython import const

HEATER_PIN = const(2)  # GPIO driving the heater relay
SENSOR_PIN = const(34)  # ADC pin of the TMP36 sensor
SETPOINT_C = 21.0
BAND_C = 0.5  # hysteresis half-width around the PI output
KP = 1.2
KI = 0.01
PERIOD_MS = const(1000)  # one control tick
PUBLISH_EVERY = const(10)  # ticks between two telemetry messages
MAX_TICKS = const(0)  # 0: run until stopped
