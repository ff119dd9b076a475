"""MicroPython's module surface for apps run under CPython (DESIGN §11).

Every run gets fresh module objects (and fresh subclasses of the shim classes, bound to the run's
:class:`RunContext`), so an app that patches ``machine.Pin`` changes nothing for the next app.
:data:`SHIM_MODULES` is the complete list; any other import fails as on a board (see
``provisioning/firmware.py`` for the table ``firmware check`` applies statically).
"""

from __future__ import annotations

import binascii as _binascii
import hashlib as _hashlib
import json as _json
import math as _math
import struct as _struct
import types
from collections.abc import Callable
from typing import Any, ClassVar, Final

from device.enclave.mpy.context import ResetRequested, RunContext

#: The modules an app can import in the enclave runtime, aliases included.
SHIM_MODULES: Final = frozenset(
    {
        "machine",
        "time",
        "utime",
        "binascii",
        "ubinascii",
        "json",
        "ujson",
        "struct",
        "ustruct",
        "hashlib",
        "uhashlib",
        "math",
        "micropython",
        "gc",
        "sys",
        "usys",
        "umqtt",
        "umqtt.simple",
    }
)

#: MicroPython's ticks wrap at 2**30 (``MICROPY_PY_TIME_TICKS_PERIOD``).
TICKS_PERIOD: Final = 1 << 30
_TICKS_HALF: Final = TICKS_PERIOD // 2


def _module(name: str, attrs: dict[str, object]) -> types.ModuleType:
    """A fresh module object ``name`` holding ``attrs``."""
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def _bind(base: type[Any], ctx: RunContext, module: str) -> type[Any]:
    """A fresh subclass of ``base`` bound to ``ctx`` (what the app sees as the class)."""
    return type(base.__name__.lstrip("_"), (base,), {"_ctx": ctx, "__module__": module})


# -- machine -------------------------------------------------------------------------------------


def _pin_id(pin: object) -> int:
    """The numeric id of a Pin or an int."""
    if isinstance(pin, _Pin):
        return pin.id
    if isinstance(pin, int):
        return pin
    raise TypeError("expected a Pin or a pin number")


class _Pin:
    """``machine.Pin``: a GPIO of the simulated board."""

    _ctx: ClassVar[RunContext]
    IN: ClassVar[int] = 1
    OUT: ClassVar[int] = 3
    OPEN_DRAIN: ClassVar[int] = 7
    PULL_UP: ClassVar[int] = 2
    PULL_DOWN: ClassVar[int] = 1
    IRQ_RISING: ClassVar[int] = 1
    IRQ_FALLING: ClassVar[int] = 2

    def __init__(
        self, id: int, mode: int = -1, pull: int = -1, *, value: int | None = None
    ) -> None:
        self.id = _pin_id(id)
        self.mode = mode
        self.pull = pull
        if value is not None:
            self.value(value)

    def init(self, mode: int = -1, pull: int = -1, *, value: int | None = None) -> None:
        self.mode, self.pull = mode, pull
        if value is not None:
            self.value(value)

    def value(self, x: object = None) -> int | None:
        if x is None:
            return self._ctx.board.pin_value(self.id)
        self._ctx.board.set_pin(self.id, 1 if x else 0)
        return None

    def __call__(self, x: object = None) -> int | None:
        return self.value(x)

    def on(self) -> None:
        self.value(1)

    def off(self) -> None:
        self.value(0)

    def toggle(self) -> None:
        self.value(0 if self.value() else 1)

    def irq(self, handler: object = None, trigger: int = 3) -> None:
        """Accepted and ignored: the simulated inputs never change on their own."""


class _ADC:
    """``machine.ADC``: reads the simulated analog sensor on a pin."""

    _ctx: ClassVar[RunContext]
    ATTN_0DB: ClassVar[int] = 0
    ATTN_2_5DB: ClassVar[int] = 1
    ATTN_6DB: ClassVar[int] = 2
    ATTN_11DB: ClassVar[int] = 3

    def __init__(self, pin: object, *, atten: int | None = None) -> None:
        self.pin = _pin_id(pin)

    def atten(self, value: int) -> None:
        """Accepted and ignored."""

    def width(self, value: int) -> None:
        """Accepted and ignored."""

    def read_u16(self) -> int:
        return self._ctx.board.read_adc_u16(self.pin)

    def read(self) -> int:
        return self.read_u16() >> 4

    def read_uv(self) -> int:
        return self.read_u16() * 3_300_000 // 0xFFFF


