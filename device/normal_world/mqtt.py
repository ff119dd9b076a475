"""The device side's only paho module: a small typed MQTT link (DESIGN §2, §9).

One ``MqttLink`` is one client, driven by its owner's thread: ``poll`` runs paho's network loop
for at most ``timeout_s`` and returns what happened (``LinkUp``, ``LinkDown``, ``Received``), in
order. Nothing here reconnects on its own — the agent decides when, with jittered backoff — and
no paho type leaves this module. Every socket gets TCP_NODELAY as it opens (without it a QoS 1
round trip costs ~88 ms instead of ~0.5 ms; DESIGN §9). Subscriptions are made again after every
connect (clean session), so a reconnect needs nothing from the caller.

Payloads are opaque bytes here; the protocol decodes them.
"""

from __future__ import annotations

import contextlib
import socket
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from protocol.errors import TransportError, UsageError

DEFAULT_PORT: Final = 1883
#: The largest payload we accept from the broker (a chunk with its envelope, DESIGN §9).
MAX_PAYLOAD_BYTES: Final = 64 * 1024 + 256
_SCHEMES: Final = frozenset({"mqtt", "tcp"})


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where the broker listens."""

    host: str
    port: int

    @property
    def url(self) -> str:
        """``mqtt://host:port``."""
        return f"mqtt://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://host[:port]`` (or ``tcp://``); the port defaults to 1883.

    Raises:
        UsageError: another scheme, no host, a bad port, or a path, user or query part.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise UsageError(f"broker URL {url!r}: {err}") from err
    if parts.scheme not in _SCHEMES or not parts.hostname:
        raise UsageError(f"broker URL {url!r}: expected mqtt://HOST[:PORT]")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise UsageError(f"broker URL {url!r}: expected mqtt://HOST[:PORT] and nothing else")
    return BrokerAddress(parts.hostname, DEFAULT_PORT if port is None else port)


@dataclass(frozen=True, slots=True)
class LinkUp:
    """The broker accepted the connection; subscriptions are being made."""


@dataclass(frozen=True, slots=True)
class LinkDown:
    """The connection is gone (or never came up); ``reason`` is short and for logs."""

    reason: str


@dataclass(frozen=True, slots=True)
class Received:
    """A message on one of our subscriptions."""

    topic: str
    payload: bytes


LinkEvent = LinkUp | LinkDown | Received


@dataclass(frozen=True, slots=True)
class Will:
    """A retained last will, published by the broker when the link dies."""

    topic: str
    payload: bytes


def _nodelay(sock: Any) -> None:
    """Set TCP_NODELAY on a paho socket (a plain TCP socket in our transports)."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttLink:
    """One MQTT 3.1.1 client, polled by its owner (see the module docstring)."""

    def __init__(
        self,
        address: BrokerAddress,
        client_id: str,
        subscriptions: Sequence[str],
        *,
        keepalive_s: int = 15,
        connect_timeout_s: float = 5.0,
        will: Will | None = None,
    ) -> None:
        """Prepare a client; nothing connects until ``connect``."""
        self.address = address
        self.subscriptions = tuple(subscriptions)
        self.keepalive_s = keepalive_s
        self._events: list[LinkEvent] = []
        self._connected = False
        self._active = False
        self._client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
        )
        self._client.max_inflight_messages_set(100)
        self._client.connect_timeout = connect_timeout_s
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=1, retain=True)
        self._client.on_socket_open = self._on_socket_open
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    @property
    def connected(self) -> bool:
        """Whether the broker has accepted us and the link is up."""
        return self._connected

    def connect(self) -> None:
        """Open the TCP connection and send CONNECT; ``LinkUp`` follows from ``poll``.

        Raises:
            TransportError: the broker cannot be reached.
        """
        try:
            self._client.connect(self.address.host, self.address.port, self.keepalive_s)
        except (OSError, ValueError, RuntimeError) as err:
            raise TransportError(f"mqtt: cannot reach {self.address.url}: {err}") from err
        self._active = True

    def poll(self, timeout_s: float) -> list[LinkEvent]:
        """Run the network loop for up to ``timeout_s``; return the events since the last poll.

        With no connection open (down, or never connected), this just waits ``timeout_s``.
        """
        if not self._active:
            time.sleep(timeout_s)
        else:
            rc = self._client.loop(timeout=timeout_s)
            if rc != paho.MQTT_ERR_SUCCESS:
                self._mark_down(f"loop: {paho.error_string(rc)}")
        events, self._events = self._events, []
        return events

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        """Queue one message (QoS 1 by default).

        Raises:
            TransportError: the link is down (the caller republishes after ``LinkUp``).
        """
        if not self._connected:
            raise TransportError("mqtt: not connected")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise TransportError(f"mqtt: publish failed: {paho.error_string(info.rc)}")

    def disconnect(self) -> None:
        """Say goodbye to the broker (no will) and close the socket; no ``LinkDown`` follows."""
        self._connected = False
        self._active = False
        with contextlib.suppress(OSError):
            self._client.disconnect()
            self._client.loop(timeout=0.05)
        # paho keeps a wake-up socket pair until its finalizer; release it now (``poll`` makes
        # a new one on the next connection), so no socket outlives the link.
        with contextlib.suppress(AttributeError, OSError):
            self._client._reset_sockets()

    # paho callbacks (run inside ``poll``) -------------------------------------------------------

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        _nodelay(sock)

    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if getattr(reason, "is_failure", False):
            self._mark_down(f"connect refused: {reason}")
            return
        self._connected = True
        for topic_filter in self.subscriptions:
            self._client.subscribe(topic_filter, qos=1)
        self._events.append(LinkUp())

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._mark_down(f"disconnected: {reason}")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        payload = bytes(message.payload)
        if len(payload) <= MAX_PAYLOAD_BYTES:
            self._events.append(Received(str(message.topic), payload))

    def _mark_down(self, reason: str) -> None:
        """Report the link down once per connection attempt."""
        if self._active:
            self._events.append(LinkDown(reason))
        self._active = False
        self._connected = False
