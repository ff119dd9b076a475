"""MQTT topic names, filters and parsing (DESIGN §9)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import topics
from protocol.errors import MalformedMessage
from protocol.ids import DeviceId
from protocol.topics import Channel, Direction, TopicRef, parse_topic

BUILDERS: list[tuple[Callable[..., str], Direction, Channel]] = [
    (topics.attest_up, Direction.UP, Channel.ATTEST),
    (topics.attest_down, Direction.DOWN, Channel.ATTEST),
    (topics.fetch_up, Direction.UP, Channel.FETCH),
    (topics.chunk_down, Direction.DOWN, Channel.CHUNK),
    (topics.status_up, Direction.UP, Channel.STATUS),
    (topics.telemetry_up, Direction.UP, Channel.TELEMETRY),
    (topics.cmd_down, Direction.DOWN, Channel.CMD),
]


def test_topic_table() -> None:
    """Builders spell exactly the topics of the DESIGN §9 table."""
    assert topics.attest_up("dev-1") == "edgeseal/v1/d/dev-1/up/attest"
    assert topics.attest_down("dev-1") == "edgeseal/v1/d/dev-1/down/attest"
    assert topics.fetch_up("dev-1") == "edgeseal/v1/d/dev-1/up/fetch"
    assert topics.chunk_down("dev-1") == "edgeseal/v1/d/dev-1/down/chunk"
    assert topics.status_up("dev-1") == "edgeseal/v1/d/dev-1/up/status"
    assert topics.telemetry_up("dev-1") == "edgeseal/v1/d/dev-1/up/telemetry"
    assert topics.cmd_down("dev-1") == "edgeseal/v1/d/dev-1/down/cmd"
    assert topics.fleet_state("dev-1") == "edgeseal/v1/fleet/dev-1/state"
    assert topics.events() == "edgeseal/v1/events"
    assert topics.fleet_state_filter() == "edgeseal/v1/fleet/+/state"


def test_custom_prefix() -> None:
    """Every builder honours a configured prefix."""
    assert topics.cmd_down("d", prefix="site/a") == "site/a/d/d/down/cmd"
    assert topics.events(prefix="site/a") == "site/a/events"
    assert topics.fleet_state("d", prefix="x") == "x/fleet/d/state"


def test_filters() -> None:
    """Gateway and device filters, with and without a shared subscription group."""
    assert topics.gateway_filters() == ("edgeseal/v1/d/+/up/#",)
    assert topics.gateway_filters(share_group="gw") == ("$share/gw/edgeseal/v1/d/+/up/#",)
    assert topics.device_filters("dev-1") == ("edgeseal/v1/d/dev-1/down/#",)
    for bad in ("", "a/b", "a+", "#", "x" * 65):
        with pytest.raises(MalformedMessage, match="share group"):
            topics.gateway_filters(share_group=bad)


@settings(max_examples=150, deadline=None)
@given(
    device=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True),
    index=st.integers(0, len(BUILDERS) - 1),
    prefix=st.sampled_from(["edgeseal/v1", "p", "a/b/c"]),
)
def test_parse_inverts_builders(device: str, index: int, prefix: str) -> None:
    """Parsing a built topic gives back its device, direction and channel."""
    build, direction, channel = BUILDERS[index]
    topic = build(device, prefix=prefix)
    assert parse_topic(topic, prefix) == TopicRef(DeviceId(device), direction, channel)


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/d/dev-1/up/attest",
        "edgeseal/v2/d/dev-1/up/attest",
        "edgeseal/v1/d/dev-1/up/attest/extra",
        "edgeseal/v1/d/dev-1/up",
        "edgeseal/v1/d//up/attest",
        "edgeseal/v1/d/+/up/attest",
        "edgeseal/v1/d/dev-1/up/#",
        "edgeseal/v1/d/dev 1/up/attest",
        "edgeseal/v1/d/-dev/up/attest",
        "edgeseal/v1/d/dev-1/sideways/attest",
        "edgeseal/v1/d/dev-1/up/reboot",
        "edgeseal/v1/d/dev-1/up/cmd",
        "edgeseal/v1/d/dev-1/down/status",
        "edgeseal/v1/fleet/dev-1/state",
        "edgeseal/v1/events",
        "edgeseal/v1/d/dev\x00/up/attest",
        "",
    ],
)
def test_parse_refuses_other_topics(topic: str) -> None:
    """Anything but a well-formed device topic under the prefix is malformed."""
    with pytest.raises(MalformedMessage):
        parse_topic(topic)


@settings(max_examples=200, deadline=None)
@given(topic=st.text(max_size=80))
def test_parse_given_arbitrary_text_raises_only_malformed(topic: str) -> None:
    """Arbitrary text either parses to a device topic or raises MalformedMessage."""
    try:
        ref = parse_topic(topic)
    except MalformedMessage:
        return
    assert topics.device_topic(ref.device_id, ref.direction, ref.channel) == topic


@pytest.mark.parametrize("prefix", ["", "/a", "a/", "a//b", "$SYS", "a/+", "a/#", "a\x00", 5])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    """Empty levels, wildcards, NUL and $-topics are not prefixes."""
    with pytest.raises(MalformedMessage, match="prefix"):
        topics.events(prefix=prefix)
    with pytest.raises(MalformedMessage, match="prefix"):
        parse_topic("edgeseal/v1/d/dev-1/up/attest", prefix)


def test_builders_refuse_bad_device_ids() -> None:
    """A device id that would escape its topic level is refused."""
    for bad in ("a/b", "+", "#", "", "x" * 65):
        with pytest.raises(MalformedMessage, match="device id"):
            topics.attest_up(bad)
        with pytest.raises(MalformedMessage, match="device id"):
            topics.fleet_state(bad)
        with pytest.raises(MalformedMessage, match="device id"):
            topics.device_filters(bad)


def test_device_topic_refuses_misdirected_channel() -> None:
    """A channel that does not flow in the given direction is refused."""
    with pytest.raises(MalformedMessage, match="does not go"):
        topics.device_topic("dev-1", Direction.UP, Channel.CMD)
