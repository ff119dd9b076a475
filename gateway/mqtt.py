"""The gateway's one paho adapter: a small typed MQTT client (DESIGN §2, §9).

Rules:

- This is the only gateway module that imports paho. Everything above it sees ``MqttClient``:
  ``start``, ``publish``, ``stop``, and a message callback ``(topic, payload) -> None``.
- Every client sets TCP_NODELAY on its socket as soon as paho opens it (``on_socket_open``):
  without it a QoS 1 round trip costs ~88 ms instead of ~0.5 ms (DESIGN §9).
- The message callback is the adapter's callback boundary: an exception escaping it is logged and
  reported to ``on_error``, never raised into paho's network thread (STYLE.md, "Errors").
- Subscriptions are (re)made in ``on_connect``, so a reconnect after the broker went away restores
  them. paho reconnects by itself with an exponential backoff (``reconnect_delay_set``).
- Works on MQTT 3.1.1 (the default) and MQTT 5: nothing here depends on v5 properties.
- Packets queued together leave together: paho writes each packet with its own ``send``, and on
  loopback TCP with TCP_NODELAY each ``send`` is a segment the kernel delivers (and wakes the
  broker for) at once. ``_CoalescingClient`` gathers the packets of one ``loop_write`` pass (a
  verdict, its event, the fleet state and the PUBACK of the evidence) into one ``send``; this
  cut the gateway's CPU per attestation by ~7 % (docs/benchmarks.md).
- Fewer system calls per packet: one ``recv`` serves many incoming packets, and a packet queued
  on paho's own network thread does not wake its ``select`` through the socket pair (the read
  pass writes it). Together ~2 % of the gateway's rate (docs/benchmarks.md).
- An MQTT 3.1.1 PUBACK is read for its message id alone, without the MQTT 5 property objects
  paho builds for an ``on_publish`` callback this adapter does not set.
- These, like the coalesced writes, override private paho 2.x methods (pyproject pins paho 2);
  ``tests/test_gateway_mqtt.py`` holds their behaviour on a real mosquitto.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from protocol.errors import TransportError, UsageError

_log = logging.getLogger(__name__)

DEFAULT_PORT: Final = 1883
KEEPALIVE_S: Final = 30
RECONNECT_MIN_S: Final = 1
RECONNECT_MAX_S: Final = 30
#: What one read from the broker's socket asks for (paho's packets are then parsed from it).
RECV_SIZE: Final = 65_536

#: Called with (topic, payload) for every message received, on paho's network thread.
MessageCallback = Callable[[str, bytes], None]
#: Called with the exception that escaped the message callback.
ErrorCallback = Callable[[BaseException], None]


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where the broker listens."""

    host: str
    port: int = DEFAULT_PORT

    @property
    def url(self) -> str:
        """The address as ``mqtt://host:port``."""
        return f"mqtt://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://host[:port]``, ``tcp://host[:port]`` or ``host[:port]``.

    Raises:
        UsageError: another scheme, no host, or a bad port.
    """
    text = url if "://" in url else f"mqtt://{url}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as err:
        raise UsageError(f"broker URL: bad port in {url!r:.80}") from err
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
        raise UsageError(f"broker URL: expected mqtt://HOST[:PORT], got {url!r:.80}")
    if parts.path not in ("", "/") or parts.query or parts.username:
        raise UsageError(f"broker URL: expected mqtt://HOST[:PORT], got {url!r:.80}")
    return BrokerAddress(parts.hostname, DEFAULT_PORT if port is None else port)


def _set_nodelay(_client: paho.Client, _userdata: object, sock: object) -> None:
    """paho's ``on_socket_open``: TCP_NODELAY on every socket it opens (DESIGN §9)."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _CoalescingClient(paho.Client):
    """paho's client with the packets of one ``loop_write`` pass written in one ``send``.

    paho hands each queued packet to ``_sock_send``, which here only appends it to a buffer;
    ``loop_write`` then sends the buffer. What the socket does not take at once stays buffered
    (``want_write`` tells paho's loop to wait for the socket to be writable and come back). A new
    socket starts with an empty buffer: bytes meant for a lost connection are never written on
    the next one (paho resends unacknowledged QoS 1 messages itself after reconnecting).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending = bytearray()
        self._received = b""
        self._offset = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        # paho asks for the command byte, then each byte of the length, then the body: all of
        # them are served from one large recv, so a burst of packets costs one system call.
        if not self._received:
            data = super()._sock_recv(RECV_SIZE)
            if len(data) <= bufsize:
                return data  # b"" at the end of the stream, as paho expects
            self._received, self._offset = data, 0
        start = self._offset
        chunk = self._received[start : start + bufsize]
        self._offset = start + len(chunk)
        if self._offset == len(self._received):
            self._received = b""
        return chunk

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        # What the callbacks of a read pass queued leaves at the end of the pass (no wake-up of
        # select needed, see _packet_queue). paho reads a bounded number of packets per pass and
        # then waits in select() for the socket: packets already received here must not wait
        # for it, so passes go on, each followed by its writes, until the buffer is empty.
        rc = super().loop_read(max_packets)
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._sock is not None:
            if self.want_write():
                self.loop_write()
            if not self._received:
                break
            rc = super().loop_read(max_packets)
        return rc

    def _packet_queue(
        self,
        command: int,
        packet: bytes | bytearray,
        mid: int,
        qos: int,
        info: paho.MQTTMessageInfo | None = None,
    ) -> MQTTErrorCode:
        if threading.current_thread() is not self._thread:
            return super()._packet_queue(command, packet, mid, qos, info)
        # On paho's network thread (a reply from a message callback, a PUBACK, a PINGREQ): only
        # queued. paho would also write a byte to its socket pair to wake its own select(), a
        # system call per packet; loop_read writes what a pass queued before it returns, and
        # anything queued elsewhere on this thread makes want_write() true for the next select.
        self._out_packet.append(
            {
                "command": command,
                "mid": mid,
                "qos": qos,
                "pos": 0,
                "to_process": len(packet),
                "packet": packet,
                "info": info,
            }
        )
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        # paho decodes every PUBACK into MQTT 5 reason-code and property objects, for MQTT 3.1.1
        # too, to hand them to an on_publish callback: ~9 us, most of a PUBACK's cost, three
        # times per attestation. Without such a callback an MQTT 3.1.1 PUBACK needs only its
        # message id: the message is marked published and leaves the in-flight count, as paho
        # does. Anything else (MQTT 5, PUBCOMP, a callback set, a malformed PUBACK) is paho's.
        packet = self._in_packet["packet"]
        if (
            cmd != "PUBACK"
            or self._protocol == paho.MQTTv5
            or self.on_publish is not None
            or len(packet) != 2
        ):
            return super()._handle_pubackcomp(cmd)
        mid = int.from_bytes(packet, "big")
        with self._out_message_mutex:
            message = self._out_messages.pop(mid, None)
            if message is None:
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            message.info._set_as_published()
            if message.qos > 0:
                self._inflight_messages -= 1
                if self._max_inflight_messages > 0:
                    return self._update_inflight()
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _sock_send(self, buf: bytes | bytearray) -> int:
        if self._sock is None:
            raise ConnectionError("no socket")
        self._pending += buf
        return len(buf)

    def want_write(self) -> bool:
        return bool(self._pending) or super().want_write()

    def loop_write(self) -> MQTTErrorCode:
        rc = super().loop_write()
        if not self._pending or self._sock is None:
            return rc
        try:
            sent = self._sock.send(self._pending)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return rc  # the socket is full: the loop comes back once it is writable
        except OSError as err:
            # The connection is gone: paho's next read sees it and reconnects; the bytes are
            # dropped with it (unacknowledged QoS 1 messages are resent after reconnecting).
            _log.info("send to %s failed: %s", self._host, type(err).__name__)
            self._pending.clear()
            return rc
        del self._pending[:sent]
        return rc

    def forget_pending(self) -> None:
        """Drop what was meant for the previous connection (called as a new socket opens)."""
        self._pending.clear()
        self._received = b""


def _socket_opened(client: paho.Client, userdata: object, sock: object) -> None:
    """paho's ``on_socket_open``: nothing pending from an earlier connection, TCP_NODELAY on."""
    if isinstance(client, _CoalescingClient):
        client.forget_pending()
    _set_nodelay(client, userdata, sock)


