"""``edgeseal-provision``: every command, its outputs checked with protocol, and its bad inputs."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device import factory
from device.hardware.flash import FLASH_FILE, Flash
from device.hardware.fuses import FUSES_FILE, Fuses
from protocol import bundles, image, keys, stage
from protocol.errors import InvalidImage, InvalidSignedMessage, MalformedMessage
from protocol.ids import class_id, product
from provisioning import build, cli, files, manufacture, vendor
from provisioning.vendor import Role

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "examples" / "apps"
SCRIPT = Path(sys.executable).parent / "edgeseal-provision"
PASSPHRASE_VAR = "EDGESEAL_TEST_VENDOR_PW"


@dataclass(frozen=True)
class Gateway:
    """A test gateway: its result key and HPKE key, and their exported public PEM files."""

    result_key: ec.EllipticCurvePrivateKey
    hpke_key: x25519.X25519PrivateKey
    result_pem: Path
    hpke_pem: Path


def run(args: Sequence[str], env: dict[str, str | None] | None = None) -> Result:
    """Invoke the CLI in-process."""
    return CliRunner().invoke(cli.cli, list(args), env=env)


def one_error_line(result: Result) -> str:
    """Assert exit 2 with exactly one ``error: …`` line on stderr and no traceback."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


def _spki(key: ec.EllipticCurvePublicKey | x25519.X25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory shared by the module's read-only fixtures."""
    return tmp_path_factory.mktemp("provision")


@pytest.fixture(scope="module")
def gateway(work: Path) -> Gateway:
    """Gateway keys with their public PEM files, as ``edgeseal-gateway init`` exports them."""
    result_key = ec.generate_private_key(ec.SECP256R1())
    hpke_key = x25519.X25519PrivateKey.generate()
    (work / "result-key.pem").write_bytes(_spki(result_key.public_key()))
    (work / "hpke-key.pem").write_bytes(_spki(hpke_key.public_key()))
    return Gateway(result_key, hpke_key, work / "result-key.pem", work / "hpke-key.pem")


@pytest.fixture(scope="module")
def vendor_dir(work: Path) -> Path:
    """A plain vendor workspace made by ``vendor init``."""
    result = run(["vendor", "init", str(work / "acme")])
    assert result.exit_code == 0, result.output
    return work / "acme"


@pytest.fixture(scope="module")
def workspace(vendor_dir: Path) -> vendor.Vendor:
    """The opened vendor workspace."""
    return vendor.open_vendor(vendor_dir)


@pytest.fixture(scope="module")
def built(work: Path, vendor_dir: Path, gateway: Gateway) -> Path:
    """``firmware build`` of the thermostat example into ``work/dist``."""
    (work / "dist").mkdir()
    result = run([*_build_args(vendor_dir, gateway, work / "dist"), "--json"])
    assert result.exit_code == 0, result.output
    return work / "dist"


def _build_args(
    vendor_dir: Path, gateway: Gateway, out: Path, app: str = "thermostat"
) -> list[str]:
    return [
        "firmware",
        "build",
        str(APPS / app),
        "--vendor",
        str(vendor_dir),
        "--product",
        "thermostat",
        "--version",
        "1.2.0",
        "--security-counter",
        "3",
        "--gateway-hpke-key",
        str(gateway.hpke_pem),
        "--out",
        str(out),
    ]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --- vendor init ---------------------------------------------------------------------------------


def test_vendor_init_prints_the_signer_ids(vendor_dir: Path, workspace: vendor.Vendor) -> None:
    """``vendor init --json`` prints the three signer ids vendor.toml records."""
    result = run(["vendor", "init", str(vendor_dir.parent / "again"), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    again = vendor.open_vendor(vendor_dir.parent / "again")
    assert printed["signers"] == {str(r): again.entry(r).signer_id.hex() for r in Role}
    assert printed["encrypted"] is False
    text = run(["vendor", "init", str(vendor_dir.parent / "third")])
    third = vendor.open_vendor(vendor_dir.parent / "third")
    for role in Role:
        assert third.entry(role).signer_id.hex() in text.stdout


def test_vendor_init_refuses_an_existing_directory_without_force(tmp_path: Path) -> None:
    """A second init is exit 2 and one line; --force replaces the keys."""
    assert run(["vendor", "init", str(tmp_path / "v")]).exit_code == 0
    before = vendor.open_vendor(tmp_path / "v").firmware.signer_id
    line = one_error_line(run(["vendor", "init", str(tmp_path / "v")]))
    assert "already exists" in line and "--force" in line
    assert vendor.open_vendor(tmp_path / "v").firmware.signer_id == before
    assert run(["vendor", "init", str(tmp_path / "v"), "--force"]).exit_code == 0
    assert vendor.open_vendor(tmp_path / "v").firmware.signer_id != before
    assert "no such directory" in one_error_line(
        run(["vendor", "init", str(tmp_path / "missing" / "v")])
    )


def test_encrypted_vendor_keys_need_the_passphrase(tmp_path: Path, work: Path) -> None:
    """Encrypted keys: a wrong or missing passphrase is exit 2, one line; the right one works."""
    env: dict[str, str | None] = {PASSPHRASE_VAR: "open sesame"}
    init = run(["vendor", "init", str(tmp_path / "v"), "--passphrase-env", PASSPHRASE_VAR], env)
    assert init.exit_code == 0, init.output
    assert b"ENCRYPTED" in (tmp_path / "v" / "firmware-key.pem").read_bytes()
    revoke = ["revoke", "dev-1", "--vendor", str(tmp_path / "v"), "--out", str(tmp_path / "r")]
    wrong = one_error_line(run(revoke, {PASSPHRASE_VAR: "wrong"}))
    assert "wrong passphrase" in wrong and "ca-key.pem" in wrong
    assert "is not set" in one_error_line(run(revoke, {PASSPHRASE_VAR: None}))
    other = run([*revoke, "--passphrase-env", "EDGESEAL_TEST_OTHER"], {"EDGESEAL_TEST_OTHER": "x"})
    assert "wrong passphrase" in one_error_line(other)
    assert not (tmp_path / "r").exists()
    assert run(revoke, env).exit_code == 0
    assert "is not set" in one_error_line(
        run(["vendor", "init", str(tmp_path / "w"), "--passphrase-env", "EDGESEAL_TEST_UNSET"])
    )


# --- firmware check ------------------------------------------------------------------------------


@pytest.mark.parametrize("app", ["thermostat", "secret_filter"])
def test_example_apps_pass_firmware_check(app: str) -> None:
    """Both example apps compile for the ESP32 and list their files in JSON."""
    result = run(["firmware", "check", str(APPS / app), "--board", "esp32", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True
    paths = [f["path"] for f in report["files"]]
    assert "main.py" in paths
    assert paths == sorted(p.relative_to(APPS / app).as_posix() for p in (APPS / app).glob("*.py"))
    assert all(f["mpy_bytes"] > 0 for f in report["files"])


def test_a_syntax_error_fails_with_its_file_and_line(tmp_path: Path) -> None:
    """An app whose main.py has a syntax error on line 3 fails with ``main.py:3`` and exit 2."""
    (tmp_path / "main.py").write_text("import time\nx = 1\ndef broken(:\n    pass\n")
    line = one_error_line(run(["firmware", "check", str(tmp_path)]))
    assert "main.py:3:" in line
    as_json = run(["firmware", "check", str(tmp_path), "--json"])
    assert as_json.exit_code == 2
    report = json.loads(as_json.stdout)
    assert report["ok"] is False
    assert report["diagnostics"][0]["file"] == "main.py"
    assert report["diagnostics"][0]["line"] == 3


def test_firmware_check_refuses_a_missing_directory(tmp_path: Path) -> None:
    """A missing app directory is exit 2 and one line naming it."""
    assert "nope" in one_error_line(run(["firmware", "check", str(tmp_path / "nope")]))
    assert "--board" in one_error_line(
        run(["firmware", "check", str(APPS / "thermostat"), "--board", "avr"])
    )


# --- firmware build ------------------------------------------------------------------------------


def test_release_bundle_verifies_and_its_cek_opens_the_image(
    built: Path, workspace: vendor.Vendor, gateway: Gateway
) -> None:
    """The release verifies under the firmware key; its wrapped CEK opens the sealed image."""
    sealed = (built / "thermostat-1.2.0.sealed").read_bytes()
    release = bundles.verify_bundle(
        (built / "thermostat-1.2.0.release").read_bytes(), workspace.trusted_firmware_signers()
    )
    assert isinstance(release, bundles.ReleaseBundle)
    assert release.image == sealed
    assert release.product == "thermostat"
    parsed = image.parse_unverified_image(sealed)
    manifest = image.verify_manifest(parsed, workspace.trusted_firmware_signers())
    assert (manifest.version, manifest.security_counter) == ("1.2.0", 3)
    assert manifest.class_id == class_id(product("thermostat"))
    assert manifest.vendor_id == workspace.firmware.signer_id
    digest = image.manifest_digest(parsed)
    assert release.reference_value.measurement == digest
    cek = bundles.unwrap_release_cek(release.wrapped_cek, gateway.hpke_key, digest)
    plaintext = image.open_image(
        parsed, cek, trusted_vendors=workspace.trusted_firmware_signers(), min_security_counter=3
    )
    app = image.AppBundle.decode(plaintext)
    app_dir = APPS / "thermostat"
    assert dict(app.sources) == {p.name: p.read_bytes() for p in app_dir.glob("*.py")}
    assert sorted(dict(app.compiled)) == sorted(p.stem + ".mpy" for p in app_dir.glob("*.py"))
    assert all(mpy.startswith(b"M") for _, mpy in app.compiled)
    assert cek not in sealed and cek not in (built / "thermostat-1.2.0.release").read_bytes()


def test_release_bundle_negatives(built: Path, workspace: vendor.Vendor, gateway: Gateway) -> None:
    """A wrong signer, a flipped bit, a truncation or another gateway key is refused."""
    data = (built / "thermostat-1.2.0.release").read_bytes()
    ca_only = {workspace.ca.signer_id: workspace.public_key(Role.CA)}
    with pytest.raises(InvalidSignedMessage):
        bundles.verify_bundle(data, ca_only)
    flipped = bytearray(data)
    flipped[-10] ^= 1
    with pytest.raises(InvalidSignedMessage):
        bundles.verify_bundle(bytes(flipped), workspace.trusted_firmware_signers())
    with pytest.raises(MalformedMessage):
        bundles.verify_bundle(data[:-1], workspace.trusted_firmware_signers())
    release = bundles.verify_bundle(data, workspace.trusted_firmware_signers())
    assert isinstance(release, bundles.ReleaseBundle)
    digest = release.reference_value.measurement
    with pytest.raises(InvalidImage):
        bundles.unwrap_release_cek(release.wrapped_cek, x25519.X25519PrivateKey.generate(), digest)
    with pytest.raises(InvalidImage):
        bundles.unwrap_release_cek(release.wrapped_cek, gateway.hpke_key, bytes(32))


def test_firmware_build_refuses_existing_outputs_without_force(
    tmp_path: Path, vendor_dir: Path, gateway: Gateway
) -> None:
    """A second build into the same directory is exit 2; --force writes a fresh release."""
    args = _build_args(vendor_dir, gateway, tmp_path)
    assert run(args).exit_code == 0
    first = (tmp_path / "thermostat-1.2.0.release").read_bytes()
    assert "already exists" in one_error_line(run(args))
    assert (tmp_path / "thermostat-1.2.0.release").read_bytes() == first
    assert run([*args, "--force"]).exit_code == 0
    second = (tmp_path / "thermostat-1.2.0.sealed").read_bytes()
    assert second != first
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "thermostat-1.2.0.release",
        "thermostat-1.2.0.sealed",
    ]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("--gateway-hpke-key", "result"), "expected an X25519 public key"),
        (("--vendor", "missing"), "no such directory"),
        (("--version", "1 2"), "--version"),
        (("--product", "bad product"), "product"),
        (("--out", "missing"), "no such directory"),
        (("app", "broken"), "main.py:1:"),
    ],
)
def test_firmware_build_bad_inputs_write_nothing(
    tmp_path: Path,
    vendor_dir: Path,
    gateway: Gateway,
    change: tuple[str, str],
    expected: str,
) -> None:
    """Each bad input is exit 2 with one line naming it, and nothing is written."""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "main.py").write_text("def (:\n")
    (tmp_path / "out").mkdir()
    args = _build_args(vendor_dir, gateway, tmp_path / "out")
    option, value = change
    replacement = {
        "result": str(gateway.result_pem),
        "missing": str(tmp_path / "missing"),
        "broken": str(tmp_path / "broken"),
    }.get(value, value)
    if option == "app":
        args[2] = replacement
    else:
        args[args.index(option) + 1] = replacement
    assert expected in one_error_line(run(args))
    assert list((tmp_path / "out").iterdir()) == []


