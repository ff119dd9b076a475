# Thermostat: reads the room temperature, drives a heater, publishes telemetry (edgeseal example).
import json
import time

import ubinascii
from control import Thermostat, adc_to_celsius
from machine import ADC, Pin, unique_id
from umqtt.simple import MQTTClient

import config


def run():
    heater = Pin(config.HEATER_PIN, Pin.OUT, value=0)
    sensor = ADC(Pin(config.SENSOR_PIN))
    loop = Thermostat(config.SETPOINT_C, config.BAND_C, config.KP, config.KI)
    client = MQTTClient(ubinascii.hexlify(unique_id()), "enclave")
    client.connect()
    print("thermostat: setpoint", config.SETPOINT_C)
    tick = 0
    last = time.ticks_ms()
    while config.MAX_TICKS == 0 or tick < config.MAX_TICKS:
        time.sleep_ms(config.PERIOD_MS)
        now = time.ticks_ms()
        dt_s = time.ticks_diff(now, last) / 1000
        last = now
        temp_c = adc_to_celsius(sensor.read_u16())
        heater.value(1 if loop.update(temp_c, dt_s) else 0)
        tick += 1
        if tick % config.PUBLISH_EVERY == 0:
            state = {
                "tick": tick,
                "temp_c": round(temp_c, 2),
                "setpoint_c": config.SETPOINT_C,
                "heater": heater.value(),
            }
            client.publish(b"thermostat/state", json.dumps(state))
    client.disconnect()


run()
