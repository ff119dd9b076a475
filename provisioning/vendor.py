"""The vendor workspace: the manufacturer CA, the boot-stage key (ROTPK), the firmware key (§4).

``vendor init DIR`` makes a directory holding::

    vendor.toml         names the files below and records each key's signer id (hex)
    ca-key.pem          manufacturer CA private key, P-256, PKCS#8, mode 0600
    ca-cert.pem         manufacturer CA certificate: X.509 v3, self-signed, CA:TRUE pathlen 0
    rotpk-key.pem       boot-stage signing key (ROTPK), P-256, PKCS#8, mode 0600
    rotpk.pem           its public key (SubjectPublicKeyInfo)
    firmware-key.pem    firmware (manifest) signing key, P-256, PKCS#8, mode 0600
    firmware.pem        its public key (SubjectPublicKeyInfo)

Private keys are encrypted with ``BestAvailableEncryption`` when a passphrase is given; then
``vendor.toml`` says ``encrypted = true`` and names the environment variable the passphrase was
read from, as the default for later commands. A signer id is SHA-256 of the SEC1 point (§4); every
key loaded is checked against the id recorded for it. The CA key signs device certificates,
enrollment and revocation bundles; the ROTPK signs boot stages; the firmware key signs manifests
and release bundles.
"""

from __future__ import annotations

import datetime
import hmac
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import NameOID

from protocol import keys
from protocol.errors import UsageError
from provisioning import files

VENDOR_TOML: Final = "vendor.toml"
VENDOR_FORMAT: Final = 1
CA_VALIDITY: Final = datetime.timedelta(days=20 * 365)
#: Backdating of notBefore, so a certificate is valid on a board whose clock is a little behind.
CLOCK_SKEW: Final = datetime.timedelta(minutes=5)
MAX_PASSPHRASE_BYTES: Final = 1023
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class Role(StrEnum):
    """A key of the vendor workspace; the value is its table in ``vendor.toml``."""

    CA = "ca"
    ROTPK = "rotpk"
    FIRMWARE = "firmware"


_FILES: Final[Mapping[Role, tuple[str, str]]] = {
    Role.CA: ("ca-key.pem", "ca-cert.pem"),
    Role.ROTPK: ("rotpk-key.pem", "rotpk.pem"),
    Role.FIRMWARE: ("firmware-key.pem", "firmware.pem"),
}


class VendorError(UsageError):
    """The vendor workspace is missing, malformed or inconsistent; the message names the file."""


class PassphraseRequired(VendorError):
    """A vendor private key is encrypted and no passphrase was given."""


class WrongPassphrase(VendorError):
    """The passphrase does not decrypt a vendor private key."""


