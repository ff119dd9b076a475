"""The gateway's paho adapter over a real mosquitto: ordering, coalesced writes, large bursts."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from gateway.broker import Broker
from gateway.mqtt import MessageCallback, MqttClient, parse_broker_url

WAIT_S = 20.0


def _client(broker: Broker, **kwargs: object) -> MqttClient:
    return MqttClient(
        parse_broker_url(broker.url),
        client_id=f"edgeseal-test-{uuid.uuid4().hex[:8]}",
        **kwargs,  # type: ignore[arg-type]
    )


@contextmanager
def _publisher_to(broker: Broker, topic: str, on_message: MessageCallback) -> Iterator[MqttClient]:
    """A started publisher, with a started subscriber to ``topic`` calling ``on_message``;
    both stopped at the end."""
    subscriber = _client(broker, subscriptions=(topic,), on_message=on_message)
    subscriber.start()
    publisher = _client(broker)
    publisher.start()
    try:
        yield publisher
    finally:
        publisher.stop()
        subscriber.stop()


def test_replies_published_in_a_callback_arrive_in_order(broker: Broker) -> None:
    """Several publishes queued while handling one message (a verdict, its event, the fleet
    state, the PUBACK: one write pass) all reach a subscriber, in the order published."""
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    received: queue.Queue[tuple[str, bytes]] = queue.Queue()
    subscriber = _client(
        broker,
        subscriptions=(f"{prefix}/out/#",),
        on_message=lambda topic, payload: received.put((topic, payload)),
    )
    subscriber.start()
    replier: MqttClient | None = None

    def answer(_topic: str, payload: bytes) -> None:
        assert replier is not None
        for index in range(5):
            replier.publish(f"{prefix}/out/{index}", payload + bytes([index]))

    replier = _client(broker, subscriptions=(f"{prefix}/in",), on_message=answer)
    replier.start()
    try:
        for round_ in range(3):
            replier.publish(f"{prefix}/in", bytes([round_]))
            got = [received.get(timeout=WAIT_S) for _ in range(5)]
            assert got == [(f"{prefix}/out/{i}", bytes([round_, i])) for i in range(5)]
    finally:
        replier.stop()
        subscriber.stop()


def test_a_burst_larger_than_the_socket_buffer_arrives_whole(broker: Broker) -> None:
    """Megabytes queued at once do not fit the socket: what it does not take stays pending and
    is written as it drains, so every message arrives, whole and in order."""
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    count, size = 120, 64 << 10
    received: queue.Queue[bytes] = queue.Queue()
    payloads = [index.to_bytes(4, "big") * (size // 4) for index in range(count)]
    with _publisher_to(broker, f"{prefix}/burst", lambda _t, p: received.put(p)) as publisher:

        def send_all() -> None:
            for payload in payloads:
                publisher.publish(f"{prefix}/burst", payload)

        sender = threading.Thread(target=send_all)
        sender.start()
        sender.join(WAIT_S)
        got = [received.get(timeout=WAIT_S) for _ in range(count)]
        assert got == payloads


def test_packets_read_together_are_all_delivered_at_once(broker: Broker) -> None:
    """While the subscriber is busy with its first message, hundreds more (small ones, and some
    of 64 KiB and more) pile up in its socket. Once it is free, each is delivered whole, in
    order, without waiting for more traffic."""
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    received: queue.Queue[bytes] = queue.Queue()
    release = threading.Event()

    def on_message(_topic: str, payload: bytes) -> None:
        release.wait(WAIT_S)  # the first message holds the network thread until all are sent
        received.put(payload)

    sizes = [1 + (index * 7919) % 3000 for index in range(300)]
    sizes[100] = sizes[200] = 70_000
    payloads = [index.to_bytes(2, "big") * (size // 2 + 1) for index, size in enumerate(sizes)]
    try:
        with _publisher_to(broker, f"{prefix}/pile", on_message) as publisher:
            for payload in payloads:
                publisher.publish_and_wait(f"{prefix}/pile", payload, qos=0)
            release.set()
            got = [received.get(timeout=5.0) for _ in payloads]
            assert got == payloads
    finally:
        release.set()


def test_a_publish_from_another_thread_leaves_at_once(broker: Broker) -> None:
    """Packets queued on paho's network thread do not wake its select(); one queued on any
    other thread still does: with an idle connection each round trip takes milliseconds, not
    the loop's one-second select timeout."""
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    received: queue.Queue[float] = queue.Queue()

    def arrived(_topic: str, _payload: bytes) -> None:
        received.put(time.monotonic())

    with _publisher_to(broker, f"{prefix}/ping", arrived) as publisher:
        for _ in range(10):
            time.sleep(0.05)  # both loops idle in select()
            sent = time.monotonic()
            publisher.publish(f"{prefix}/ping", b"x")
            assert received.get(timeout=WAIT_S) - sent < 0.5


def test_qos1_publishes_are_acknowledged_and_leave_flight(broker: Broker) -> None:
    """Each QoS 1 publish is marked published when its PUBACK arrives (the adapter reads MQTT
    3.1.1 PUBACKs itself), and nothing stays in flight."""
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    received: queue.Queue[bytes] = queue.Queue()
    payloads = [index.to_bytes(2, "big") for index in range(200)]
    with _publisher_to(broker, f"{prefix}/acked", lambda _t, p: received.put(p)) as publisher:
        for payload in payloads:
            publisher.publish_and_wait(f"{prefix}/acked", payload, qos=1, timeout_s=WAIT_S)
        assert [received.get(timeout=WAIT_S) for _ in payloads] == payloads
        assert publisher._client._inflight_messages == 0
        assert publisher._client._out_messages == {}