class _I2C:
    """``machine.I2C``: talks to the simulated I2C devices."""

    _ctx: ClassVar[RunContext]

    def __init__(
        self, id: int = 0, *, scl: object = None, sda: object = None, freq: int = 400_000
    ) -> None:
        self.id = id
        self.freq = freq

    def _device(self, addr: int) -> Any:
        device = self._ctx.board.i2c_device(addr)
        if device is None:
            raise OSError(19, "ENODEV")
        return device

    def scan(self) -> list[int]:
        return self._ctx.board.i2c_addresses()

    def readfrom(self, addr: int, nbytes: int, stop: bool = True) -> bytes:
        return bytes(self._device(addr).read(int(nbytes)))

    def readfrom_into(self, addr: int, buf: bytearray, stop: bool = True) -> None:
        buf[:] = self.readfrom(addr, len(buf))

    def writeto(self, addr: int, buf: bytes, stop: bool = True) -> int:
        self._device(addr).write(bytes(buf))
        return len(buf)

    def readfrom_mem(self, addr: int, memaddr: int, nbytes: int, *, addrsize: int = 8) -> bytes:
        self.writeto(addr, bytes([memaddr & 0xFF]), False)
        return self.readfrom(addr, nbytes)

    def readfrom_mem_into(
        self, addr: int, memaddr: int, buf: bytearray, *, addrsize: int = 8
    ) -> None:
        buf[:] = self.readfrom_mem(addr, memaddr, len(buf))

    def writeto_mem(self, addr: int, memaddr: int, buf: bytes, *, addrsize: int = 8) -> None:
        self.writeto(addr, bytes([memaddr & 0xFF]) + bytes(buf))


class _Timer:
    """``machine.Timer``: callbacks run by the runtime at the app's yield points (sleeps)."""

    _ctx: ClassVar[RunContext]
    ONE_SHOT: ClassVar[int] = 0
    PERIODIC: ClassVar[int] = 1

    def __init__(self, id: int = -1, **kwargs: Any) -> None:
        self.id = id
        if kwargs:
            self.init(**kwargs)

    def init(
        self,
        *,
        mode: int = 1,
        period: int = -1,
        freq: float = -1,
        callback: Callable[[object], object] | None = None,
    ) -> None:
        if period <= 0 and freq > 0:
            period = max(int(1000 / freq), 1)
        if callback is None or period <= 0:
            raise ValueError("Timer needs a callback and a period or freq")
        self._ctx.add_timer(self, period, mode == self.PERIODIC, callback)

    def deinit(self) -> None:
        self._ctx.cancel_timers(self)


def _machine(ctx: RunContext) -> types.ModuleType:
    """The ``machine`` module of one run."""

    def reset() -> None:
        raise ResetRequested

    return _module(
        "machine",
        {
            "Pin": _bind(_Pin, ctx, "machine"),
            "ADC": _bind(_ADC, ctx, "machine"),
            "I2C": _bind(_I2C, ctx, "machine"),
            "SoftI2C": _bind(_I2C, ctx, "machine"),
            "Timer": _bind(_Timer, ctx, "machine"),
            "unique_id": lambda: ctx.board.unique_id,
            "reset": reset,
            "soft_reset": reset,
            "freq": lambda *args: 240_000_000,
            "idle": lambda: ctx.sleep_ms(0),
            "disable_irq": lambda: 0,
            "enable_irq": lambda state=0: None,
            "PWRON_RESET": 1,
            "reset_cause": lambda: 1,
        },
    )


# -- time ----------------------------------------------------------------------------------------


def ticks_diff(ticks1: int, ticks2: int) -> int:
    """MicroPython's signed difference of two wrapped tick values."""
    return ((ticks1 - ticks2 + _TICKS_HALF) & (TICKS_PERIOD - 1)) - _TICKS_HALF


def ticks_add(ticks: int, delta: int) -> int:
    """MicroPython's wrapped tick addition."""
    return (ticks + delta) & (TICKS_PERIOD - 1)


