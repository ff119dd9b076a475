"""``edgeseal-device``: run a simulated board's normal world, and look at what it exposes.

Commands (a click group; ``attack`` and ``scan-leaks`` join it from the attack bench):

- ``run --home DIR --broker URL [--prefix P]``: power the board on and run the NW agent until
  SIGINT/SIGTERM.
- ``status --home DIR [--json]``: the public state — flash slots and the status the agent last
  published (no secrets: the NW has none).
- ``inspect-flash --home DIR [--json]``: what an attacker reading ``flash.bin`` sees.

Only this module imports click or prints. A user's mistake (bad arguments, a missing or corrupt
home) is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Final

import click

from device.normal_world import public_state
from device.normal_world.public_state import FlashView, StatusView
from protocol import topics
from protocol.errors import EdgesealError, MalformedMessage, UsageError

PROG: Final = "edgeseal-device"
EXIT_USAGE: Final = 2

_home = click.option(
    "--home",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="The board's home directory (flash.bin, fuses.bin, ...).",
)
_json = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


#: Commands of the attacker's bench, imported only when asked for: the normal world (`run`) must
#: never load the playbook, which knows the example app's canary.
_LAZY_COMMANDS: Final = {"attack": "attack", "scan-leaks": "scan_leaks"}


class _DeviceGroup(click.Group):
    """The ``edgeseal-device`` group, with the attack bench loaded lazily."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *_LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        attribute = _LAZY_COMMANDS.get(cmd_name)
        if attribute is None:
            return super().get_command(ctx, cmd_name)
        command = getattr(importlib.import_module("device.attacks.cli"), attribute)
        assert isinstance(command, click.Command)
        return command


@click.group(name=PROG, cls=_DeviceGroup)
def cli() -> None:
    """A simulated edgeseal device: its normal world, and what an attacker sees of it."""


@cli.command()
@_home
@click.option("--broker", required=True, help="The MQTT broker, mqtt://HOST[:PORT].")
@click.option("--prefix", default=topics.DEFAULT_PREFIX, show_default=True, help="Topic prefix.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logs.")
def run(home: Path, broker: str, prefix: str, verbose: bool) -> None:
    """Power the board on and run the normal-world agent until interrupted."""
    from device.hardware.power import Board
    from device.normal_world.agent import Agent, AgentConfig
    from device.normal_world.mqtt import parse_broker_url

    address = parse_broker_url(broker)
    try:
        topics.check_prefix(prefix)
    except MalformedMessage as err:
        raise UsageError(str(err)) from err
    public_state.open_flash(home)  # a missing or corrupt home fails here, before power-on
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    stop = threading.Event()
    _stop_on_signals(stop)
    agent = Agent(Board(home), AgentConfig(broker=address, prefix=prefix))
    agent.run(stop)


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@cli.command()
@_home
@_json
def status(home: Path, as_json: bool) -> None:
    """Show the board's public state: slots and the agent's last status."""
    view = public_state.inspect_flash(home)
    status_view = public_state.read_status_file(home)
    if as_json:
        _print_json({"flash": _status_flash(view), "agent": _agent_json(status_view)})
        return
    _print_status(view, status_view)


def _status_flash(view: FlashView) -> dict[str, object]:
    return {
        "trailer": None if view.trailer is None else dataclasses.asdict(view.trailer),
        "images": [
            {
                "slot": i.slot,
                "status": i.trailer_status,
                "release_id": i.release_id,
                "version": i.version,
                "security_counter": i.security_counter,
            }
            for i in view.images
        ],
    }


def _agent_json(view: StatusView | None) -> dict[str, object] | None:
    if view is None:
        return None
    s = view.status
    return {
        "device_id": view.device_id,
        "state": s.state,
        "version": s.version,
        "running": s.running,
        "boot_count": s.boot_count,
        "counters": dict(s.counters),
        "detail": s.detail,
        "pid": view.pid,
        "updated_s": view.updated_s,
    }