def test_firmware_build_failure_leaves_nothing_half_written(
    tmp_path: Path, vendor_dir: Path, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk failure after the image is in place removes it again: no image without release."""
    place = files._place
    calls: list[Path] = []

    def flaky(tmp: Path, path: Path, *, force: bool) -> None:
        calls.append(path)
        if path.suffix == ".release":
            raise OSError(28, "No space left on device", str(path))
        place(tmp, path, force=force)

    monkeypatch.setattr(files, "_place", flaky)
    line = one_error_line(run(_build_args(vendor_dir, gateway, tmp_path)))
    assert "No space left on device" in line
    assert [p.suffix for p in calls] == [".sealed", ".release"]
    assert list(tmp_path.iterdir()) == []


# --- image inspect / verify ----------------------------------------------------------------------


def test_image_inspect_prints_the_manifest(built: Path, vendor_dir: Path, work: Path) -> None:
    """``image inspect --json`` shows the manifest fields and, with --vendor, the signature."""
    path = built / "thermostat-1.2.0.sealed"
    parsed = image.parse_unverified_image(path.read_bytes())
    result = run(["image", "inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    fields = json.loads(result.stdout)
    assert fields["version"] == "1.2.0"
    assert fields["security_counter"] == 3
    assert fields["signer_id"] == parsed.manifest.vendor_id.hex()
    assert fields["release_id"] == image.manifest_digest(parsed).hex()
    assert fields["class_id"] == class_id(product("thermostat")).hex()
    assert fields["signature"] == "not checked"
    checked = run(["image", "inspect", str(path), "--json", "--vendor", str(vendor_dir)])
    assert json.loads(checked.stdout)["signature"] == "valid"
    other = run(["image", "inspect", str(path), "--json", "--vendor", str(work / "again")])
    assert json.loads(other.stdout)["signature"].startswith("invalid")
    text = run(["image", "inspect", str(path)])
    assert "1.2.0" in text.stdout and "not checked" in text.stdout


def test_image_verify_exit_status(
    built: Path, vendor_dir: Path, work: Path, tmp_path: Path
) -> None:
    """Exit 0 for a good image; 1 for a flipped bit, truncation, trailing bytes, another vendor."""
    path = built / "thermostat-1.2.0.sealed"
    good = path.read_bytes()
    assert run(["image", "verify", str(path), "--vendor", str(vendor_dir)]).exit_code == 0
    other = run(["image", "verify", str(path), "--vendor", str(work / "again")])
    assert other.exit_code == 1
    assert "FAILED" in other.stdout
    flipped = bytearray(good)
    flipped[-1] ^= 0x80
    header = image.parse_unverified_header(good)
    in_manifest = bytearray(good)
    in_manifest[header.ciphertext_offset - 5] ^= 1
    for bad in (bytes(flipped), bytes(in_manifest), good[:-1], good + b"\x00", b""):
        (tmp_path / "bad.sealed").write_bytes(bad)
        result = run(["image", "verify", str(tmp_path / "bad.sealed"), "--vendor", str(vendor_dir)])
        assert result.exit_code == 1, result.output
    assert "no such file" in one_error_line(
        run(["image", "verify", str(tmp_path / "none"), "--vendor", str(vendor_dir)])
    )
    assert one_error_line(run(["image", "verify", str(path), "--vendor", str(tmp_path)]))


def test_image_inspect_refuses_what_is_not_an_image(tmp_path: Path) -> None:
    """A file that is not a sealed image is exit 2 and one line."""
    (tmp_path / "x").write_bytes(b"hello")
    assert "sealed image" in one_error_line(run(["image", "inspect", str(tmp_path / "x")]))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=256))
def test_image_verify_never_crashes_on_arbitrary_bytes(data: bytes, vendor_dir: Path) -> None:
    """Arbitrary bytes make ``image verify`` exit 1, never crash."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f"
        path.write_bytes(data)
        result = run(["image", "verify", str(path), "--vendor", str(vendor_dir)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


# --- revoke --------------------------------------------------------------------------------------


def test_revoke_writes_a_revocation_signed_by_the_ca(
    tmp_path: Path, vendor_dir: Path, workspace: vendor.Vendor
) -> None:
    """The revocation bundle verifies under the CA key and lists the devices and reason."""
    out = tmp_path / "revoked.bundle"
    args = ["revoke", "dev-1", "dev-2", "dev-1", "--vendor", str(vendor_dir), "--out", str(out)]
    result = run([*args, "--reason", "stolen"])
    assert result.exit_code == 0, result.output
    trusted = {workspace.ca.signer_id: workspace.public_key(Role.CA)}
    bundle = bundles.verify_bundle(out.read_bytes(), trusted)
    assert isinstance(bundle, bundles.RevocationBundle)
    assert bundle.device_ids == ("dev-1", "dev-2")
    assert bundle.reason == "stolen"
    with pytest.raises(InvalidSignedMessage):
        bundles.verify_bundle(out.read_bytes(), workspace.trusted_firmware_signers())
    assert "already exists" in one_error_line(run(args))
    assert run([*args, "--force"]).exit_code == 0
    bad = ["revoke", "not ok", "--vendor", str(vendor_dir), "--out", str(tmp_path / "b")]
    assert "device id" in one_error_line(run(bad))
    long_reason = [*args[:-2], "--out", str(tmp_path / "c"), "--reason", "x" * 300]
    assert "reason" in one_error_line(run(long_reason))
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


# --- manufacture ---------------------------------------------------------------------------------


def _manufacture_args(vendor_dir: Path, gateway: Gateway, out: Path, count: int = 3) -> list[str]:
    return [
        "manufacture",
        "--vendor",
        str(vendor_dir),
        "--product",
        "thermostat",
        "--count",
        str(count),
        "--out",
        str(out),
        "--gateway-result-key",
        str(gateway.result_pem),
        "--flash",
        "small",
        "--runtime-version",
        "2.1.0",
        "--runtime-counter",
        "4",
        "--bl2-counter",
        "2",
    ]


@pytest.fixture(scope="module")
def fleet(work: Path, vendor_dir: Path, gateway: Gateway) -> Path:
    """Three devices manufactured with a small flash layout."""
    result = run([*_manufacture_args(vendor_dir, gateway, work / "fleet"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["devices"] == ["thermostat-0001", "thermostat-0002", "thermostat-0003"]
    assert summary["enrollment"] == str(work / "fleet" / manufacture.ENROLLMENT_FILE)
    assert [rv["component"] for rv in summary["reference_values"]] == ["BL2", "RT"]
    return work / "fleet"


def test_manufacture_makes_each_device_home(fleet: Path) -> None:
    """Each device has fuses (0600) and flash; the enrollment bundle is beside them."""
    names = sorted(p.name for p in fleet.iterdir())
    assert names == [
        manufacture.ENROLLMENT_FILE,
        "thermostat-0001",
        "thermostat-0002",
        "thermostat-0003",
    ]
    for home in sorted(fleet.glob("thermostat-*")):
        assert stat.S_IMODE((home / FUSES_FILE).stat().st_mode) == 0o600
        assert (home / FLASH_FILE).is_file()
        fuses = Fuses.in_home(home)
        assert fuses.secure_boot is True
        assert (fuses.counter("bl2"), fuses.counter("runtime")) == (2, 4)


def test_enrollment_bundle_verifies_under_the_ca_key(fleet: Path, workspace: vendor.Vendor) -> None:
    """The enrollment bundle verifies under the CA key only and lists the devices."""
    data = (fleet / manufacture.ENROLLMENT_FILE).read_bytes()
    bundle = bundles.verify_bundle(data, {workspace.ca.signer_id: workspace.public_key(Role.CA)})
    assert isinstance(bundle, bundles.EnrollmentBundle)
    assert bundle.product == "thermostat"
    assert [d.device_id for d in bundle.devices] == [f"thermostat-000{i}" for i in (1, 2, 3)]
    with pytest.raises(InvalidSignedMessage):
        bundles.verify_bundle(data, workspace.trusted_firmware_signers())
    flipped = bytearray(data)
    flipped[-3] ^= 1
    with pytest.raises(InvalidSignedMessage):
        bundles.verify_bundle(
            bytes(flipped), {workspace.ca.signer_id: workspace.public_key(Role.CA)}
        )


def test_certificates_chain_to_the_ca_and_certify_the_iaks(
    fleet: Path, workspace: vendor.Vendor
) -> None:
    """Both certificates of each device are issued by the CA over the IAKs its HUK derives."""
    bundle = bundles.parse_unverified_bundle((fleet / manufacture.ENROLLMENT_FILE).read_bytes())[1]
    assert isinstance(bundle, bundles.EnrollmentBundle)
    ca = workspace.ca_certificate()
    for device in bundle.devices:
        huk = Fuses.in_home(fleet / device.device_id).huk
        for der, cls in (
            (device.cert_secured_der, factory.SECURED_CLASS),
            (device.cert_debug_der, factory.DEBUG_CLASS),
        ):
            cert = x509.load_der_x509_certificate(der)
            cert.verify_directly_issued_by(ca)
            assert device.device_id in cert.subject.rfc4514_string()
            public = cert.public_key()
            assert isinstance(public, ec.EllipticCurvePublicKey)
            assert keys.p256_point(public) == keys.p256_point(
                keys.derive_iak(huk, cls).public_key()
            )
        assert dict(device.counters)["runtime"] == 4


def test_reference_values_equal_the_stage_measurements(
    fleet: Path, workspace: vendor.Vendor, gateway: Gateway
) -> None:
    """The enrollment's BL2 and RT reference values are the stages in each device's flash."""
    bundle = bundles.parse_unverified_bundle((fleet / manufacture.ENROLLMENT_FILE).read_bytes())[1]
    assert isinstance(bundle, bundles.EnrollmentBundle)
    references = {rv.component: rv for rv in bundle.reference_values}
    assert set(references) == {bundles.ComponentType.BL2, bundles.ComponentType.RUNTIME}
    assert references[bundles.ComponentType.RUNTIME].version == "2.1.0"
    assert references[bundles.ComponentType.RUNTIME].security_counter == 4
    for device in bundle.devices:
        flash = Flash.open(fleet / device.device_id / FLASH_FILE)
        rotpk_hash = Fuses.in_home(fleet / device.device_id).rotpk_hash
        assert rotpk_hash == workspace.rotpk.signer_id
        for partition, component in (
            ("bl2", bundles.ComponentType.BL2),
            ("runtime", bundles.ComponentType.RUNTIME),
        ):
            parsed = stage.parse_unverified_stage(flash.read_blob(partition))
            stage.verify_stage(parsed, rotpk_hash)
            assert stage.stage_measurement(parsed) == references[component].measurement
            assert stage.stage_signer_id(parsed) == references[component].signer_id
        runtime = stage.parse_unverified_stage(flash.read_blob("runtime")).stage
        assert runtime.trust_anchors == stage.TrustAnchors(
            vendor_signer_ids=(workspace.firmware.signer_id,),
            gateway_result_key=keys.p256_point(gateway.result_key.public_key()),
        )


def test_the_huk_stays_in_the_fuses_file(fleet: Path) -> None:
    """No file but the device's own fuses.bin holds its HUK; every HUK differs."""
    huks = {home.name: Fuses.in_home(home).huk for home in fleet.glob("thermostat-*")}
    assert len(set(huks.values())) == 3
    for path in fleet.rglob("*"):
        if path.is_file() and path.name != FUSES_FILE:
            data = path.read_bytes()
            assert not any(huk in data for huk in huks.values()), path


def test_manufacture_secure_boot_off_and_prefix(
    tmp_path: Path, vendor_dir: Path, gateway: Gateway
) -> None:
    """``--secure-boot off`` leaves the fuse off; ``--prefix`` names the devices."""
    args = _manufacture_args(vendor_dir, gateway, tmp_path / "out", count=1)
    result = run([*args, "--secure-boot", "off", "--prefix", "lab"])
    assert result.exit_code == 0, result.output
    assert Fuses.in_home(tmp_path / "out" / "lab-0001").secure_boot is False


def test_manufacture_refuses_an_existing_output_without_force(
    tmp_path: Path, vendor_dir: Path, gateway: Gateway
) -> None:
    """A non-empty --out is exit 2; --force replaces the whole batch."""
    args = _manufacture_args(vendor_dir, gateway, tmp_path / "out", count=1)
    assert run(args).exit_code == 0
    huk = Fuses.in_home(tmp_path / "out" / "thermostat-0001").huk
    assert "already exists" in one_error_line(run(args))
    assert Fuses.in_home(tmp_path / "out" / "thermostat-0001").huk == huk
    assert run([*args, "--force"]).exit_code == 0
    assert Fuses.in_home(tmp_path / "out" / "thermostat-0001").huk != huk
    assert _leftovers(tmp_path) == []


def test_manufacture_failure_leaves_nothing(
    tmp_path: Path, vendor_dir: Path, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure at the second device leaves no output directory and no staging directory."""
    real = factory.manufacture
    made: list[str] = []

    def failing(home: Path, **kwargs: object) -> factory.ManufacturedDevice:
        if home.name == "thermostat-0002":
            raise OSError(28, "No space left on device")
        made.append(home.name)
        return real(home, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(factory, "manufacture", failing)
    args = _manufacture_args(vendor_dir, gateway, tmp_path / "out", count=6)
    line = one_error_line(run(args))
    assert "No space left" in line
    assert "thermostat-0001" in made
    assert list(tmp_path.iterdir()) == []


def test_manufacture_batch_failure_with_one_worker(
    tmp_path: Path, workspace: vendor.Vendor, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one worker, a failure at the second device stops the batch and nothing remains."""
    real = factory.manufacture
    made: list[str] = []

    def failing(home: Path, **kwargs: object) -> factory.ManufacturedDevice:
        made.append(home.name)
        if len(made) == 2:
            raise OSError(5, "Input/output error")
        return real(home, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(factory, "manufacture", failing)
    spec = manufacture.BatchSpec(
        product("thermostat"), 5, "unit", flash=manufacture.FlashSize.SMALL
    )
    factory_keys = manufacture.FactoryKeys(
        ca_key=workspace.private_key(Role.CA, None),
        ca_cert=workspace.ca_certificate(),
        rotpk=workspace.private_key(Role.ROTPK, None),
        now=workspace.ca_certificate().not_valid_before_utc,
    )
    anchors = stage.TrustAnchors(
        (workspace.firmware.signer_id,), keys.p256_point(gateway.result_key.public_key())
    )
    with pytest.raises(OSError, match="Input/output"):
        manufacture.manufacture_batch(
            tmp_path / "out",
            spec,
            keys=factory_keys,
            anchors=anchors,
            created_s=0,
            random=os.urandom,
            workers=1,
        )
    assert made[:2] == ["unit-0001", "unit-0002"]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="workers"):
        manufacture.manufacture_batch(
            tmp_path / "out",
            spec,
            keys=factory_keys,
            anchors=anchors,
            created_s=0,
            random=os.urandom,
            workers=0,
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--vendor", "missing", "no such directory"),
        ("--gateway-result-key", "hpke", "expected an ECDSA P-256 public key"),
        ("--gateway-result-key", "missing", "no such file"),
        ("--count", "0", "--count"),
        ("--product", "no/slash", "product"),
        ("--runtime-version", "", "--runtime-version"),
        ("--out", "nested", "no such directory"),
    ],
)
def test_manufacture_bad_inputs(
    tmp_path: Path,
    vendor_dir: Path,
    gateway: Gateway,
    option: str,
    value: str,
    expected: str,
) -> None:
    """Each bad input is exit 2 with one line naming it, and nothing is made."""
    args = _manufacture_args(vendor_dir, gateway, tmp_path / "out")
    replacement = {
        "missing": str(tmp_path / "missing"),
        "hpke": str(gateway.hpke_pem),
        "nested": str(tmp_path / "a" / "b"),
    }.get(value, value)
    args[args.index(option) + 1] = replacement
    assert expected in one_error_line(run(args))
    assert list(tmp_path.iterdir()) == []


def test_manufacture_refuses_an_invalid_prefix(
    tmp_path: Path, vendor_dir: Path, gateway: Gateway
) -> None:
    """A prefix that makes invalid device ids is refused before anything is made."""
    args = [*_manufacture_args(vendor_dir, gateway, tmp_path / "out"), "--prefix", "x" * 70]
    assert "device id" in one_error_line(run(args))
    assert list(tmp_path.iterdir()) == []


# --- the console script --------------------------------------------------------------------------


def _script(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESEAL_TEST")}
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60
    )


def test_console_script_end_to_end(tmp_path: Path, gateway: Gateway) -> None:
    """The installed script inits a vendor, builds, verifies, and reports mistakes in one line."""
    assert SCRIPT.is_file(), f"{SCRIPT} missing: pip install -e ."
    assert _script("vendor", "init", "v", cwd=tmp_path).returncode == 0
    build = _script(*_build_args(tmp_path / "v", gateway, tmp_path)[:-2], cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    assert (tmp_path / "thermostat-1.2.0.sealed").is_file()
    verify = _script("image", "verify", "thermostat-1.2.0.sealed", "--vendor", "v", cwd=tmp_path)
    assert verify.returncode == 0, verify.stderr
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.py").write_text("x = (\n")
    check = _script("firmware", "check", "app", cwd=tmp_path)
    assert check.returncode == 2
    assert check.stderr.startswith("error: ") and check.stderr.count("\n") == 1
    assert "main.py:" in check.stderr and "Traceback" not in check.stderr
    again = _script("vendor", "init", "v", cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.count("\n") == 1


def test_python_m_provisioning_runs_the_cli(tmp_path: Path) -> None:
    """``python -m provisioning --help`` lists the commands."""
    done = subprocess.run(
        [sys.executable, "-m", "provisioning", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for command in ("vendor", "manufacture", "firmware", "image", "revoke"):
        assert command in done.stdout


def test_typecheck_without_stubs_is_one_line(tmp_path: Path) -> None:
    """``--typecheck`` with no MicroPython stubs installed is exit 2 naming the fix."""
    env: dict[str, str | None] = {"EDGESEAL_MPY_STUBS": str(tmp_path)}
    result = run(["firmware", "check", str(APPS / "thermostat"), "--typecheck"], env)
    line = one_error_line(result)
    assert "stubs" in line or "pyright" in line


def test_a_vendor_key_of_the_wrong_type_is_one_line(
    tmp_path: Path, vendor_dir: Path, gateway: Gateway
) -> None:
    """A firmware key file holding an Ed25519 key makes ``firmware build`` exit 2, one line."""
    copy = tmp_path / "vendor"
    copy.mkdir()
    for path in vendor_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "firmware-key.pem").write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "out").mkdir()
    line = one_error_line(run(_build_args(copy, gateway, tmp_path / "out")))
    assert "expected an ECDSA P-256 private key" in line and "Ed25519" in line
    assert list((tmp_path / "out").iterdir()) == []


def test_seal_release_takes_cek_and_iv_from_the_rng(
    workspace: vendor.Vendor, gateway: Gateway, rng: random.Random
) -> None:
    """The CEK, IV and key id come from the RNG given; that CEK opens the image, no other does."""
    drawn: list[bytes] = []

    def randomness(size: int) -> bytes:
        drawn.append(rng.randbytes(size))
        return drawn[-1]

    bundle = image.AppBundle(sources=(("main.py", b"print('hi')\n"),))
    spec = build.ReleaseSpec(product("thermostat"), "0.1.0", 0)
    key = workspace.private_key(Role.FIRMWARE, None)
    built = build.seal_release(
        bundle,
        spec,
        firmware_key=key,
        gateway_hpke_key=gateway.hpke_key.public_key(),
        created_s=1_800_000_000,
        random=randomness,
    )
    cek, iv, key_id = drawn
    assert (built.manifest.iv, built.manifest.key_id) == (iv, key_id)
    assert built.manifest.created_s == 1_800_000_000
    parsed = image.parse_unverified_image(built.image)
    assert image.manifest_digest(parsed) == built.manifest_digest
    trusted = workspace.trusted_firmware_signers()
    opened = image.open_image(parsed, cek, trusted_vendors=trusted, min_security_counter=0)
    assert image.AppBundle.decode(opened) == bundle
    with pytest.raises(InvalidImage):
        image.open_image(parsed, bytes(32), trusted_vendors=trusted, min_security_counter=0)
    release = bundles.verify_bundle(built.release, trusted)
    assert isinstance(release, bundles.ReleaseBundle)
    unwrapped = bundles.unwrap_release_cek(
        release.wrapped_cek, gateway.hpke_key, built.manifest_digest
    )
    assert unwrapped == cek