def _time(ctx: RunContext, name: str) -> types.ModuleType:
    """The ``time`` module of one run (sleeps are the app's yield points)."""
    return _module(
        name,
        {
            "sleep_ms": ctx.sleep_ms,
            "sleep": lambda seconds: ctx.sleep_ms(round(seconds * 1000)),
            "sleep_us": lambda us: ctx.sleep_ms(us // 1000),
            "ticks_ms": lambda: ctx.clock.ticks_ms() & (TICKS_PERIOD - 1),
            "ticks_us": lambda: (ctx.clock.ticks_ms() * 1000) & (TICKS_PERIOD - 1),
            "ticks_cpu": lambda: (ctx.clock.ticks_ms() * 1000) & (TICKS_PERIOD - 1),
            "ticks_diff": ticks_diff,
            "ticks_add": ticks_add,
            "time": ctx.clock.epoch_s,
            "time_ns": lambda: ctx.clock.epoch_s() * 1_000_000_000,
        },
    )


# -- data modules --------------------------------------------------------------------------------


class _Hash:
    """A MicroPython hash object: ``update`` and ``digest`` only (no ``hexdigest`` on boards)."""

    def __init__(self, algorithm: str, data: bytes = b"") -> None:
        self._hash = _hashlib.new(algorithm)
        self._hash.update(data)

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    def digest(self) -> bytes:
        return self._hash.digest()


def _hashlib_module(name: str) -> types.ModuleType:
    """``hashlib``: sha256 and sha1."""
    return _module(
        name,
        {
            "sha256": lambda data=b"": _Hash("sha256", data),
            "sha1": lambda data=b"": _Hash("sha1", data),
        },
    )


def _copy(name: str, source: types.ModuleType, names: tuple[str, ...]) -> types.ModuleType:
    """A fresh module ``name`` with ``names`` copied from a host module."""
    return _module(name, {attr: getattr(source, attr) for attr in names})


def _json_module(name: str) -> types.ModuleType:
    return _copy(name, _json, ("dumps", "loads"))


def _struct_module(name: str) -> types.ModuleType:
    return _copy(name, _struct, ("pack", "unpack", "calcsize", "pack_into", "unpack_from"))


def _binascii_module(name: str) -> types.ModuleType:
    return _copy(name, _binascii, ("hexlify", "unhexlify", "a2b_base64", "b2a_base64", "crc32"))


def _math_module() -> types.ModuleType:
    names = tuple(n for n in dir(_math) if not n.startswith("_"))
    return _copy("math", _math, names)


def _micropython() -> types.ModuleType:
    """``micropython``: ``const`` and the code-emitter decorators (identity here)."""

    def identity(func: object) -> object:
        return func

    return _module(
        "micropython",
        {
            "const": lambda value: value,
            "native": identity,
            "viper": identity,
            "bytecode": identity,
            "opt_level": lambda *level: 0,
            "mem_info": lambda *verbose: None,
            "qstr_info": lambda *verbose: None,
            "stack_use": lambda: 0,
            "alloc_emergency_exception_buf": lambda size: None,
            "heap_lock": lambda: 0,
            "heap_unlock": lambda: 0,
            "kbd_intr": lambda chr_: None,
            "schedule": lambda func, arg: func(arg),
        },
    )


def _gc() -> types.ModuleType:
    """``gc``: collection is CPython's business; the memory figures are a plausible board's."""
    return _module(
        "gc",
        {
            "collect": lambda: 0,
            "enable": lambda: None,
            "disable": lambda: None,
            "isenabled": lambda: True,
            "mem_free": lambda: 110_000,
            "mem_alloc": lambda: 20_000,
            "threshold": lambda *amount: -1,
        },
    )


class _Stream:
    """``sys.stdout`` / ``sys.stderr``: both write to the telemetry sink like ``print``."""

    def __init__(self, ctx: RunContext) -> None:
        self._ctx = ctx

    def write(self, text: object) -> int:
        data = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        self._ctx.write_text(data)
        return len(data)

    def flush(self) -> None:
        """Lines are sent as they complete."""


def _sys(ctx: RunContext, name: str) -> types.ModuleType:
    """A minimal ``sys``: identity, ``exit`` and ``print_exception`` (type and message only)."""

    def print_exception(exc: BaseException, file: object = None) -> None:
        ctx.write_text(f"{type(exc).__name__}: {exc}\n")

    impl = types.SimpleNamespace(name="micropython", version=(1, 29, 0, ""), _machine="edgeseal")
    return _module(
        name,
        {
            "implementation": impl,
            "platform": "edgeseal",
            "version": "3.4.0; MicroPython v1.29.0 (edgeseal enclave)",
            "byteorder": "little",
            "maxsize": 2**31 - 1,
            "argv": [],
            "path": [""],
            "exit": _exit,
            "print_exception": print_exception,
            "stdout": _Stream(ctx),
            "stderr": _Stream(ctx),
        },
    )


def _exit(code: object = 0) -> None:
    raise SystemExit(code)


# -- umqtt.simple --------------------------------------------------------------------------------


def _text(value: object) -> str:
    """A topic given as bytes or str, as text."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8")
    if isinstance(value, str):
        return value
    raise TypeError("expected bytes or str")


def _payload(value: object) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError("expected bytes or str")


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches the MQTT filter (``+`` one level, ``#`` the rest)."""
    parts, names = topic_filter.split("/"), topic.split("/")
    for index, part in enumerate(parts):
        if part == "#":
            return True
        if index >= len(names) or (part != "+" and part != names[index]):
            return False
    return len(parts) == len(names)


class MQTTException(Exception):
    """``umqtt.simple.MQTTException``."""


class _MQTTClient:
    """``umqtt.simple.MQTTClient``: publishes become telemetry through the enclave; subscribed
    downlink messages arrive through :meth:`RunContext.deliver`.
    """

    _ctx: ClassVar[RunContext]

    def __init__(
        self,
        client_id: object,
        server: object,
        port: int = 0,
        user: object = None,
        password: object = None,
        keepalive: int = 0,
        ssl: object = None,
        ssl_params: object = None,
    ) -> None:
        self.client_id = client_id
        self.server = server
        self.cb: Callable[[bytes, bytes], object] | None = None
        self._connected = False
        self._filters: list[str] = []

    def set_callback(self, f: Callable[[bytes, bytes], object]) -> None:
        self.cb = f

    def set_last_will(self, topic: object, msg: object, retain: bool = False, qos: int = 0) -> None:
        """Accepted; the enclave reports the app's end itself."""

    def connect(self, clean_session: bool = True, timeout: object = None) -> int:
        self._connected = True
        return 0

    def disconnect(self) -> None:
        self._connected = False

    def ping(self) -> None:
        self._require_connected()

    def _require_connected(self) -> None:
        if not self._connected:
            raise OSError(107, "ENOTCONN")

    def publish(self, topic: object, msg: object, retain: bool = False, qos: int = 0) -> None:
        self._require_connected()
        self._ctx.publish(_text(topic), _payload(msg))

    def subscribe(self, topic: object, qos: int = 0) -> None:
        self._require_connected()
        if self.cb is None:
            raise MQTTException("subscribe before set_callback")
        self._filters.append(_text(topic))

    def check_msg(self) -> None:
        """Deliver one waiting message to the callback, if there is one."""
        self._require_connected()
        while (message := self._ctx.next_message()) is not None:
            topic, payload = message
            if self.cb is not None and any(topic_matches(f, topic) for f in self._filters):
                self.cb(topic.encode("utf-8"), payload)
                return

    def wait_msg(self) -> None:
        """Block (yielding every 10 ms) until a message arrives, then deliver it."""
        self._require_connected()
        while True:
            message = self._ctx.next_message()
            if message is None:
                self._ctx.sleep_ms(10)
                continue
            topic, payload = message
            if self.cb is not None and any(topic_matches(f, topic) for f in self._filters):
                self.cb(topic.encode("utf-8"), payload)
                return


def _umqtt_simple(ctx: RunContext) -> types.ModuleType:
    return _module(
        "umqtt.simple",
        {"MQTTClient": _bind(_MQTTClient, ctx, "umqtt.simple"), "MQTTException": MQTTException},
    )


def make_shim(name: str, ctx: RunContext) -> types.ModuleType:
    """A fresh shim module ``name`` bound to ``ctx``.

    Raises:
        KeyError: ``name`` is not in :data:`SHIM_MODULES`.
    """
    builders: dict[str, Callable[[], types.ModuleType]] = {
        "machine": lambda: _machine(ctx),
        "time": lambda: _time(ctx, "time"),
        "utime": lambda: _time(ctx, "utime"),
        "binascii": lambda: _binascii_module("binascii"),
        "ubinascii": lambda: _binascii_module("ubinascii"),
        "json": lambda: _json_module("json"),
        "ujson": lambda: _json_module("ujson"),
        "struct": lambda: _struct_module("struct"),
        "ustruct": lambda: _struct_module("ustruct"),
        "hashlib": lambda: _hashlib_module("hashlib"),
        "uhashlib": lambda: _hashlib_module("uhashlib"),
        "math": _math_module,
        "micropython": _micropython,
        "gc": _gc,
        "sys": lambda: _sys(ctx, "sys"),
        "usys": lambda: _sys(ctx, "usys"),
        "umqtt": lambda: _module("umqtt", {"__path__": []}),
        "umqtt.simple": lambda: _umqtt_simple(ctx),
    }
    return builders[name]()