class WrongKeyType(VendorError):
    """A key file holds another kind of key than the one expected (e.g. RSA for P-256)."""


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One key of the workspace: its private key file, its public file and its signer id."""

    role: Role
    key_path: Path
    public_path: Path
    signer_id: bytes


@dataclass(frozen=True, slots=True)
class Vendor:
    """An opened vendor workspace. Keys are read from disk only when asked for."""

    directory: Path
    name: str
    encrypted: bool
    passphrase_env: str | None
    ca: KeyEntry
    rotpk: KeyEntry
    firmware: KeyEntry

    def entry(self, role: Role) -> KeyEntry:
        """The entry of ``role``."""
        return {Role.CA: self.ca, Role.ROTPK: self.rotpk, Role.FIRMWARE: self.firmware}[role]

    def ca_certificate(self) -> x509.Certificate:
        """The manufacturer CA certificate.

        Raises:
            VendorError: missing, not a PEM certificate, or not the recorded CA key.
        """
        path = self.ca.public_path
        try:
            cert = x509.load_pem_x509_certificate(_read(path))
        except ValueError as err:
            raise VendorError(f"{path}: not a PEM X.509 certificate") from err
        _check_entry(self.ca, _require_p256_public(cert.public_key(), path))
        return cert

    def ca_certificate_der(self) -> bytes:
        """The manufacturer CA certificate, DER."""
        return self.ca_certificate().public_bytes(serialization.Encoding.DER)

    def public_key(self, role: Role) -> ec.EllipticCurvePublicKey:
        """The public key of ``role`` (the CA's from its certificate), checked against its id.

        Raises:
            VendorError: missing, malformed, of another type, or not the recorded key.
        """
        if role is Role.CA:
            return _require_p256_public(self.ca_certificate().public_key(), self.ca.public_path)
        entry = self.entry(role)
        key = load_p256_public(entry.public_path)
        _check_entry(entry, key)
        return key

    def private_key(self, role: Role, passphrase: bytes | None) -> ec.EllipticCurvePrivateKey:
        """Load the private key of ``role``, decrypting it with ``passphrase`` when encrypted.

        Raises:
            PassphraseRequired: the key is encrypted and ``passphrase`` is None.
            WrongPassphrase: ``passphrase`` does not decrypt it.
            WrongKeyType: not a P-256 private key.
            VendorError: missing, malformed, or not the recorded key.
        """
        entry = self.entry(role)
        key = _load_private(entry.key_path, passphrase)
        _check_entry(entry, key.public_key())
        return key

    def trusted_firmware_signers(self) -> dict[bytes, ec.EllipticCurvePublicKey]:
        """The firmware key as the ``trusted_vendors`` map of ``protocol.image.verify_manifest``."""
        return {self.firmware.signer_id: self.public_key(Role.FIRMWARE)}


# --- creating a workspace ------------------------------------------------------------------------


def init_vendor(
    directory: Path,
    *,
    now: datetime.datetime,
    name: str | None = None,
    passphrase: bytes | None = None,
    passphrase_env: str | None = None,
    force: bool = False,
) -> Vendor:
    """Create a vendor workspace in ``directory`` (all files, or none on failure).

    Args:
        now: the time the CA certificate's validity starts (timezone-aware).
        name: the CA's organization; defaults to the directory's name.
        passphrase: encrypt the private keys with it (``BestAvailableEncryption``).
        passphrase_env: the environment variable it came from, recorded as the default.
        force: replace an existing non-empty directory.

    Raises:
        UsageError: a bad name or passphrase.
        OutputExists, OutputError: as :func:`provisioning.files.staged_directory`.
    """
    org = check_name(name if name is not None else directory.resolve().name or "edgeseal")
    _check_passphrase(passphrase)
    if passphrase_env is not None and not _ENV_NAME.fullmatch(passphrase_env):
        raise UsageError(f"passphrase variable: not an environment variable name: {passphrase_env}")
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption()
        if passphrase is None
        else serialization.BestAvailableEncryption(passphrase)
    )
    generated = {role: ec.generate_private_key(ec.SECP256R1()) for role in Role}
    cert = _ca_certificate(generated[Role.CA], org, now)
    with files.staged_directory(directory, force=force) as staging:
        outputs = [_toml_file(staging, org, passphrase, passphrase_env, generated)]
        for role, key in generated.items():
            key_name, public_name = _FILES[role]
            outputs.append(
                files.OutputFile(staging / key_name, _private_pem(key, encryption), True)
            )
            public = (
                cert.public_bytes(serialization.Encoding.PEM)
                if role is Role.CA
                else (_public_pem(key.public_key()))
            )
            outputs.append(files.OutputFile(staging / public_name, public))
        files.write_files(outputs)
    return open_vendor(directory)


def check_name(name: str) -> str:
    """Validate a CA organization name: 1–64 of ``[A-Za-z0-9 ._-]``, starting alphanumeric.

    Raises:
        UsageError: not a valid name.
    """
    if not _NAME.fullmatch(name):
        raise UsageError(f"vendor name: expected 1-64 of [A-Za-z0-9 ._-], got {name!r:.80}")
    return name


def _check_passphrase(passphrase: bytes | None) -> None:
    if passphrase is not None and not 0 < len(passphrase) <= MAX_PASSPHRASE_BYTES:
        raise UsageError(f"passphrase: expected 1-{MAX_PASSPHRASE_BYTES} bytes")


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, org: str, now: datetime.datetime
) -> x509.Certificate:
    """The self-signed manufacturer CA certificate: CA:TRUE, pathlen 0, keyCertSign and cRLSign."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{org} manufacturer CA"),
        ]
    )
    public = key.public_key()
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _private_pem(
    key: ec.EllipticCurvePrivateKey, encryption: serialization.KeySerializationEncryption
) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _public_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _toml_file(
    directory: Path,
    org: str,
    passphrase: bytes | None,
    passphrase_env: str | None,
    generated: Mapping[Role, ec.EllipticCurvePrivateKey],
) -> files.OutputFile:
    """``vendor.toml``, written by hand: every value is a checked name, a bool or hex."""
    lines = [
        "# edgeseal vendor workspace (DESIGN §4). Paths are relative to this file.",
        f"format = {VENDOR_FORMAT}",
        f'name = "{org}"',
        f"encrypted = {'true' if passphrase is not None else 'false'}",
    ]
    if passphrase is not None and passphrase_env is not None:
        lines.append(f'passphrase_env = "{passphrase_env}"')
    for role, key in generated.items():
        key_name, public_name = _FILES[role]
        public_field = "certificate" if role is Role.CA else "public_key"
        lines += [
            "",
            f"[{role}]",
            f'key = "{key_name}"',
            f'{public_field} = "{public_name}"',
            f'signer_id = "{keys.signer_id(key.public_key()).hex()}"',
        ]
    return files.OutputFile(directory / VENDOR_TOML, ("\n".join(lines) + "\n").encode())


# --- opening a workspace -------------------------------------------------------------------------


