# Secret filter configuration (edgeseal example app).
from micropython import const

SENSOR_ADDR = const(0x48)  # TMP102 on I2C
SAMPLE_MS = const(100)  # Timer period
PUBLISH_MS = const(1000)
MAX_PUBLISHES = const(0)  # 0: run until stopped
