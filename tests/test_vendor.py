"""The vendor workspace (provisioning.vendor) and atomic outputs (provisioning.files)."""

from __future__ import annotations

import datetime
import os
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import keys
from protocol.errors import UsageError
from provisioning import files, vendor
from provisioning.vendor import Role

NOW = datetime.datetime(2027, 1, 1, tzinfo=datetime.UTC)


def _spki(key: ec.EllipticCurvePublicKey | x25519.X25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _pkcs8(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> vendor.Vendor:
    """An unencrypted workspace shared by the read-only tests."""
    return vendor.init_vendor(tmp_path_factory.mktemp("v") / "acme", now=NOW)


# --- vendor init ---------------------------------------------------------------------------------


def test_init_writes_private_keys_0600_and_public_files_0644(plain: vendor.Vendor) -> None:
    """Private keys are mode 0600, public files 0644, the directory 0700."""
    assert stat.S_IMODE(plain.directory.stat().st_mode) == 0o700
    for role in Role:
        entry = plain.entry(role)
        assert stat.S_IMODE(entry.key_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(entry.public_path.stat().st_mode) == 0o644
        assert entry.key_path.parent == plain.directory


def test_vendor_toml_names_the_files_and_their_signer_ids(plain: vendor.Vendor) -> None:
    """tomllib reads vendor.toml; each table's signer id is SHA-256 of its key's SEC1 point."""
    document = tomllib.loads((plain.directory / vendor.VENDOR_TOML).read_text())
    assert document["format"] == 1
    assert document["encrypted"] is False
    assert document["name"] == "acme"
    for role in Role:
        table = document[str(role)]
        key = plain.private_key(role, None)
        assert (plain.directory / table["key"]).is_file()
        assert table["signer_id"] == keys.signer_id(key.public_key()).hex()
        assert isinstance(key.curve, ec.SECP256R1)
    assert document["ca"]["certificate"] == "ca-cert.pem"
    assert document["firmware"]["public_key"] == "firmware.pem"


def test_three_keys_are_distinct(plain: vendor.Vendor) -> None:
    """The CA, ROTPK and firmware keys are three different keys."""
    assert len({plain.entry(role).signer_id for role in Role}) == 3


def test_ca_certificate_is_a_self_signed_p256_ca(plain: vendor.Vendor) -> None:
    """The CA certificate is self-signed (verifies under itself), P-256, CA:TRUE pathlen 0."""
    cert = plain.ca_certificate()
    cert.verify_directly_issued_by(cert)
    assert cert.subject == cert.issuer
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is True
    assert constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert keys.signer_id(public) == plain.ca.signer_id
    assert cert.not_valid_before_utc <= NOW < cert.not_valid_after_utc
    assert "acme" in cert.subject.rfc4514_string()


def test_public_keys_match_private_keys(plain: vendor.Vendor) -> None:
    """Each public file holds the public half of its private key."""
    for role in Role:
        public = plain.public_key(role)
        assert keys.p256_point(public) == keys.p256_point(
            plain.private_key(role, None).public_key()
        )
    assert set(plain.trusted_firmware_signers()) == {plain.firmware.signer_id}


def test_encrypted_keys_need_the_right_passphrase(tmp_path: Path) -> None:
    """Encrypted keys refuse a missing or wrong passphrase and open with the right one."""
    workspace = vendor.init_vendor(
        tmp_path / "enc", now=NOW, passphrase=b"correct horse", passphrase_env="VENDOR_PW"
    )
    assert workspace.encrypted
    assert workspace.passphrase_env == "VENDOR_PW"
    assert b"ENCRYPTED PRIVATE KEY" in workspace.firmware.key_path.read_bytes()
    with pytest.raises(vendor.PassphraseRequired):
        workspace.private_key(Role.FIRMWARE, None)
    with pytest.raises(vendor.WrongPassphrase):
        workspace.private_key(Role.FIRMWARE, b"wrong horse")
    key = workspace.private_key(Role.FIRMWARE, b"correct horse")
    assert keys.signer_id(key.public_key()) == workspace.firmware.signer_id
    assert workspace.public_key(Role.FIRMWARE) is not None  # public files are not encrypted


def test_init_refuses_an_existing_workspace_without_force(tmp_path: Path) -> None:
    """A second init into a non-empty directory is refused; --force replaces every key."""
    first = vendor.init_vendor(tmp_path / "v", now=NOW)
    with pytest.raises(files.OutputExists):
        vendor.init_vendor(tmp_path / "v", now=NOW)
    assert vendor.open_vendor(tmp_path / "v").firmware == first.firmware
    second = vendor.init_vendor(tmp_path / "v", now=NOW, force=True)
    assert second.firmware.signer_id != first.firmware.signer_id
    assert _leftovers(tmp_path) == []


def test_init_accepts_an_existing_empty_directory(tmp_path: Path) -> None:
    """An empty directory is filled without --force."""
    (tmp_path / "empty").mkdir()
    workspace = vendor.init_vendor(tmp_path / "empty", now=NOW)
    assert (workspace.directory / vendor.VENDOR_TOML).is_file()


def test_init_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing the workspace leaves neither the directory nor staging files."""

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "_place", fail)
    with pytest.raises(OSError, match="No space"):
        vendor.init_vendor(tmp_path / "v", now=NOW)
    assert list(tmp_path.iterdir()) == []


def test_init_rejects_bad_names_and_passphrases(tmp_path: Path) -> None:
    """A name outside the alphabet, an empty passphrase or a bad variable name is refused."""
    with pytest.raises(UsageError, match="vendor name"):
        vendor.init_vendor(tmp_path / "v", now=NOW, name='a"b')
    with pytest.raises(UsageError, match="passphrase"):
        vendor.init_vendor(tmp_path / "v", now=NOW, passphrase=b"")
    with pytest.raises(UsageError, match="environment variable"):
        vendor.init_vendor(tmp_path / "v", now=NOW, passphrase=b"x", passphrase_env="1-BAD")
    with pytest.raises(files.OutputError):
        vendor.init_vendor(tmp_path / "missing" / "v", now=NOW)
    assert list(tmp_path.iterdir()) == []


# --- opening a workspace -------------------------------------------------------------------------


def test_open_vendor_refuses_a_missing_directory_or_toml(tmp_path: Path) -> None:
    """No directory, no vendor.toml, or bad TOML is a VendorError naming the path."""
    with pytest.raises(vendor.VendorError, match="no such directory"):
        vendor.open_vendor(tmp_path / "nope")
    with pytest.raises(vendor.VendorError, match=r"vendor\.toml: no such file"):
        vendor.open_vendor(tmp_path)
    (tmp_path / "vendor.toml").write_text("format = [")
    with pytest.raises(vendor.VendorError, match="not valid TOML"):
        vendor.open_vendor(tmp_path)
    (tmp_path / "vendor.toml").write_text("format = 2\n")
    with pytest.raises(vendor.VendorError, match="format = 1"):
        vendor.open_vendor(tmp_path)


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ('signer_id = "', 'signer_id = "zz', "64 hex digits"),
        ("[firmware]", "[firmwar]", r"missing the \[firmware\] table"),
        ('key = "ca-key.pem"', "key = 3", "needs key"),
        ("encrypted = false", 'encrypted = "no"', "encrypted"),
    ],
)
def test_open_vendor_refuses_a_malformed_toml(
    plain: vendor.Vendor, tmp_path: Path, old: str, new: str, match: str
) -> None:
    """Each malformed field of vendor.toml is named in the error."""
    text = (plain.directory / vendor.VENDOR_TOML).read_text()
    assert old in text
    (tmp_path / vendor.VENDOR_TOML).write_text(text.replace(old, new, 1))
    with pytest.raises(vendor.VendorError, match=match):
        vendor.open_vendor(tmp_path)


def _copy(workspace: vendor.Vendor, target: Path) -> vendor.Vendor:
    target.mkdir()
    for path in workspace.directory.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return vendor.open_vendor(target)


def test_a_swapped_key_is_refused(plain: vendor.Vendor, tmp_path: Path) -> None:
    """A key file that is not the one whose signer id vendor.toml records is refused."""
    copy = _copy(plain, tmp_path / "copy")
    other = ec.generate_private_key(ec.SECP256R1())
    copy.firmware.public_path.write_bytes(_spki(other.public_key()))
    copy.firmware.key_path.write_bytes(_pkcs8(other))
    with pytest.raises(vendor.VendorError, match="signer_id"):
        copy.public_key(Role.FIRMWARE)
    with pytest.raises(vendor.VendorError, match="signer_id"):
        copy.private_key(Role.FIRMWARE, None)


def test_a_wrong_key_type_is_refused(plain: vendor.Vendor, tmp_path: Path) -> None:
    """An Ed25519 or P-384 key where a P-256 key belongs is a WrongKeyType naming both."""
    copy = _copy(plain, tmp_path / "copy")
    copy.rotpk.key_path.write_bytes(_pkcs8(ed25519.Ed25519PrivateKey.generate()))
    with pytest.raises(vendor.WrongKeyType, match="expected an ECDSA P-256 private key"):
        copy.private_key(Role.ROTPK, None)
    copy.rotpk.key_path.write_bytes(_pkcs8(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(vendor.WrongKeyType, match="secp384r1"):
        copy.private_key(Role.ROTPK, None)
    copy.ca.key_path.write_bytes(b"not a key")
    with pytest.raises(vendor.VendorError, match="not a PEM private key"):
        copy.private_key(Role.CA, None)
    copy.ca.public_path.write_bytes(b"not a certificate")
    with pytest.raises(vendor.VendorError, match=r"not a PEM X\.509 certificate"):
        copy.ca_certificate()
    copy.firmware.public_path.unlink()
    with pytest.raises(UsageError, match="no such file"):
        copy.public_key(Role.FIRMWARE)


# --- keys given on the command line --------------------------------------------------------------


def test_gateway_key_loaders_check_the_key_type(tmp_path: Path) -> None:
    """The result key must be P-256 and the HPKE key X25519; each refuses the other."""
    result = ec.generate_private_key(ec.SECP256R1()).public_key()
    hpke = x25519.X25519PrivateKey.generate().public_key()
    (tmp_path / "result.pem").write_bytes(_spki(result))
    (tmp_path / "hpke.pem").write_bytes(_spki(hpke))
    (tmp_path / "junk.pem").write_bytes(b"-----BEGIN PUBLIC KEY-----\nAAAA\n")
    assert keys.p256_point(vendor.load_p256_public(tmp_path / "result.pem")) == keys.p256_point(
        result
    )
    assert keys.x25519_raw(vendor.load_x25519_public(tmp_path / "hpke.pem")) == keys.x25519_raw(
        hpke
    )
    with pytest.raises(vendor.WrongKeyType, match="expected an X25519 public key"):
        vendor.load_x25519_public(tmp_path / "result.pem")
    with pytest.raises(vendor.WrongKeyType, match="expected an ECDSA P-256 public key"):
        vendor.load_p256_public(tmp_path / "hpke.pem")
    with pytest.raises(vendor.WrongKeyType, match="not a PEM public key"):
        vendor.load_p256_public(tmp_path / "junk.pem")
    with pytest.raises(UsageError, match="no such file"):
        vendor.load_x25519_public(tmp_path / "absent.pem")


# --- atomic files --------------------------------------------------------------------------------


def test_write_file_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    """An existing file is kept unless force is given; then it is replaced."""
    path = tmp_path / "out.bin"
    files.write_file(path, b"one")
    with pytest.raises(files.OutputExists):
        files.write_file(path, b"two")
    assert path.read_bytes() == b"one"
    files.write_file(path, b"two", force=True)
    assert path.read_bytes() == b"two"
    assert _leftovers(tmp_path) == []


def test_write_file_modes_ignore_the_umask(tmp_path: Path) -> None:
    """Secrets are 0600 and public files 0644 whatever the umask."""
    old = os.umask(0o077)
    try:
        files.write_file(tmp_path / "public", b"p")
    finally:
        os.umask(old)
    files.write_file(tmp_path / "secret", b"s", secret=True)
    assert stat.S_IMODE((tmp_path / "public").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600


def test_write_file_refuses_missing_directories_and_directories(tmp_path: Path) -> None:
    """A missing parent or a directory in the way is an OutputError."""
    with pytest.raises(files.OutputError, match="no such directory"):
        files.write_file(tmp_path / "no" / "file", b"x")
    (tmp_path / "d").mkdir()
    with pytest.raises(files.OutputError, match="is a directory"):
        files.write_file(tmp_path / "d", b"x", force=True)


def test_write_files_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the second rename fails, the first file is removed again and no temporary remains."""
    calls: list[Path] = []
    place = files._place

    def flaky(tmp: Path, path: Path, *, force: bool) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        place(tmp, path, force=force)

    monkeypatch.setattr(files, "_place", flaky)
    outputs = [files.OutputFile(tmp_path / "a", b"a"), files.OutputFile(tmp_path / "b", b"b")]
    with pytest.raises(OSError, match="Input/output"):
        files.write_files(outputs)
    assert list(tmp_path.iterdir()) == []


def test_write_files_checks_every_output_before_writing(tmp_path: Path) -> None:
    """One existing output refuses the whole set before anything is written."""
    (tmp_path / "b").write_bytes(b"old")
    outputs = [files.OutputFile(tmp_path / "a", b"a"), files.OutputFile(tmp_path / "b", b"b")]
    with pytest.raises(files.OutputExists):
        files.write_files(outputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    with pytest.raises(files.OutputError, match="twice"):
        files.write_files([outputs[0], outputs[0]])


def test_staged_directory_is_renamed_into_place_only_on_success(tmp_path: Path) -> None:
    """The body's files appear at the target on success; on an exception nothing appears."""
    target = tmp_path / "out"

    def half_written() -> None:
        with files.staged_directory(target) as staging:
            (staging / "half").write_bytes(b"x")
            raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        half_written()
    assert list(tmp_path.iterdir()) == []
    with files.staged_directory(target) as staging:
        (staging / "whole").write_bytes(b"x")
    assert [p.name for p in target.iterdir()] == ["whole"]
    with pytest.raises(files.OutputExists), files.staged_directory(target):
        pass
    with files.staged_directory(target, force=True) as staging:
        (staging / "new").write_bytes(b"y")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert _leftovers(tmp_path) == []
    (tmp_path / "file").write_bytes(b"")
    with (
        pytest.raises(files.OutputError, match="not a directory"),
        files.staged_directory(tmp_path / "file", force=True),
    ):
        pass


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=4096), secret=st.booleans())
def test_write_file_round_trips(data: bytes, secret: bool) -> None:
    """Whatever bytes are written atomically are read back unchanged."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f"
        files.write_file(path, data, secret=secret)
        assert path.read_bytes() == data
        assert os.listdir(tmp) == ["f"]
