"""The factory: boot stages, fuses, flash, certificates and reference values (DESIGN §3–§5)."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature as CryptoInvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device import factory
from device.hardware.flash import Flash
from device.hardware.fuses import Fuses, Lifecycle
from device.hardware.slots import SlotStore
from protocol import keys
from protocol.bundles import ComponentType
from protocol.errors import InvalidImage
from protocol.stage import (
    StageKind,
    TrustAnchors,
    parse_unverified_stage,
    stage_measurement,
    verify_stage,
)

NOW = datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC)


def _ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "factory test CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


CA_KEY, CA_CERT = _ca()
ROTPK = ec.generate_private_key(ec.SECP256R1())
ANCHORS = TrustAnchors(
    vendor_signer_ids=(bytes(range(32)),),
    gateway_result_key=keys.p256_point(ec.generate_private_key(ec.SECP256R1()).public_key()),
)
HUK = bytes(range(100, 132))


def make(home: Path, **overrides: object) -> factory.ManufacturedDevice:
    """Manufacture a test board with a small flash."""
    args: dict[str, object] = {
        "device_id": "fab-1",
        "product": "thermostat",
        "huk": HUK,
        "ca_key": CA_KEY,
        "ca_cert": CA_CERT,
        "rotpk": ROTPK,
        "secure_boot": True,
        "anchors": ANCHORS,
        "layout": factory.small_layout(),
        "now": NOW,
        "runtime_counter": 3,
    }
    args.update(overrides)
    return factory.manufacture(home, **args)  # type: ignore[arg-type]


def test_manufacture_burns_the_fuses(tmp_path: Path) -> None:
    """The HUK, the ROTPK hash, secure boot, SECURED and the initial counters are burned."""
    device = make(tmp_path, counters={"app": 4})
    fuses = Fuses.in_home(tmp_path)
    assert fuses.huk == HUK
    assert fuses.rotpk_hash == keys.signer_id(ROTPK.public_key())
    assert fuses.secure_boot and fuses.lifecycle == Lifecycle.SECURED
    assert dict(fuses.map.counters) == {
        "bl2": 1,
        "runtime": 3,
        "app": 4,
        "offline_boots": 0,
        "command_seq": 0,
        "boots": 0,
    }
    assert dict(device.counters) == {
        "bl2": 1,
        "runtime": 3,
        "app": 4,
        "offline_boots": 0,
        "command_seq": 0,
    }
    assert (fuses.map.device_id, fuses.map.product) == ("fab-1", "thermostat")


def test_public_files_hold_no_secret(tmp_path: Path) -> None:
    """device.json says only the id and product; the flash holds neither the HUK nor an IAK."""
    make(tmp_path)
    assert json.loads((tmp_path / "device.json").read_text()) == {
        "device_id": "fab-1",
        "product": "thermostat",
    }
    flash = (tmp_path / "flash.bin").read_bytes()
    iak = keys.derive_iak(HUK, Lifecycle.SECURED >> 8).private_numbers().private_value
    for secret in (HUK, iak.to_bytes(32, "big")):
        assert secret not in flash
        assert secret.hex().encode() not in (tmp_path / "device.json").read_bytes()


@pytest.mark.parametrize(
    ("which", "lifecycle", "debug"),
    [(0, Lifecycle.SECURED, False), (1, Lifecycle.NON_PSA_ROT_DEBUG, True)],
)
def test_certificates_certify_each_iak_class(
    tmp_path: Path, which: int, lifecycle: int, debug: bool
) -> None:
    """Each certificate is signed by the CA over the IAK of its class, CN = device id."""
    device = make(tmp_path)
    der = (device.cert_secured_der, device.cert_debug_der)[which]
    cert = x509.load_der_x509_certificate(der)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    CA_KEY.public_key().verify(
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256())
    )
    assert cert.issuer == CA_CERT.subject
    assert keys.p256_point(public) == keys.p256_point(factory.iak_public(HUK, lifecycle >> 8))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "fab-1"
    units = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    assert units == (["debug"] if debug else [])
    assert factory.read_certificates(tmp_path)[which] == der


def test_certificates_fail_under_another_ca(tmp_path: Path) -> None:
    """A certificate does not verify under a CA that did not sign it."""
    device = make(tmp_path)
    cert = x509.load_der_x509_certificate(device.cert_secured_der)
    other, _ = _ca()
    with pytest.raises(CryptoInvalidSignature):
        other.public_key().verify(
            cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256())
        )


def test_reference_values_match_the_flashed_stages(tmp_path: Path) -> None:
    """The BL2 and RT reference values are the measurements of the stages in flash."""
    device = make(tmp_path)
    flash = Flash.open(tmp_path / "flash.bin")
    expected = {ComponentType.BL2: "bl2", ComponentType.RUNTIME: "runtime"}
    assert [r.component for r in device.reference_values] == list(expected)
    for ref in device.reference_values:
        parsed = parse_unverified_stage(flash.read_blob(expected[ref.component]))
        assert ref.measurement == stage_measurement(parsed)
        assert ref.signer_id == keys.signer_id(ROTPK.public_key())
        verify_stage(parsed, keys.signer_id(ROTPK.public_key()))
    runtime = device.reference_values[1]
    assert (runtime.version, runtime.security_counter) == ("1.0.0", 3)


def test_runtime_stage_carries_the_anchors_and_custom_code_changes_the_measurement() -> None:
    """A custom runtime claims the same version but measures differently."""
    standard = factory.build_runtime("1.0.0", 1, ANCHORS, ROTPK)
    custom = factory.build_runtime("1.0.0", 1, ANCHORS, ROTPK, code="pass\n")
    parsed = parse_unverified_stage(standard.image)
    assert parsed.stage.trust_anchors == ANCHORS
    assert b"run_enclave(BOOT, STAGE)" in parsed.stage.code
    assert parse_unverified_stage(custom.image).stage.code == b"pass\n"
    assert standard.reference.version == custom.reference.version
    assert standard.reference.measurement != custom.reference.measurement


def test_unsigned_stages_carry_a_zero_signer_and_do_not_verify() -> None:
    """Stages built without a ROTPK are unsigned: signer id zero, refused by verify_stage."""
    bl2 = factory.build_bl2("1.0.0", 1, None)
    assert bl2.reference.signer_id == bytes(32)
    parsed = parse_unverified_stage(bl2.image)
    assert parsed.stage.kind is StageKind.BL2 and b'BOOT.execute("RT")' in parsed.stage.code
    with pytest.raises(InvalidImage):
        verify_stage(parsed, keys.signer_id(ROTPK.public_key()))


def test_flipped_bit_in_a_stage_fails_verification() -> None:
    """A stage image with one flipped payload bit no longer verifies against the ROTPK."""
    image = bytearray(factory.build_bl2("1.0.0", 1, ROTPK).image)
    image[40] ^= 0x01
    with pytest.raises((InvalidImage, ValueError)):
        verify_stage(parse_unverified_stage(bytes(image)), keys.signer_id(ROTPK.public_key()))


def test_manufacture_refuses_what_the_silicon_cannot_do(tmp_path: Path) -> None:
    """A second manufacture, secure boot without a ROTPK, or the reserved counter are refused."""
    make(tmp_path / "a")
    with pytest.raises(factory.FactoryError):
        make(tmp_path / "a")
    with pytest.raises(factory.FactoryError):
        make(tmp_path / "b", rotpk=None)
    with pytest.raises(factory.FactoryError):
        make(tmp_path / "c", counters={"boots": 1})


def test_development_board_without_rotpk(tmp_path: Path) -> None:
    """Without a ROTPK and secure boot, stages are unsigned and no ROTPK hash is burned."""
    device = make(tmp_path, rotpk=None, secure_boot=False)
    assert Fuses.in_home(tmp_path).map.rotpk_hash is None
    assert all(ref.signer_id == bytes(32) for ref in device.reference_values)


def test_install_image_makes_it_the_confirmed_primary(tmp_path: Path) -> None:
    """An installed image is what the slot store boots, byte for byte."""
    make(tmp_path)
    image = os.urandom(5000)
    slot = factory.install_image(tmp_path, image)
    slots = SlotStore(Flash.open(tmp_path / "flash.bin"))
    assert slots.active() == slot
    assert slots.read_image(slot) == image
    choice = slots.boot_select()
    assert choice is not None and (choice.slot, choice.trial) == (slot, False)


def test_enrolled_entry_carries_the_certificates_and_counters(tmp_path: Path) -> None:
    """The enrollment entry is the device's id, both certificates and its initial counters."""
    device = make(tmp_path)
    enrolled = device.enrolled()
    assert enrolled.device_id == "fab-1"
    assert (enrolled.cert_secured_der, enrolled.cert_debug_der) == (
        device.cert_secured_der,
        device.cert_debug_der,
    )
    assert dict(enrolled.counters)["runtime"] == 3
    assert len(device.implementation_id) == 32
    assert (
        device.implementation_id
        == hashlib.sha256(b"edgeseal/implementation/simulated-rot/v1").digest()
    )