def open_vendor(directory: Path) -> Vendor:
    """Open the workspace in ``directory`` (reads ``vendor.toml`` only).

    Raises:
        VendorError: no such directory, no ``vendor.toml``, or one that is malformed.
    """
    if not directory.is_dir():
        raise VendorError(f"vendor directory {directory}: no such directory")
    path = directory / VENDOR_TOML
    try:
        document = tomllib.loads(_read(path).decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise VendorError(f"{path}: not valid TOML: {err}") from err
    return _vendor_from(directory, path, document)


def _vendor_from(directory: Path, path: Path, document: Mapping[str, object]) -> Vendor:
    if document.get("format") != VENDOR_FORMAT:
        raise VendorError(f"{path}: expected format = {VENDOR_FORMAT}")
    name, encrypted, env = (
        document.get("name"),
        document.get("encrypted"),
        document.get("passphrase_env"),
    )
    if not isinstance(name, str) or not isinstance(encrypted, bool):
        raise VendorError(f"{path}: expected a name (string) and encrypted (true/false)")
    if env is not None and not (isinstance(env, str) and _ENV_NAME.fullmatch(env)):
        raise VendorError(f"{path}: passphrase_env: expected an environment variable name")
    return Vendor(
        directory=directory,
        name=name,
        encrypted=encrypted,
        passphrase_env=env,
        ca=_entry(directory, path, document, Role.CA),
        rotpk=_entry(directory, path, document, Role.ROTPK),
        firmware=_entry(directory, path, document, Role.FIRMWARE),
    )


def _entry(directory: Path, path: Path, document: Mapping[str, object], role: Role) -> KeyEntry:
    table = document.get(str(role))
    public_field = "certificate" if role is Role.CA else "public_key"
    if not isinstance(table, dict):
        raise VendorError(f"{path}: missing the [{role}] table")
    key, public, signer = table.get("key"), table.get(public_field), table.get("signer_id")
    if not (isinstance(key, str) and isinstance(public, str) and isinstance(signer, str)):
        raise VendorError(f"{path}: [{role}] needs key, {public_field} and signer_id strings")
    try:
        signer_bytes = bytes.fromhex(signer)
    except ValueError:
        signer_bytes = b""
    if len(signer_bytes) != 32:
        raise VendorError(f"{path}: [{role}].signer_id: expected 64 hex digits")
    return KeyEntry(role, directory / key, directory / public, signer_bytes)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise VendorError(f"{path}: no such file") from err
    except OSError as err:
        raise VendorError(f"{path}: cannot read: {err.strerror}") from err


def _check_entry(entry: KeyEntry, public: ec.EllipticCurvePublicKey) -> None:
    if not hmac.compare_digest(keys.signer_id(public), entry.signer_id):
        raise VendorError(
            f"{entry.key_path.parent / VENDOR_TOML}: the {entry.role} key on disk is not the one "
            "whose signer_id it records"
        )


def _load_private(path: Path, passphrase: bytes | None) -> ec.EllipticCurvePrivateKey:
    data = _read(path)
    encrypted = b"ENCRYPTED" in data.split(b"\n", 2)[0] or b"Proc-Type: 4,ENCRYPTED" in data
    if encrypted and passphrase is None:
        raise PassphraseRequired(
            f"{path}: the key is encrypted; give its passphrase (--passphrase-env)"
        )
    try:
        key = serialization.load_pem_private_key(data, passphrase if encrypted else None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        if encrypted:
            raise WrongPassphrase(f"{path}: wrong passphrase (or a damaged key file)") from err
        raise VendorError(f"{path}: not a PEM private key") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise WrongKeyType(
            f"{path}: expected an ECDSA P-256 private key, got a key of type {describe(key)}"
        )
    return key


# --- public keys given on the command line -------------------------------------------------------


def describe(key: object) -> str:
    """A short human name of a key object's type, for error messages ("ECDSA secp384r1")."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    kind = type(key).__name__.removeprefix("_")
    for suffix in ("PrivateKey", "PublicKey"):
        kind = kind.removesuffix(suffix)
    return kind


def _load_public(path: Path) -> object:
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise UsageError(f"{path}: no such file") from err
    except OSError as err:
        raise UsageError(f"{path}: cannot read: {err.strerror}") from err
    try:
        return serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise WrongKeyType(f"{path}: not a PEM public key (SubjectPublicKeyInfo)") from err


def load_p256_public(path: Path) -> ec.EllipticCurvePublicKey:
    """Load a P-256 public key from a PEM file (e.g. the gateway's ``result-key.pem``).

    Raises:
        UsageError: the file is missing or unreadable.
        WrongKeyType: not a PEM public key, or not P-256.
    """
    return _require_p256_public(_load_public(path), path)


def load_x25519_public(path: Path) -> x25519.X25519PublicKey:
    """Load an X25519 public key from a PEM file (e.g. the gateway's ``hpke-key.pem``).

    Raises:
        UsageError: the file is missing or unreadable.
        WrongKeyType: not a PEM public key, or not X25519.
    """
    key = _load_public(path)
    if not isinstance(key, x25519.X25519PublicKey):
        raise WrongKeyType(
            f"{path}: expected an X25519 public key, got a key of type {describe(key)}"
        )
    return key


def _require_p256_public(key: object, path: Path) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise WrongKeyType(
            f"{path}: expected an ECDSA P-256 public key, got a key of type {describe(key)}"
        )
    return key
