"""``edgeseal-device``: status and inspect-flash on a manufactured board; mistakes exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from device.cli import main
from device.normal_world.public_state import STATUS_FILE, write_status_file
from protocol import keys, messages
from tests.test_normal_world import CANARY, Pki, Release, manufacture_board


@pytest.fixture(scope="module")
def pki() -> Pki:
    """Keys for the module."""
    return Pki.generate()


@pytest.fixture(scope="module")
def app(pki: Pki) -> Release:
    """The secret filter, sealed."""
    return pki.seal_app("secret_filter", "1.4.2", 3, os.urandom(32))


@pytest.fixture
def home(tmp_path: Path, pki: Pki, app: Release) -> Path:
    """A manufactured board with the secret filter installed."""
    board = tmp_path / "board"
    manufacture_board(board, pki, "cli-dev-1", app)
    return board


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the console entry point in-process; (exit status, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_usage_error(code: int, out: str, err: str) -> None:
    """Exit 2, nothing on stdout, exactly one line on stderr, no traceback."""
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("edgeseal-device: error: ")


def test_inspect_flash_shows_the_public_layout(
    capsys: pytest.CaptureFixture[str], home: Path, pki: Pki, app: Release
) -> None:
    """Partitions, signed stage headers, the trailer and the image manifest, as JSON."""
    code, out, err = run_cli(capsys, "inspect-flash", "--home", str(home), "--json")
    assert code == 0, err
    view = json.loads(out)
    assert [p["name"] for p in view["partitions"]][:3] == ["bl2", "runtime", "certs"]
    stages = {s["kind"]: s for s in view["stages"]}
    rotpk_id = keys.signer_id(pki.rotpk.public_key()).hex()
    assert set(stages) == {"BL2", "RT"}
    assert all(s["signed"] and s["signer_id"] == rotpk_id for s in stages.values())
    assert all(len(bytes.fromhex(s["measurement"])) == 32 for s in stages.values())
    primary = view["trailer"]["primary"]
    image = next(i for i in view["images"] if i["slot"] == primary)
    assert image["release_id"] == app.release_id and image["version"] == "1.4.2"
    assert image["security_counter"] == 3 and image["trailer_status"] == "confirmed"
    assert view["nvstore_blob_bytes"] is None
    certs = {c["role"]: c["subject"] for c in view["certificates"]}
    assert certs == {"secured": "CN=cli-dev-1", "debug": "OU=debug,CN=cli-dev-1"}


def test_inspect_flash_text_names_no_secret(
    capsys: pytest.CaptureFixture[str], home: Path, app: Release
) -> None:
    """The human output lists the stages and image, and holds neither CEK nor source."""
    code, out, _ = run_cli(capsys, "inspect-flash", "--home", str(home))
    assert code == 0
    assert "BL2 version 1.0.0" in out and "signed" in out
    assert f"release {app.release_id[:16]}" in out
    for secret in (app.cek.hex(), CANARY.decode(), "SecretFilter"):
        assert secret not in out


def test_status_of_a_board_that_never_ran(
    capsys: pytest.CaptureFixture[str], home: Path, app: Release
) -> None:
    """Before the agent ever ran: the slots, and no agent status."""
    code, out, _ = run_cli(capsys, "status", "--home", str(home))
    assert code == 0
    assert "never ran" in out and "1.4.2" in out
    code, out, _ = run_cli(capsys, "status", "--home", str(home), "--json")
    view = json.loads(out)
    assert view["agent"] is None
    assert app.release_id in [i["release_id"] for i in view["flash"]["images"]]


def test_status_reads_the_agents_status_file(
    capsys: pytest.CaptureFixture[str], home: Path
) -> None:
    """The status file the agent keeps is shown: state, version, counters, detail."""
    status = messages.Status("running", "1.4.2", (("app", 3), ("bl2", 1)), 7, True, "ok")
    write_status_file(home, "cli-dev-1", status)
    code, out, _ = run_cli(capsys, "status", "--home", str(home), "--json")
    assert code == 0
    agent = json.loads(out)["agent"]
    assert agent["state"] == "running" and agent["version"] == "1.4.2"
    assert agent["counters"] == {"app": 3, "bl2": 1} and agent["boot_count"] == 7
    assert agent["device_id"] == "cli-dev-1" and agent["pid"] == os.getpid()
    code, out, _ = run_cli(capsys, "status", "--home", str(home))
    assert "state: running  running: yes" in out and "app=3 bl2=1" in out


@pytest.mark.parametrize("command", ["status", "inspect-flash"])
def test_missing_home_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:
    """A home that does not exist: one line, exit 2."""
    assert_one_line_usage_error(*run_cli(capsys, command, "--home", str(tmp_path / "nope")))


@pytest.mark.parametrize("damage", ["truncated", "table", "empty_dir"])
@pytest.mark.parametrize("command", ["status", "inspect-flash"])
def test_corrupt_flash_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], home: Path, command: str, damage: str
) -> None:
    """A truncated flash, a flipped partition-table bit or no flash at all: one line, exit 2."""
    flash = home / "flash.bin"
    if damage == "truncated":
        flash.write_bytes(flash.read_bytes()[:10_000])
    elif damage == "table":
        data = bytearray(flash.read_bytes())
        data[30] ^= 0x01
        flash.write_bytes(bytes(data))
    else:
        flash.unlink()
    assert_one_line_usage_error(*run_cli(capsys, command, "--home", str(home)))


def test_corrupt_status_file_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], home: Path
) -> None:
    """A status file that is not the agent's CBOR: one line, exit 2."""
    (home / STATUS_FILE).write_bytes(b"\xa1\x01garbage")
    assert_one_line_usage_error(*run_cli(capsys, "status", "--home", str(home)))


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["inspect-flash", "--home"],
        ["no-such-command"],
        ["status", "--home", "x", "--bogus"],
        ["run", "--home", "x"],
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """Missing or unknown options and commands: one line, exit 2, no usage dump."""
    assert_one_line_usage_error(*run_cli(capsys, *argv))


def test_run_refuses_a_bad_broker_or_home_before_powering_on(
    capsys: pytest.CaptureFixture[str], home: Path, tmp_path: Path
) -> None:
    """A bad broker URL, prefix or home is one line and exit 2; nothing is started."""
    for argv in (
        ["run", "--home", str(home), "--broker", "http://x"],
        ["run", "--home", str(home), "--broker", "mqtt://h", "--prefix", "a/#"],
        ["run", "--home", str(tmp_path / "nope"), "--broker", "mqtt://127.0.0.1:1"],
    ):
        assert_one_line_usage_error(*run_cli(capsys, *argv))
    assert not (home / STATUS_FILE).exists()


def test_python_dash_m_device_is_the_cli(home: Path) -> None:
    """`python -m device` runs the same group; a user mistake exits 2 with one line."""
    ok = subprocess.run(
        [sys.executable, "-m", "device", "inspect-flash", "--home", str(home)],
        capture_output=True,
        check=False,
    )
    assert ok.returncode == 0 and b"partitions:" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "device", "status", "--home", str(home / "missing")],
        capture_output=True,
        check=False,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_normal_world_entry_point_never_loads_the_attack_bench() -> None:
    """`edgeseal-device run` must not import the playbook (it holds the example app's canary)."""
    import subprocess
    import sys

    probe = "import sys, device.cli; print(sorted(m for m in sys.modules if 'attacks' in m))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
