# Proprietary signal filter. EDGESEAL-CANARY-7f3a9c2e-SECRET-ALGORITHM
# The coefficients below are the vendor's trade secret: this file must never leave the enclave.
from micropython import const

WATERMARK = "EDGESEAL-CANARY-7f3a9c2e-SECRET-ALGORITHM"  # never published

_Q = 0.0173  # process noise
_R = 0.4127  # measurement noise
_ALPHA = 0.9137  # trend damping
_MAX_STEP = const(8)


class SecretFilter:
    """A damped-trend Kalman-like filter with tuned magic coefficients."""

    def __init__(self):
        self._tag = WATERMARK
        self.estimate = None
        self.trend = 0.0
        self.variance = 1.0
        self.samples = 0

    def feed(self, value):
        """Feed one raw sample; return the filtered estimate."""
        self.samples += 1
        if self.estimate is None:
            self.estimate = value
            return value
        predicted = self.estimate + _ALPHA * self.trend
        self.variance += _Q
        gain = self.variance / (self.variance + _R)
        innovation = max(-_MAX_STEP, min(_MAX_STEP, value - predicted))
        updated = predicted + gain * innovation
        self.trend = _ALPHA * self.trend + (1 - _ALPHA) * (updated - self.estimate)
        self.estimate = updated
        self.variance *= 1 - gain
        return updated
