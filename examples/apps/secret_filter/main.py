# Secret filter: samples a TMP102 on a Timer, filters it, publishes the estimate (edgeseal example).
import json
import time

from algo import SecretFilter
from machine import I2C, Pin, Timer
from umqtt.simple import MQTTClient

import config

i2c = I2C(0, scl=Pin(22), sda=Pin(21))
filt = SecretFilter()
latest = [0.0, 0.0]


def read_celsius():
    raw = i2c.readfrom_mem(config.SENSOR_ADDR, 0, 2)
    value = ((raw[0] << 8) | raw[1]) >> 4
    if value & 0x800:
        value -= 0x1000
    return value / 16


def sample(timer):
    raw = read_celsius()
    latest[0] = raw
    latest[1] = filt.feed(raw)


def run():
    if config.SENSOR_ADDR not in i2c.scan():
        raise OSError(19)
    client = MQTTClient(b"secret-filter", "enclave")
    client.connect()
    timer = Timer(-1)
    timer.init(mode=Timer.PERIODIC, period=config.SAMPLE_MS, callback=sample)
    published = 0
    while config.MAX_PUBLISHES == 0 or published < config.MAX_PUBLISHES:
        time.sleep_ms(config.PUBLISH_MS)
        message = {"raw": latest[0], "filtered": round(latest[1], 3), "n": filt.samples}
        client.publish(b"filter/value", json.dumps(message))
        published += 1
    timer.deinit()
    client.disconnect()


run()
