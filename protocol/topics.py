"""MQTT topic names and filters (DESIGN §9; the table in docs/protocol.md).

Device topics are ``{prefix}/d/{device}/{up|down}/{channel}``; dashboards read
``{prefix}/fleet/{device}/state`` and ``{prefix}/events``. The prefix defaults to ``edgeseal/v1``;
it is one or more non-empty levels with no wildcard, NUL or leading ``$`` (MQTT 3.1.1 §4.7). Device
ids are topic-safe by construction (``protocol.ids.device_id``), so a device id can never reach
another device's topics.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from protocol import ids
from protocol.errors import MalformedMessage
from protocol.ids import DeviceId

DEFAULT_PREFIX: Final = "edgeseal/v1"
_FORBIDDEN: Final = frozenset("+#\0")
_SHARE_GROUP_MAX: Final = 64


class Direction(StrEnum):
    """Which way a device topic flows."""

    UP = "up"
    DOWN = "down"


class Channel(StrEnum):
    """The last level of a device topic."""

    ATTEST = "attest"
    FETCH = "fetch"
    CHUNK = "chunk"
    STATUS = "status"
    TELEMETRY = "telemetry"
    CMD = "cmd"


#: The channels legal in each direction.
CHANNELS: Final = {
    Direction.UP: frozenset({Channel.ATTEST, Channel.FETCH, Channel.STATUS, Channel.TELEMETRY}),
    Direction.DOWN: frozenset({Channel.ATTEST, Channel.CHUNK, Channel.CMD}),
}


@dataclass(frozen=True, slots=True)
class TopicRef:
    """What a device topic names."""

    device_id: DeviceId
    direction: Direction
    channel: Channel


def check_prefix(prefix: str) -> str:
    """Validate a topic prefix.

    Raises:
        MalformedMessage: empty levels, wildcards, NUL, or a leading ``$``.
    """
    if (
        not isinstance(prefix, str)
        or not prefix
        or prefix.startswith("$")
        or _FORBIDDEN & set(prefix)
        or "" in prefix.split("/")
    ):
        raise MalformedMessage(f"topic prefix: expected non-empty levels, got {prefix!r:.80}")
    return prefix


def device_topic(
    device: str, direction: Direction, channel: Channel, *, prefix: str = DEFAULT_PREFIX
) -> str:
    """``{prefix}/d/{device}/{direction}/{channel}``.

    Raises:
        MalformedMessage: a bad prefix or device id, or a channel not legal in ``direction``.
    """
    if channel not in CHANNELS[direction]:
        raise MalformedMessage(f"topic: channel {channel} does not go {direction}")
    return f"{check_prefix(prefix)}/d/{ids.device_id(device)}/{direction}/{channel}"


def attest_up(device: str, *, prefix: str = DEFAULT_PREFIX) -> str:
    """Hello and evidence, device → gateway."""
    return device_topic(device, Direction.UP, Channel.ATTEST, prefix=prefix)


def attest_down(device: str, *, prefix: str = DEFAULT_PREFIX) -> str:
    """Challenge, verdict or refusal, gateway → device."""
    return device_topic(device, Direction.DOWN, Channel.ATTEST, prefix=prefix)


def fetch_up(device: str, *, prefix: str = DEFAULT_PREFIX) -> str:
    """Image chunk requests, device → gateway."""
    return device_topic(device, Direction.UP, Channel.FETCH, prefix=prefix)


def chunk_down(device: str, *, prefix: str = DEFAULT_PREFIX) -> str:
    """Image chunks, gateway → device."""
    return device_topic(device, Direction.DOWN, Channel.CHUNK, prefix=prefix)


def status_up(device: str, *, prefix: str = DEFAULT_PREFIX) -> str:
    """Retained device status, device → gateway."""
    return device_topic(device, Direction.UP, Channel.STATUS, prefix=prefix)


def telemetry_up(device: str, *, prefix: str = DEFAULT_PREFIX) -> str:
    """Application output, device → anyone."""
    return device_topic(device, Direction.UP, Channel.TELEMETRY, prefix=prefix)


def cmd_down(device: str, *, prefix: str = DEFAULT_PREFIX) -> str:
    """Signed commands, gateway → device."""
    return device_topic(device, Direction.DOWN, Channel.CMD, prefix=prefix)


def fleet_state(device: str, *, prefix: str = DEFAULT_PREFIX) -> str:
    """Retained JSON state of one device, gateway → dashboards."""
    return f"{check_prefix(prefix)}/fleet/{ids.device_id(device)}/state"


def events(*, prefix: str = DEFAULT_PREFIX) -> str:
    """JSON events, gateway → dashboards."""
    return f"{check_prefix(prefix)}/events"


def fleet_state_filter(*, prefix: str = DEFAULT_PREFIX) -> str:
    """Every device's fleet state, for a dashboard."""
    return f"{check_prefix(prefix)}/fleet/+/state"


def gateway_filters(
    *, prefix: str = DEFAULT_PREFIX, share_group: str | None = None
) -> tuple[str, ...]:
    """What a gateway subscribes to: every device's up topics, shared when ``share_group`` is given.

    Raises:
        MalformedMessage: a bad prefix or share group name.
    """
    topic_filter = f"{check_prefix(prefix)}/d/+/up/#"
    if share_group is None:
        return (topic_filter,)
    if (
        not isinstance(share_group, str)
        or not 0 < len(share_group) <= _SHARE_GROUP_MAX
        or set(share_group) & (_FORBIDDEN | {"/"})
    ):
        raise MalformedMessage(f"share group: expected a name without / + #, got {share_group!r}")
    # MQTT 5 §4.8.2; Mosquitto also honours it for 3.1.1 clients.
    return (f"$share/{share_group}/{topic_filter}",)


def device_filters(device: str, *, prefix: str = DEFAULT_PREFIX) -> tuple[str, ...]:
    """What a device subscribes to: its own down topics."""
    return (f"{check_prefix(prefix)}/d/{ids.device_id(device)}/down/#",)


def parse_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> TopicRef:
    """Parse a device topic received from the broker.

    Raises:
        MalformedMessage: a wrong prefix, bad device id, wildcard, unknown or misdirected
            channel, or extra or missing levels.
    """
    if not isinstance(topic, str) or _FORBIDDEN & set(topic):
        raise MalformedMessage(f"topic: not a device topic: {topic!r:.120}")
    head = check_prefix(prefix) + "/d/"
    if not topic.startswith(head):
        raise MalformedMessage(f"topic: expected prefix {head!r}, got {topic!r:.120}")
    levels = topic[len(head) :].split("/")
    if len(levels) != 3:
        raise MalformedMessage(f"topic: expected d/{{device}}/{{dir}}/{{channel}}: {topic!r:.120}")
    device, direction_text, channel_text = levels
    try:
        direction = Direction(direction_text)
        channel = Channel(channel_text)
    except ValueError as err:
        raise MalformedMessage(f"topic: unknown direction or channel: {topic!r:.120}") from err
    if channel not in CHANNELS[direction]:
        raise MalformedMessage(f"topic: channel {channel} does not go {direction}")
    return TopicRef(device_id=ids.device_id(device), direction=direction, channel=channel)