class MqttClient:
    """One MQTT connection with subscriptions restored on every (re)connect."""

    def __init__(
        self,
        address: BrokerAddress,
        *,
        client_id: str,
        subscriptions: tuple[str, ...] = (),
        on_message: MessageCallback | None = None,
        on_error: ErrorCallback | None = None,
        qos: int = 1,
        max_queued: int = 0,
    ) -> None:
        """Prepare a client; nothing connects before ``start``.

        Args:
            address: the broker.
            client_id: the MQTT client id (unique per connection).
            subscriptions: topic filters subscribed at ``qos`` on every connect.
            on_message: the message callback (its exceptions are caught, see the module rules).
            on_error: told about each exception that escaped ``on_message``.
            qos: the subscription QoS.
            max_queued: paho's outgoing queue bound (0: unbounded).
        """
        self.address = address
        self._subscriptions = subscriptions
        self._on_message = on_message
        self._on_error = on_error
        self._qos = qos
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._pending_subs: set[int] = set()
        self._lock = threading.Lock()
        self._client = _CoalescingClient(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311
        )
        self._client.on_socket_open = _socket_opened
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_subscribe = self._handle_subscribe
        self._client.on_message = self._handle_message
        self._client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        self._client.max_queued_messages_set(max_queued)
        # No cap on QoS 1 messages awaiting their PUBACK. With a cap, paho walks every message
        # it holds at each PUBACK, looking for queued ones to send: work that grows with the
        # messages in flight, several per attesting device (~1 % of the gateway's rate at 16
        # devices in flight, within the bench's noise). A cap would not bound memory either:
        # beyond it paho queues without limit (max_queued 0). The devices' rate limits do.
        self._client.max_inflight_messages_set(0)

    @property
    def connected(self) -> bool:
        """Whether the client is connected right now."""
        return self._connected.is_set()

    @property
    def tcp_nodelay(self) -> bool:
        """Whether the current socket has TCP_NODELAY set (False when not connected)."""
        sock = self._client.socket()
        if not isinstance(sock, socket.socket):
            return False
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    def start(self, *, timeout_s: float = 10.0, wait: bool = True) -> None:
        """Connect in the background and (with ``wait``) wait until connected and subscribed.

        Without ``wait`` paho keeps retrying in the background until the broker answers.

        Raises:
            TransportError: with ``wait``, the broker did not accept us in time.
        """
        try:
            self._client.connect_async(self.address.host, self.address.port, KEEPALIVE_S)
        except (OSError, ValueError) as err:
            raise TransportError(f"broker {self.address.url}: {err}") from err
        self._client.loop_start()
        if wait and not self.wait_ready(timeout_s):
            self.stop()
            raise TransportError(f"broker {self.address.url}: not connected in {timeout_s} s")

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until connected and every subscription is acknowledged; False on timeout."""
        return self._connected.wait(timeout_s) and self._subscribed.wait(timeout_s)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Queue a message; paho sends it now or after a reconnect (QoS 1)."""
        self._client.publish(topic, payload, qos=qos, retain=retain)

    def publish_and_wait(
        self, topic: str, payload: bytes, *, qos: int = 1, timeout_s: float = 10.0
    ) -> None:
        """Publish and wait until the broker has it (PUBACK for QoS 1).

        Raises:
            TransportError: not delivered within ``timeout_s``.
        """
        info = self._client.publish(topic, payload, qos=qos)
        try:
            info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError) as err:
            raise TransportError(f"broker {self.address.url}: publish failed: {err}") from err
        if not info.is_published():
            raise TransportError(f"broker {self.address.url}: publish not acknowledged")

    def stop(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    # --- paho callbacks (the callback boundary)

    def _handle_connect(
        self,
        client: paho.Client,
        _userdata: object,
        _flags: object,
        reason_code: object,
        _properties: object,
    ) -> None:
        if getattr(reason_code, "is_failure", False):
            _log.warning("broker %s refused the connection: %s", self.address.url, reason_code)
            return
        if not self._subscriptions:
            self._subscribed.set()
        else:
            _result, mid = client.subscribe([(topic, self._qos) for topic in self._subscriptions])
            if mid is not None:
                with self._lock:
                    self._pending_subs.add(mid)
        _log.info("connected to %s", self.address.url)
        self._connected.set()

    def _handle_subscribe(
        self,
        _client: paho.Client,
        _userdata: object,
        mid: int,
        _reason_codes: object,
        _properties: object,
    ) -> None:
        with self._lock:
            self._pending_subs.discard(mid)
            if not self._pending_subs:
                self._subscribed.set()

    def _handle_disconnect(
        self,
        _client: paho.Client,
        _userdata: object,
        _flags: object,
        reason_code: object,
        _properties: object,
    ) -> None:
        self._connected.clear()
        self._subscribed.clear()
        _log.info("disconnected from %s (%s); paho reconnects", self.address.url, reason_code)

    def _handle_message(
        self, _client: paho.Client, _userdata: object, message: paho.MQTTMessage
    ) -> None:
        if self._on_message is None:
            return
        try:
            self._on_message(message.topic, bytes(message.payload))
        except Exception as err:  # the adapter's callback boundary (STYLE.md)
            _log.exception("message handler failed on a message of %d bytes", len(message.payload))
            if self._on_error is not None:
                self._on_error(err)
