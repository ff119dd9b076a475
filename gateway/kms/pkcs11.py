"""The PKCS#11 KMS backend (DESIGN §4, §10): the KEK and the result key live on a token.

On the token (``create`` generates them; neither can leave it):

- ``edgeseal-kek``: AES-256 secret key, sensitive, not extractable, encrypt/decrypt only. The KEK
  primitive is CKM_AES_GCM with the IV chosen here (``gateway.kms.base`` blob format).
- ``edgeseal-result``: EC P-256 key pair; the private half is sensitive, not extractable, sign
  only. Signing hashes with SHA-256 here and signs the digest with CKM_ECDSA (raw r‖s).

SoftHSM has no X25519, so the gateway HPKE key is generated in memory, KEK-wrapped, and stored as
an HPKE blob document (version 1, canonical CBOR)::

    {"format": "edgeseal-kms-hpke", "version": 1, "blob": bstr}   blob: KEK-wrapped X25519 key,
                                                                   aad "edgeseal/kms/hpke-key/v1"

either in a file beside the token (``hpke_blob_path``, mode 0600) or, when no path is given, as a
private token data object labelled ``edgeseal-hpke``. It is unwrapped into memory on ``open``.

A PKCS#11 login belongs to the whole process: keep one ``Pkcs11Kms`` per token per process
(``close`` one before opening another).
"""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path
from typing import Final, Self

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from pkcs11 import ObjectClass

from gateway.kms._pkcs11_wrapper import KeyFlags, TokenSession
from gateway.kms.base import (
    HPKE_KEY_AAD,
    HsmError,
    KeyFileCorrupt,
    KeyFileError,
    KeyFileExists,
    Kms,
    KmsConfigError,
    UnwrapError,
    open_blob,
    write_atomic,
)
from protocol import cbor
from protocol.cose import Es256Signer
from protocol.errors import MalformedMessage
from protocol.keys import p256_from_point

LABEL_KEK: Final = "edgeseal-kek"
LABEL_RESULT: Final = "edgeseal-result"
LABEL_HPKE: Final = "edgeseal-hpke"
HPKE_FORMAT: Final = "edgeseal-kms-hpke"
HPKE_VERSION: Final = 1
_MAX_HPKE_DOC_BYTES: Final = 1024
_LABELS: Final = (LABEL_KEK, LABEL_RESULT, LABEL_HPKE)


