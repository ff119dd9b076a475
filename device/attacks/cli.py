"""``edgeseal-device attack …`` and ``edgeseal-device scan-leaks …`` (DESIGN §13).

- ``attack list [--json]``: the playbook.
- ``attack NAME --home DIR --broker URL [--json]`` and ``attack all --home DIR --broker URL``:
  build a bench in DIR (absent or empty) on the broker, serve the real gateway, run the attack(s)
  and print the report(s). Exit 0 when every attack was defended, 1 otherwise.
- ``scan-leaks --secret FILE… --canary TEXT… --haystack PATH… [--pid PID] [--json]``: exit 0
  when clean, 1 when a leak was found.

Only this module of ``device.attacks`` imports click or prints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from device.attacks.catalog import ATTACKS, ATTACKS_BY_NAME, run_attack
from device.attacks.playbook import Bench
from device.attacks.report import AttackReport, Outcome
from device.attacks.scanner import (
    Scanner,
    ScanResult,
    Secret,
    canaries_from_text,
    secrets_from_files,
)
from protocol.errors import UsageError

_json = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
_home = click.option(
    "--home",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="The bench's working directory (absent or empty).",
)
_broker = click.option("--broker", required=True, help="The MQTT broker, mqtt://HOST[:PORT].")


class _AttackGroup(click.Group):
    """``attack list``, ``attack all``, and ``attack NAME`` for every attack of the playbook."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The built-in subcommands, then the attacks."""
        return [*super().list_commands(ctx), *ATTACKS_BY_NAME]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """A built-in subcommand, or a command running the attack ``cmd_name``."""
        found = super().get_command(ctx, cmd_name)
        if found is not None or cmd_name not in ATTACKS_BY_NAME:
            return found
        return _attack_command(cmd_name)


def _attack_command(name: str) -> click.Command:
    @click.command(name=name, help=f"Run the attack {name}: {ATTACKS_BY_NAME[name].attacker_did}.")
    @_home
    @_broker
    @_json
    def command(home: Path, broker: str, as_json: bool) -> None:
        _run([name], home, broker, as_json)

    return command


@click.group(name="attack", cls=_AttackGroup)
def attack() -> None:
    """The physical attack playbook: ``attack NAME``, ``attack all``, ``attack list``."""


@attack.command("list")
@_json
def list_attacks(as_json: bool) -> None:
    """List the attacks."""
    if as_json:
        rows = [
            {"name": a.name, "attacker_did": a.attacker_did, "defence": a.defence} for a in ATTACKS
        ]
        click.echo(json.dumps({"attacks": rows}, indent=2))
        return
    for a in ATTACKS:
        click.echo(f"{a.name:<20} {a.attacker_did}")


@attack.command("all")
@_home
@_broker
@_json
def run_all(home: Path, broker: str, as_json: bool) -> None:
    """Run every attack on one bench."""
    _run([a.name for a in ATTACKS], home, broker, as_json)


def _run(names: list[str], home: Path, broker: str, as_json: bool) -> None:
    if home.exists() and any(home.iterdir()):
        raise UsageError(f"{home}: not empty (the bench builds its own world there)")
    home.mkdir(parents=True, exist_ok=True)
    bench = Bench(home, broker)
    reports: list[AttackReport] = []
    try:
        bench.setup()
        bench.start_gateway()
        for name in names:
            reports.append(run_attack(bench, name))
    finally:
        bench.stop()
    if as_json:
        click.echo(json.dumps([r.to_json() for r in reports], indent=2))
    else:
        for r in reports:
            _print_report(r)
    if any(r.outcome is not Outcome.DEFENDED for r in reports):
        sys.exit(1)


def _print_report(r: AttackReport) -> None:
    click.echo(f"== {r.name}: {r.outcome.value.upper()}")
    click.echo(f"  attacker: {r.attacker_did}")
    click.echo(f"  defence:  {r.defence_expected}")
    click.echo(f"  happened: {r.what_happened}")
    where = ", ".join(w.value for w in r.detected_at) or "nowhere"
    click.echo(f"  detected: {where} (expected {', '.join(w.value for w in r.expected_at)})")
    if r.reasons:
        click.echo(f"  reasons:  {', '.join(r.reasons)}")
    click.echo(f"  leaks:    {len(r.leaks)} in {r.scanned_bytes} bytes scanned")
    if r.error:
        click.echo(f"  error:    {r.error}")


@click.command("scan-leaks")
@click.option("--secret", "secrets", multiple=True, type=click.Path(path_type=Path, exists=True))
@click.option("--canary", "canaries", multiple=True)
@click.option(
    "--haystack", "haystacks", multiple=True, type=click.Path(path_type=Path, exists=True)
)
@click.option("--pid", "pids", multiple=True, type=int, help="Scan /proc/PID/mem.")
@_json
def scan_leaks(
    secrets: tuple[Path, ...],
    canaries: tuple[str, ...],
    haystacks: tuple[Path, ...],
    pids: tuple[int, ...],
    as_json: bool,
) -> None:
    """Look for secrets (48-byte runs) and canaries in files and process memory."""
    if not secrets and not canaries:
        raise UsageError("give at least one --secret or --canary")
    if not haystacks and not pids:
        raise UsageError("give at least one --haystack or --pid")
    secret_list: list[Secret] = secrets_from_files(list(secrets))
    scanner = Scanner(secret_list, canaries_from_text(list(canaries)))
    result = scanner.scan_paths(list(haystacks))
    for pid in pids:
        result.merge(scanner.scan_process(pid))
    _print_scan(result, as_json)
    if not result.clean:
        sys.exit(1)


def _print_scan(result: ScanResult, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    for f in result.findings:
        click.echo(f"LEAK {f.secret} in {f.haystack} at {f.offset}: {f.length} bytes ({f.kind})")
    click.echo(
        f"{'clean' if result.clean else f'{len(result.findings)} leak(s)'}: "
        f"{result.scanned_bytes} bytes in {len(result.haystacks)} haystack(s), "
        f"{len(result.unreadable)} unreadable"
    )


COMMANDS = (attack, scan_leaks)


def register(group: click.Group) -> None:
    """Add ``attack`` and ``scan-leaks`` to the ``edgeseal-device`` group."""
    for command in COMMANDS:
        group.add_command(command)