def _print_status(view: FlashView, agent: StatusView | None) -> None:
    if agent is None:
        click.echo("agent: never ran on this home")
    else:
        s = agent.status
        click.echo(f"device: {agent.device_id or '-'}")
        click.echo(f"state: {s.state}  running: {'yes' if s.running else 'no'}")
        click.echo(f"version: {s.version or '-'}  boot count: {s.boot_count}")
        counters = " ".join(f"{k}={v}" for k, v in s.counters) or "-"
        click.echo(f"counters: {counters}")
        if s.detail:
            click.echo(f"detail: {s.detail}")
    if view.trailer is not None:
        click.echo(f"primary slot: {view.trailer.primary}  swap: {view.trailer.swap}")
    for img in view.images:
        click.echo(
            f"{img.slot}: {img.trailer_status}  version {img.version or '-'}  "
            f"release {(img.release_id or '-')[:16]}"
        )


@cli.command("inspect-flash")
@_home
@_json
def inspect_flash(home: Path, as_json: bool) -> None:
    """Show what anyone reading flash.bin sees: layout, stage and image headers, trailer."""
    view = public_state.inspect_flash(home)
    if as_json:
        _print_json(dataclasses.asdict(view))
        return
    _print_flash(view)


def _print_flash(view: FlashView) -> None:
    click.echo(f"flash: {view.path}  {view.total_size} bytes, sectors of {view.sector_size}")
    click.echo("partitions:")
    for part in view.partitions:
        click.echo(f"  {part.name:<10} offset {part.offset:>#10x}  size {part.size:>10}")
    click.echo("boot stages (unverified headers):")
    for st in view.stages:
        if st.error is not None:
            click.echo(f"  {st.partition}: unreadable ({st.error})")
            continue
        click.echo(
            f"  {st.partition}: {st.kind} version {st.version} counter {st.security_counter} "
            f"{'signed' if st.signed else 'UNSIGNED'} signer {(st.signer_id or '')[:16]} "
            f"measurement {(st.measurement or '')[:16]}"
        )
    if view.trailer is not None:
        t = view.trailer
        click.echo(f"slot trailer: seq {t.seq}  primary {t.primary}  swap {t.swap}")
    click.echo("images (unverified manifests; payloads are ciphertext):")
    for img in view.images:
        _print_image(img)
    for cert in view.certificates:
        click.echo(f"certificate ({cert.role}): {cert.subject}  sha256 {cert.sha256[:16]}")
    sealed = view.nvstore_blob_bytes
    click.echo(f"nvstore: {'empty' if sealed is None else f'{sealed} bytes of ciphertext'}")


def _print_image(img: public_state.ImageView) -> None:
    head = f"  {img.slot}: trailer {img.trailer_status} size {img.trailer_size}"
    if img.error is not None:
        click.echo(f"{head}; header unreadable ({img.error})")
    elif img.release_id is None:
        click.echo(f"{head}; no image")
    else:
        click.echo(
            f"{head}; release {img.release_id[:16]} version {img.version} "
            f"counter {img.security_counter} payload {img.payload_size} bytes"
        )


def _print_json(obj: object) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def _fail(message: str) -> int:
    """One line on stderr for a user's mistake; the exit status 2."""
    click.echo(f"{PROG}: error: {message.splitlines()[0] if message else 'failed'}", err=True)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: run the group, mapping user mistakes to one line and exit 2."""
    try:
        result = cli.main(args=argv, prog_name=PROG, standalone_mode=False)
    except click.exceptions.Abort:
        return 1
    except click.ClickException as err:
        return _fail(err.format_message())
    except UsageError as err:
        return _fail(str(err))
    except EdgesealError as err:
        click.echo(f"{PROG}: {type(err).__name__}: {str(err)[:200]}", err=True)
        return 1
    return result if isinstance(result, int) else 0
