# PI controller with hysteresis for an on/off heater (edgeseal example app).

ADC_REF_MV = 3300
TMP36_OFFSET_MV = 500
TMP36_MV_PER_C = 10


def adc_to_celsius(raw_u16):
    """Convert a 16-bit ADC reading of a TMP36 sensor to degrees Celsius."""
    millivolts = raw_u16 * ADC_REF_MV / 65535
    return (millivolts - TMP36_OFFSET_MV) / TMP36_MV_PER_C


class Thermostat:
    """PI loop whose output switches a heater with a hysteresis band."""

    def __init__(self, setpoint_c, band_c, kp, ki, integral_limit=50.0):
        self.setpoint_c = setpoint_c
        self.band_c = band_c
        self.kp = kp
        self.ki = ki
        self.integral_limit = integral_limit
        self.integral = 0.0
        self.heating = False

    def update(self, temp_c, dt_s):
        """Feed one measurement; return whether the heater should be on."""
        error = self.setpoint_c - temp_c
        self.integral += error * dt_s
        limit = self.integral_limit
        self.integral = max(-limit, min(limit, self.integral))  # anti-windup
        output = self.kp * error + self.ki * self.integral
        if output > self.band_c:
            self.heating = True
        elif output < -self.band_c:
            self.heating = False
        return self.heating
