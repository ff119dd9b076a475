"""The KMS interface, its errors and the KEK-wrapped blob format (DESIGN §4, §10).

A KMS holds the gateway's three secrets behind one interface, whatever the backend:

- the KEK (AES-256), which wraps release CEKs and the gateway HPKE key at rest (``wrap``,
  ``unwrap``);
- the result key (ECDSA P-256), which signs results, commands, receipts and ledger checkpoints
  (``result_signer``, an ``Es256Signer`` for ``protocol.cose.sign1_create``);
- the gateway HPKE key (X25519), to which vendors wrap release CEKs (``hpke_private_key``).

KEK-wrapped blob, version 1 (the same bytes for every backend)::

    offset  size  field
    0       1     version = 0x01
    1       12    IV, random per wrap
    13      n+16  AES-256-GCM ciphertext of the n plaintext bytes, then the 16-byte tag

    GCM associated data = canonical CBOR ["edgeseal/kek-wrap/v1", aad]

A blob that does not open for any reason (altered, truncated, another KEK, another ``aad``, unknown
version) raises the one opaque ``UnwrapError``.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from protocol import cbor
from protocol.cose import Es256Signer
from protocol.errors import TransportError, UsageError, VerificationError

WRAP_VERSION: Final = 1
WRAP_CONTEXT: Final = "edgeseal/kek-wrap/v1"
IV_BYTES: Final = 12
TAG_BYTES: Final = 16
KEK_BYTES: Final = 32
_HEADER_BYTES: Final = 1 + IV_BYTES
_OPAQUE: Final = "KEK-wrapped blob did not open"

#: Associated data of the KEK-wrapped gateway HPKE private key, in every backend.
HPKE_KEY_AAD: Final = b"edgeseal/kms/hpke-key/v1"
RESULT_KEY_PEM: Final = "result-key.pem"
HPKE_KEY_PEM: Final = "hpke-key.pem"


class UnwrapError(VerificationError):
    """A KEK-wrapped blob did not open; raised by ``Kms.unwrap``, opaque on purpose.

    The blob was altered or truncated, was wrapped under another KEK, or ``aad`` differs from the
    one given to ``wrap``. Nothing can be done with the blob; find where it was damaged.
    """


class KmsConfigError(UsageError):
    """A KMS could not be opened as configured (spec, token, PIN); the message says the fix."""


class KeyFileError(KmsConfigError):
    """A problem with a KMS key file; ``path`` names the file."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"key file {path}: {message}")
        self.path = path


class KeyFileExists(KeyFileError):
    """``create`` refused to overwrite an existing key file (pass ``force=True`` to replace it)."""


class KeyFileCorrupt(KeyFileError):
    """The key file is not a well-formed edgeseal KMS key file of a known version."""


class WrongPassphrase(KeyFileError):
    """The passphrase does not open the key file (or one is missing, or one was not expected)."""


class WrongPin(KmsConfigError):
    """The PKCS#11 token refused the PIN (incorrect, invalid or locked)."""


class HsmError(TransportError):
    """The PKCS#11 module failed an operation underneath; the message names the PKCS#11 error."""


