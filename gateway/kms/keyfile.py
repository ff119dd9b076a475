"""The key file KMS backend, the default (DESIGN §4): every gateway secret in one file, mode 0600.

Key file, version 1: one canonical CBOR map with text keys::

    "format"   "edgeseal-kms-keyfile"
    "version"  1
    "kdf"      absent without a passphrase; else {"alg": "scrypt", "salt": bstr(16),
               "n": uint, "r": uint, "p": uint}
    "secrets"  without "kdf": canonical CBOR {"kek": bstr(32), "result": bstr(32)}
               with "kdf":    IV(12) ‖ AES-256-GCM(key = scrypt(passphrase), that CBOR map),
                              associated data = canonical CBOR ["edgeseal/kms-keyfile/v1", kdf]
    "hpke"     the X25519 private key (32 raw bytes), KEK-wrapped (``gateway.kms.base``) with
               aad "edgeseal/kms/hpke-key/v1"

"kek" is the AES-256 KEK; "result" is the P-256 result key's private scalar, 32 bytes big-endian.
The file is written atomically (temporary file, fsync, link or rename) and never overwritten
unless asked. Opening refuses a file that group or others may read.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final, Self

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from gateway.kms.base import (
    HPKE_KEY_AAD,
    IV_BYTES,
    KEK_BYTES,
    KeyFileCorrupt,
    KeyFileError,
    KeyFileExists,
    Kms,
    UnwrapError,
    WrongPassphrase,
    opaque_unwrap_error,
    open_blob,
    write_atomic,
)
from protocol import cbor
from protocol.cose import Es256Signer, es256_signer
from protocol.errors import MalformedMessage

FORMAT: Final = "edgeseal-kms-keyfile"
VERSION: Final = 1
SECRETS_CONTEXT: Final = "edgeseal/kms-keyfile/v1"
MAX_FILE_BYTES: Final = 4096
SCALAR_BYTES: Final = 32
SALT_BYTES: Final = 16

#: scrypt cost for new files (RFC 7914 §2; ~32 MiB, ~0.1 s): n = 2**15, r = 8, p = 1.
SCRYPT_N: Final = 1 << 15
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1


@dataclass(frozen=True, slots=True)
class _ScryptParams:
    """The passphrase KDF of a key file (its "kdf" map)."""

    salt: bytes
    n: int
    r: int
    p: int

    def to_cbor(self) -> dict[str, object]:
        return {"alg": "scrypt", "salt": self.salt, "n": self.n, "r": self.r, "p": self.p}

    def derive(self, passphrase: bytes) -> bytes:
        return Scrypt(salt=self.salt, length=32, n=self.n, r=self.r, p=self.p).derive(passphrase)


@dataclass(frozen=True, slots=True)
class _Secrets:
    """The plaintext secrets of a key file: the KEK and the result key scalar."""

    kek: bytes
    result_scalar: bytes

    def to_cbor(self) -> bytes:
        return cbor.dumps({"kek": self.kek, "result": self.result_scalar})


class KeyFileKms(Kms):
    """A KMS whose secrets live in one key file (optionally under a passphrase)."""

    def __init__(
        self,
        path: Path,
        kek: bytes,
        result_key: ec.EllipticCurvePrivateKey,
        hpke_key: x25519.X25519PrivateKey,
    ) -> None:
        """Use ``create`` or ``open``; this constructor takes keys already loaded."""
        self.path = path
        self._kek: AESGCM | None = AESGCM(kek)
        self._result_key = result_key
        self._hpke_key = hpke_key

    @classmethod
    def create(cls, path: Path, passphrase: bytes | None = None, *, force: bool = False) -> Self:
        """Generate a KEK, a result key and an HPKE key and write them to a new key file.

        Args:
            path: where to write the key file (mode 0600).
            passphrase: protects the secrets with scrypt and AES-256-GCM; None stores them in
                the clear, protected by the file mode only.
            force: replace an existing file (its keys are lost for good).

        Raises:
            KeyFileExists: ``path`` exists and ``force`` is false.
            KeyFileError: the file could not be written.
        """
        path = Path(path)
        kek = AESGCM.generate_key(bit_length=256)
        result_key = ec.generate_private_key(ec.SECP256R1())
        kms = cls(path, kek, result_key, x25519.X25519PrivateKey.generate())
        secrets = _Secrets(kek, result_key.private_numbers().private_value.to_bytes(32, "big"))
        document = kms._document(secrets, _protect_args(passphrase))
        try:
            write_atomic(path, cbor.dumps(document), mode=0o600, replace=force)
        except FileExistsError as err:
            raise KeyFileExists(path, "exists; refusing to overwrite it (use force)") from err
        except OSError as err:
            raise KeyFileError(path, f"cannot write it ({err.strerror})") from err
        return kms

    @classmethod
    def open(cls, path: Path, passphrase: bytes | None = None) -> Self:
        """Open an existing key file.

        Raises:
            KeyFileError: the file is missing, unreadable, or readable by group or others.
            KeyFileCorrupt: the file is not a well-formed key file of a known version.
            WrongPassphrase: the passphrase does not open it, or is missing or unexpected.
        """
        path = Path(path)
        fields = _parse(path, _read_private(path))
        secrets = _open_secrets(path, fields, passphrase)
        try:
            result_key = ec.derive_private_key(
                int.from_bytes(secrets.result_scalar, "big"), ec.SECP256R1()
            )
        except ValueError as err:
            raise KeyFileCorrupt(path, "key.secrets.result: not a valid P-256 scalar") from err
        hpke_key = _unwrap_hpke(path, AESGCM(secrets.kek), fields)
        return cls(path, secrets.kek, result_key, hpke_key)

    def result_signer(self) -> Es256Signer:
        """An ``Es256Signer`` over the in-memory result key."""
        return es256_signer(self._result_key)

    def result_public_key(self) -> ec.EllipticCurvePublicKey:
        """The result key's public half."""
        return self._result_key.public_key()

    def hpke_private_key(self) -> x25519.X25519PrivateKey:
        """The gateway HPKE private key."""
        return self._hpke_key

    def close(self) -> None:
        """Drop the KEK; ``wrap``/``unwrap`` raise ``ValueError`` afterwards."""
        self._kek = None

    def _aead(self) -> AESGCM:
        if self._kek is None:
            raise ValueError(f"KMS for key file {self.path} is closed")
        return self._kek

    def _kek_seal(self, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._aead().encrypt(iv, plaintext, aad)

    def _kek_open(self, iv: bytes, sealed: bytes, aad: bytes) -> bytes:
        return _gcm_open(self._aead(), iv, sealed, aad)

    def _document(
        self, secrets: _Secrets, protect: tuple[_ScryptParams, bytes] | None
    ) -> dict[str, object]:
        hpke_raw = self._hpke_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        document: dict[str, object] = {
            "format": FORMAT,
            "version": VERSION,
            "hpke": self.wrap(hpke_raw, HPKE_KEY_AAD),
        }
        if protect is None:
            document["secrets"] = secrets.to_cbor()
        else:
            params, passphrase = protect
            document["kdf"] = params.to_cbor()
            document["secrets"] = _seal_secrets(params, passphrase, secrets.to_cbor())
        return document


def _protect_args(passphrase: bytes | None) -> tuple[_ScryptParams, bytes] | None:
    if passphrase is None:
        return None
    _check_passphrase(passphrase)
    return _ScryptParams(os.urandom(SALT_BYTES), SCRYPT_N, SCRYPT_R, SCRYPT_P), passphrase


def _check_passphrase(passphrase: bytes) -> None:
    if not isinstance(passphrase, bytes):
        raise TypeError(f"passphrase must be bytes or None, got {type(passphrase).__name__}")
    if not passphrase:
        raise ValueError("passphrase must not be empty (pass None for no passphrase)")


def _secrets_aad(params: _ScryptParams) -> bytes:
    return cbor.dumps([SECRETS_CONTEXT, params.to_cbor()])


def _seal_secrets(params: _ScryptParams, passphrase: bytes, plaintext: bytes) -> bytes:
    iv = os.urandom(IV_BYTES)
    key = params.derive(passphrase)
    return iv + AESGCM(key).encrypt(iv, plaintext, _secrets_aad(params))


def _read_private(path: Path) -> bytes:
    """Read the key file, refusing one that group or others can access."""
    try:
        with path.open("rb") as stream:
            mode = stat.S_IMODE(os.fstat(stream.fileno()).st_mode)
            data = stream.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError as err:
        raise KeyFileError(path, "not found (create it with KeyFileKms.create)") from err
    except OSError as err:
        raise KeyFileError(path, f"cannot read it ({err.strerror})") from err
    if mode & 0o077:
        raise KeyFileError(path, f"mode {mode:04o} lets group or others read it; chmod 600 it")
    return data


def _parse(path: Path, data: bytes) -> cbor.Fields:
    """Decode the outer map and check its format and version."""
    try:
        fields = cbor.Fields(
            cbor.loads(data, what="key file", max_bytes=MAX_FILE_BYTES), what="key"
        )
        fields.only({"format", "version", "kdf", "secrets", "hpke"})
        if fields.get_str("format", max_len=64) != FORMAT:
            raise MalformedMessage(f"key.format: expected {FORMAT!r}")
        version = fields.get_int("version")
        if version != VERSION:
            raise MalformedMessage(f"key.version: expected {VERSION}, got {version}")
    except MalformedMessage as err:
        raise KeyFileCorrupt(path, str(err)) from err
    return fields


def _open_secrets(path: Path, fields: cbor.Fields, passphrase: bytes | None) -> _Secrets:
    """Decrypt (when protected) and decode the secrets of a parsed key file."""
    try:
        params = _kdf_params(fields.get_map("kdf")) if "kdf" in fields else None
        sealed = fields.get_bytes("secrets", max_size=1024)
    except MalformedMessage as err:
        raise KeyFileCorrupt(path, str(err)) from err
    if params is None and passphrase is not None:
        raise WrongPassphrase(path, "has no passphrase, but one was given")
    if params is not None:
        if passphrase is None:
            raise WrongPassphrase(path, "is protected by a passphrase; none was given")
        _check_passphrase(passphrase)
        sealed = _decrypt_secrets(path, params, passphrase, sealed)
    return _decode_secrets(path, sealed)


def _kdf_params(kdf: cbor.Fields) -> _ScryptParams:
    kdf.only({"alg", "salt", "n", "r", "p"})
    if kdf.get_str("alg", max_len=16) != "scrypt":
        raise MalformedMessage("key.kdf.alg: expected 'scrypt'")
    n = kdf.get_int("n", lo=2, hi=1 << 20)
    if n & (n - 1):
        raise MalformedMessage(f"key.kdf.n: expected a power of two, got {n}")
    return _ScryptParams(
        salt=kdf.get_bytes("salt", size=SALT_BYTES),
        n=n,
        r=kdf.get_int("r", lo=1, hi=32),
        p=kdf.get_int("p", lo=1, hi=16),
    )


def _decrypt_secrets(path: Path, params: _ScryptParams, passphrase: bytes, sealed: bytes) -> bytes:
    if len(sealed) < IV_BYTES + 16:
        raise KeyFileCorrupt(path, f"key.secrets: {len(sealed)} bytes is too short")
    key = params.derive(passphrase)
    try:
        return AESGCM(key).decrypt(sealed[:IV_BYTES], sealed[IV_BYTES:], _secrets_aad(params))
    except InvalidTag as err:
        raise WrongPassphrase(path, "the passphrase does not open it (or it was altered)") from err


def _decode_secrets(path: Path, data: bytes) -> _Secrets:
    try:
        fields = cbor.Fields(cbor.loads(data, what="key.secrets"), what="key.secrets")
        fields.only({"kek", "result"})
        return _Secrets(
            kek=fields.get_bytes("kek", size=KEK_BYTES),
            result_scalar=fields.get_bytes("result", size=SCALAR_BYTES),
        )
    except MalformedMessage as err:
        raise KeyFileCorrupt(path, str(err)) from err


def _gcm_open(aead: AESGCM, iv: bytes, sealed: bytes, aad: bytes) -> bytes:
    try:
        return aead.decrypt(iv, sealed, aad)
    except InvalidTag as err:
        raise opaque_unwrap_error() from err


def _unwrap_hpke(path: Path, kek: AESGCM, fields: cbor.Fields) -> x25519.X25519PrivateKey:
    """Open the KEK-wrapped HPKE key of a parsed key file."""
    try:
        blob = fields.get_bytes("hpke", max_size=256)
        raw = open_blob(partial(_gcm_open, kek), blob, HPKE_KEY_AAD)
    except MalformedMessage as err:
        raise KeyFileCorrupt(path, str(err)) from err
    except UnwrapError as err:
        raise KeyFileCorrupt(path, "key.hpke: does not open under the file's KEK") from err
    if len(raw) != 32:
        raise KeyFileCorrupt(path, f"key.hpke: expected a 32-byte X25519 key, got {len(raw)}")
    return x25519.X25519PrivateKey.from_private_bytes(raw)