class Pkcs11Kms(Kms):
    """A KMS whose KEK and result key are non-extractable objects on a PKCS#11 token."""

    def __init__(
        self,
        session: TokenSession,
        result_public: ec.EllipticCurvePublicKey,
        hpke_key: x25519.X25519PrivateKey,
    ) -> None:
        """Use ``create`` or ``open``; this constructor takes an open session and loaded keys."""
        self._session = session
        self._result_public = result_public
        self._hpke_key = hpke_key

    @classmethod
    def create(
        cls,
        module_path: str,
        token_label: str,
        pin: str,
        hpke_blob_path: Path | None = None,
        *,
        force: bool = False,
    ) -> Self:
        """Generate the KEK and the result key on the token and a wrapped HPKE key beside it.

        Args:
            module_path: the PKCS#11 module (``/usr/lib/softhsm/libsofthsm2.so``).
            token_label: the initialized token to use.
            pin: the token's user PIN.
            hpke_blob_path: a file for the wrapped HPKE key; None stores it on the token.
            force: destroy the token's edgeseal objects first and replace the blob file (their
                keys are lost for good).

        Raises:
            KmsConfigError: the token already holds edgeseal keys (without ``force``), or cannot
                be opened; ``WrongPin`` for a refused PIN.
            KeyFileExists: ``hpke_blob_path`` exists (without ``force``).
            HsmError: the token failed to generate a key.
        """
        session = TokenSession.open(module_path, token_label, pin)
        try:
            _prepare_token(session, hpke_blob_path, force=force)
            session.generate_aes_kek(LABEL_KEK)
            session.generate_p256_keypair(LABEL_RESULT)
            kms = cls(session, _result_public(session), x25519.X25519PrivateKey.generate())
            _store_hpke(session, hpke_blob_path, kms._wrapped_hpke(), force=force)
        except BaseException:
            session.close()
            raise
        return kms

    @classmethod
    def open(
        cls, module_path: str, token_label: str, pin: str, hpke_blob_path: Path | None = None
    ) -> Self:
        """Log in to the token, find the keys and unwrap the HPKE key into memory.

        Raises:
            KmsConfigError: the token cannot be opened or lacks the edgeseal keys; ``WrongPin``
                for a refused PIN.
            KeyFileError: the HPKE blob file is missing, corrupt (``KeyFileCorrupt``), or does
                not open under this token's KEK.
        """
        session = TokenSession.open(module_path, token_label, pin)
        try:
            result_public = _result_public(session)
            hpke_key = _unwrap_hpke(session, _load_hpke(session, hpke_blob_path), hpke_blob_path)
        except BaseException:
            session.close()
            raise
        return cls(session, result_public, hpke_key)

    def result_signer(self) -> Es256Signer:
        """An ``Es256Signer`` that signs SHA-256 of the bytes given on the token (CKM_ECDSA)."""
        session = self._session

        def sign(data: bytes) -> bytes:
            signature = session.ecdsa_sign_digest(LABEL_RESULT, hashlib.sha256(data).digest())
            if len(signature) != 64:
                raise HsmError(f"{session.where}: ECDSA returned {len(signature)} bytes, not 64")
            return signature

        return sign

    def result_public_key(self) -> ec.EllipticCurvePublicKey:
        """The result key's public half, read from the token on open."""
        return self._result_public

    def hpke_private_key(self) -> x25519.X25519PrivateKey:
        """The gateway HPKE private key (unwrapped from under the token KEK on open)."""
        return self._hpke_key

    def kek_flags(self) -> KeyFlags:
        """The token's protection attributes of the KEK (for status output and audits)."""
        return self._session.key_flags(LABEL_KEK, ObjectClass.SECRET_KEY)

    def result_key_flags(self) -> KeyFlags:
        """The token's protection attributes of the result private key."""
        return self._session.key_flags(LABEL_RESULT, ObjectClass.PRIVATE_KEY)

    def close(self) -> None:
        """Log out and close the token session."""
        self._session.close()

    def _kek_seal(self, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._session.aes_gcm_encrypt(LABEL_KEK, iv, plaintext, aad)

    def _kek_open(self, iv: bytes, sealed: bytes, aad: bytes) -> bytes:
        return self._session.aes_gcm_decrypt(LABEL_KEK, iv, sealed, aad)

    def _wrapped_hpke(self) -> bytes:
        raw = self._hpke_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return self.wrap(raw, HPKE_KEY_AAD)


def _prepare_token(session: TokenSession, hpke_blob_path: Path | None, *, force: bool) -> None:
    """Refuse (or with ``force`` clear) existing edgeseal objects and blob file."""
    present = [label for label in _LABELS if session.has_objects(label)]
    if hpke_blob_path is not None and hpke_blob_path.exists() and not force:
        raise KeyFileExists(hpke_blob_path, "exists; refusing to overwrite it (use force)")
    if present and not force:
        raise KmsConfigError(
            f"{session.where}: already holds {', '.join(present)}; refusing to replace them "
            "(use force)"
        )
    for label in present:
        session.destroy_objects(label)


def _result_public(session: TokenSession) -> ec.EllipticCurvePublicKey:
    try:
        return p256_from_point(session.ec_point(LABEL_RESULT))
    except MalformedMessage as err:
        raise HsmError(f"{session.where}: {LABEL_RESULT} is not a P-256 public key") from err


def _store_hpke(session: TokenSession, path: Path | None, blob: bytes, *, force: bool) -> None:
    document = cbor.dumps({"format": HPKE_FORMAT, "version": HPKE_VERSION, "blob": blob})
    if path is None:
        session.write_data(LABEL_HPKE, document)
        return
    try:
        write_atomic(path, document, mode=0o600, replace=force)
    except FileExistsError as err:
        raise KeyFileExists(path, "exists; refusing to overwrite it (use force)") from err
    except OSError as err:
        raise KeyFileError(path, f"cannot write it ({err.strerror})") from err


def _load_hpke(session: TokenSession, path: Path | None) -> bytes:
    """Read the HPKE blob document (file or token object) and return the wrapped key."""
    if path is None:
        document = session.read_data(LABEL_HPKE)
        if document is None:
            raise KmsConfigError(f"{session.where}: no {LABEL_HPKE} data object; create the KMS")
        return _parse_hpke(document, f"{session.where}: {LABEL_HPKE}", None)
    try:
        document = path.read_bytes()
    except FileNotFoundError as err:
        raise KeyFileError(path, "not found (the HPKE blob written by Pkcs11Kms.create)") from err
    except OSError as err:
        raise KeyFileError(path, f"cannot read it ({err.strerror})") from err
    return _parse_hpke(document, str(path), path)


def _parse_hpke(document: bytes, where: str, path: Path | None) -> bytes:
    try:
        fields = cbor.Fields(
            cbor.loads(document, what="hpke blob", max_bytes=_MAX_HPKE_DOC_BYTES), what="hpke"
        ).only({"format", "version", "blob"})
        if fields.get_str("format", max_len=64) != HPKE_FORMAT:
            raise MalformedMessage(f"hpke.format: expected {HPKE_FORMAT!r}")
        version = fields.get_int("version")
        if version != HPKE_VERSION:
            raise MalformedMessage(f"hpke.version: expected {HPKE_VERSION}, got {version}")
        return fields.get_bytes("blob", max_size=256)
    except MalformedMessage as err:
        if path is not None:
            raise KeyFileCorrupt(path, str(err)) from err
        raise KmsConfigError(f"{where}: {err}") from err


def _unwrap_hpke(session: TokenSession, blob: bytes, path: Path | None) -> x25519.X25519PrivateKey:
    """Open the KEK-wrapped HPKE key with the token's KEK."""
    try:
        raw = open_blob(partial(session.aes_gcm_decrypt, LABEL_KEK), blob, HPKE_KEY_AAD)
    except UnwrapError as err:
        reason = "does not open under this token's KEK (another token's, or altered)"
        if path is not None:
            raise KeyFileCorrupt(path, f"HPKE key blob {reason}") from err
        raise KmsConfigError(f"{session.where}: HPKE key object {reason}") from err
    if len(raw) != 32:
        raise KmsConfigError(f"{session.where}: HPKE key is {len(raw)} bytes, not 32")
    return x25519.X25519PrivateKey.from_private_bytes(raw)