class Kms(abc.ABC):
    """The gateway's key store: KEK, result key and HPKE key behind one interface.

    Backends implement the KEK primitive (``_kek_seal``/``_kek_open``) and the key accessors; the
    blob format of ``wrap``/``unwrap`` is shared. A KMS is a context manager that ``close``s.
    """

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt ``plaintext`` under the KEK, bound to ``aad`` (the blob format above)."""
        return seal_blob(self._kek_seal, plaintext, aad)

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        """Decrypt a blob made by ``wrap`` with the same ``aad``.

        Raises:
            UnwrapError: the blob does not open (opaque: altered, truncated, wrong KEK or aad).
        """
        return open_blob(self._kek_open, blob, aad)

    def hpke_public_key(self) -> x25519.X25519PublicKey:
        """The gateway HPKE public key, to which vendors wrap release CEKs."""
        return self.hpke_private_key().public_key()

    @abc.abstractmethod
    def result_signer(self) -> Es256Signer:
        """An ``Es256Signer`` over the result key: exact bytes in, raw 64-byte r‖s out."""

    @abc.abstractmethod
    def result_public_key(self) -> ec.EllipticCurvePublicKey:
        """The P-256 public key that verifies the gateway's results, commands and receipts."""

    @abc.abstractmethod
    def hpke_private_key(self) -> x25519.X25519PrivateKey:
        """The gateway HPKE private key (held in memory, unwrapped from under the KEK on open)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the backend (a token session); the KMS is unusable afterwards."""

    @abc.abstractmethod
    def _kek_seal(self, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """AES-256-GCM encrypt under the KEK: ciphertext ‖ 16-byte tag."""

    @abc.abstractmethod
    def _kek_open(self, iv: bytes, sealed: bytes, aad: bytes) -> bytes:
        """AES-256-GCM decrypt under the KEK; raises ``UnwrapError`` on any failure."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


#: AES-256-GCM under the KEK: (iv, plaintext, aad) -> ciphertext ‖ tag.
GcmSeal = Callable[[bytes, bytes, bytes], bytes]
#: AES-256-GCM under the KEK: (iv, ciphertext ‖ tag, aad) -> plaintext; raises ``UnwrapError``.
GcmOpen = Callable[[bytes, bytes, bytes], bytes]


def seal_blob(kek_seal: GcmSeal, plaintext: bytes, aad: bytes) -> bytes:
    """Make a KEK-wrapped blob (format above) with a fresh random IV."""
    iv = os.urandom(IV_BYTES)
    return bytes([WRAP_VERSION]) + iv + kek_seal(iv, bytes(plaintext), _gcm_aad(aad))


def open_blob(kek_open: GcmOpen, blob: bytes, aad: bytes) -> bytes:
    """Open a KEK-wrapped blob.

    Raises:
        UnwrapError: the blob does not open (opaque).
    """
    if len(blob) < _HEADER_BYTES + TAG_BYTES or blob[0] != WRAP_VERSION:
        raise opaque_unwrap_error()
    iv, sealed = bytes(blob[1:_HEADER_BYTES]), bytes(blob[_HEADER_BYTES:])
    return kek_open(iv, sealed, _gcm_aad(aad))


def opaque_unwrap_error() -> UnwrapError:
    """The one ``UnwrapError`` every backend raises (same message, whatever failed)."""
    return UnwrapError(_OPAQUE)


def export_public_pems(kms: Kms, out_dir: Path) -> tuple[Path, Path]:
    """Write ``result-key.pem`` and ``hpke-key.pem`` (PEM SubjectPublicKeyInfo) into ``out_dir``.

    The factory puts the result key into the runtime stage's trust anchors; vendors wrap release
    CEKs to the HPKE key. Existing files are replaced atomically.

    Returns:
        The paths of the result key PEM and the HPKE key PEM.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    result_path = out_dir / RESULT_KEY_PEM
    hpke_path = out_dir / HPKE_KEY_PEM
    write_atomic(result_path, _spki_pem(kms.result_public_key()), mode=0o644, replace=True)
    write_atomic(hpke_path, _spki_pem(kms.hpke_public_key()), mode=0o644, replace=True)
    return result_path, hpke_path


def write_atomic(path: Path, data: bytes, *, mode: int, replace: bool) -> None:
    """Write ``data`` to ``path`` atomically with ``mode``: a temporary file, fsync, then rename.

    Raises:
        FileExistsError: ``path`` exists and ``replace`` is false (checked atomically by link).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, mode)  # the umask applied to os.open; make the mode exact
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path exists: no check-then-write race
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _gcm_aad(aad: bytes) -> bytes:
    return cbor.dumps([WRAP_CONTEXT, bytes(aad)])


def _spki_pem(key: ec.EllipticCurvePublicKey | x25519.X25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
