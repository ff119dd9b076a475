"""A small typed door to python-pkcs11: the only module that imports it (DESIGN §2).

One ``TokenSession`` is one logged-in read/write session on one token. Every call is serialized by
a lock (a PKCS#11 session runs one operation at a time), keys are found by label, and every
python-pkcs11 exception leaves this module translated into the KMS error tree:

- module not loadable, no such token, object missing, token already open: ``KmsConfigError``;
- PIN incorrect, invalid or locked: ``WrongPin``;
- an AES-GCM decryption that fails: the opaque ``UnwrapError``;
- anything else: ``HsmError`` naming the PKCS#11 error class (never key or data bytes).

A PKCS#11 login belongs to the whole process, and closing a session logs it out: keep one
``TokenSession`` per token per process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.mechanisms import GCMParams
from pkcs11.types import DecryptMixin, EncryptMixin, SignMixin

from gateway.kms.base import HsmError, KmsConfigError, WrongPin, opaque_unwrap_error

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Lib  # noqa: N812 (a class named in lower case)

#: DER of the named curve OID prime256v1 / secp256r1, 1.2.840.10045.3.1.7 (RFC 5480 §2.1.1.1).
P256_EC_PARAMS: Final = bytes.fromhex("06082a8648ce3d030107")
_POINT_BYTES: Final = 65
_DER_OCTET_STRING: Final = 0x04
_GCM_TAG_BITS: Final = 128

_K = TypeVar("_K", bound=pkcs11.Object)

_PIN_ERRORS: Final = (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange, p11.PinLocked)
_PIN_ERRORS_X: Final = (p11.PinExpired, p11.UserPinNotInitialized)
_ALREADY_CLOSED: Final = (p11.SessionHandleInvalid, p11.SessionClosed)
#: What a failed AES-GCM decryption looks like (SoftHSM reports a bad tag as GeneralError).
_DECRYPT_FAILURES: Final = (
    p11.EncryptedDataInvalid,
    p11.EncryptedDataLenRange,
    p11.DataInvalid,
    p11.DataLenRange,
    p11.GeneralError,
    p11.FunctionFailed,
)


@dataclass(frozen=True, slots=True)
class KeyFlags:
    """The protection attributes of a key object on the token (PKCS#11 §4.7, §4.9)."""

    token: bool
    sensitive: bool
    extractable: bool
    never_extractable: bool
    always_sensitive: bool


def reload_module(module_path: str) -> None:
    """Finalize and re-initialize a loaded PKCS#11 module (it re-reads its configuration).

    python-pkcs11 loads a module once per process; SoftHSM reads ``SOFTHSM2_CONF`` only in
    ``C_Initialize``. Every open session of that module is closed by this.

    Raises:
        KmsConfigError: the module cannot be loaded.
    """
    with _translated(f"PKCS#11 module {module_path}"):
        _load(module_path).reinitialize()


class TokenSession:
    """A logged-in read/write session on one token; calls are serialized by a lock."""

    def __init__(self, session: pkcs11.Session, where: str) -> None:
        """Use ``TokenSession.open``."""
        self._session: pkcs11.Session | None = session
        self._lock = threading.Lock()
        self.where = where

    @classmethod
    def open(cls, module_path: str, token_label: str, pin: str) -> TokenSession:
        """Load the module, find the token by label and log in as the user.

        Raises:
            KmsConfigError: the module does not load, or no single token has this label, or the
                token is already open in this process.
            WrongPin: the token refused the PIN.
        """
        where = f"PKCS#11 token {token_label!r} (module {module_path})"
        with _translated(where):
            token = _load(module_path).get_token(token_label=token_label)
            return cls(token.open(rw=True, user_pin=pin), where)

    def close(self) -> None:
        """Log out and close the session (idempotent; a session the module already dropped,
        as ``reload_module`` does, counts as closed)."""
        with self._lock, _translated(self.where):
            session, self._session = self._session, None
            if session is None:
                return
            with suppress(*_ALREADY_CLOSED):
                session.close()

    def has_objects(self, label: str) -> bool:
        """Whether any object on the token carries ``label``."""
        with self._held() as session:
            # exhaust the search: an abandoned one would keep C_FindObjects active
            return bool(list(session.get_objects({Attribute.LABEL: label})))

    def destroy_objects(self, label: str) -> int:
        """Destroy every object labelled ``label``; returns how many there were."""
        with self._held() as session:
            objects = list(session.get_objects({Attribute.LABEL: label}))
            for obj in objects:
                obj.destroy()
            return len(objects)

    def generate_aes_kek(self, label: str) -> None:
        """Generate a token AES-256 key: sensitive, never extractable, encrypt/decrypt only."""
        template = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.MODIFIABLE: False,
        }
        caps = MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT
        with self._held() as session:
            session.generate_key(
                KeyType.AES, 256, label=label, store=True, capabilities=caps, template=template
            )

    def generate_p256_keypair(self, label: str) -> None:
        """Generate a token P-256 key pair: the private half sensitive, unextractable, sign only."""
        private = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.MODIFIABLE: False,
        }
        public = {Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.MODIFIABLE: False}
        caps = MechanismFlag.SIGN | MechanismFlag.VERIFY
        with self._held() as session:
            params = session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: P256_EC_PARAMS}, local=True
            )
            params.generate_keypair(
                label=label,
                store=True,
                capabilities=caps,
                public_template=public,
                private_template=private,
            )

    def aes_gcm_encrypt(self, label: str, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """AES-GCM encrypt with the token key ``label``: ciphertext ‖ 16-byte tag."""
        with self._held() as session:
            key = _typed_key(session, label, ObjectClass.SECRET_KEY, EncryptMixin)
            params = GCMParams(iv, aad, _GCM_TAG_BITS)
            sealed = key.encrypt(plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            return _one_shot(sealed)

    def aes_gcm_decrypt(self, label: str, iv: bytes, sealed: bytes, aad: bytes) -> bytes:
        """AES-GCM decrypt with the token key ``label``.

        Raises:
            UnwrapError: the ciphertext, tag or ``aad`` does not verify (opaque).
        """
        with self._held() as session:
            key = _typed_key(session, label, ObjectClass.SECRET_KEY, DecryptMixin)
            params = GCMParams(iv, aad, _GCM_TAG_BITS)
            try:
                plain = key.decrypt(sealed, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            except _DECRYPT_FAILURES as err:
                raise opaque_unwrap_error() from err
            return _one_shot(plain)

    def ecdsa_sign_digest(self, label: str, digest: bytes) -> bytes:
        """Sign a precomputed digest with CKM_ECDSA and the private key ``label``: raw r‖s."""
        with self._held() as session:
            key = _typed_key(session, label, ObjectClass.PRIVATE_KEY, SignMixin)
            return bytes(key.sign(digest, mechanism=Mechanism.ECDSA))

    def ec_point(self, label: str) -> bytes:
        """The SEC1 uncompressed point of the public key ``label`` (65 bytes for P-256)."""
        with self._held() as session:
            key = _typed_key(session, label, ObjectClass.PUBLIC_KEY, pkcs11.PublicKey)
            return _unwrap_der_point(bytes(key[Attribute.EC_POINT]), self.where)

    def key_flags(self, label: str, object_class: ObjectClass) -> KeyFlags:
        """The protection attributes of the key ``label`` of ``object_class``."""
        with self._held() as session:
            key = _typed_key(session, label, object_class, pkcs11.Key)
            return KeyFlags(
                token=bool(key[Attribute.TOKEN]),
                sensitive=bool(key[Attribute.SENSITIVE]),
                extractable=bool(key[Attribute.EXTRACTABLE]),
                never_extractable=bool(key[Attribute.NEVER_EXTRACTABLE]),
                always_sensitive=bool(key[Attribute.ALWAYS_SENSITIVE]),
            )

    def read_data(self, label: str) -> bytes | None:
        """The value of the private data object ``label``, or None when there is none."""
        with self._held() as session:
            found = list(session.get_objects(_data_template(label)))
            if not found:
                return None
            if len(found) > 1:
                raise KmsConfigError(f"{self.where}: {len(found)} data objects {label!r}")
            return bytes(found[0][Attribute.VALUE])

    def write_data(self, label: str, value: bytes) -> None:
        """Store ``value`` as the private token data object ``label`` (replacing any)."""
        with self._held() as session:
            for old in list(session.get_objects(_data_template(label))):
                old.destroy()
            attrs = _data_template(label) | {
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.APPLICATION: "edgeseal",
                Attribute.VALUE: value,
            }
            session.create_object(attrs)

    @contextmanager
    def _held(self) -> Iterator[pkcs11.Session]:
        with self._lock, _translated(self.where):
            if self._session is None:
                raise ValueError(f"{self.where}: the KMS session is closed")
            yield self._session


def _load(module_path: str) -> Pkcs11Lib:
    try:
        return pkcs11.lib(module_path)
    except (OSError, p11.PKCS11Error) as err:
        # dlopen or C_Initialize failed: a wrong path, or a bad module configuration
        # (SOFTHSM2_CONF). python-pkcs11's text here is the loader's, free of secrets.
        reason = str(err) or type(err).__name__
        raise KmsConfigError(
            f"PKCS#11 module {module_path}: cannot load or initialize it ({reason})"
        ) from err


def _one_shot(result: bytes | Iterator[bytes]) -> bytes:
    """python-pkcs11 returns bytes for bytes input (an iterator only for iterator input)."""
    return result if isinstance(result, bytes) else b"".join(result)


def _data_template(label: str) -> dict[Attribute, object]:
    return {Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: label}


def _typed_key(
    session: pkcs11.Session, label: str, object_class: ObjectClass, kind: type[_K]
) -> _K:
    key = session.get_key(object_class=object_class, label=label)
    if not isinstance(key, kind):
        raise KmsConfigError(f"token object {label!r} is not a {kind.__name__}")
    return key


def _unwrap_der_point(value: bytes, where: str) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING around the SEC1 point (PKCS#11 §2.3.3); some
    modules return the bare point, which this also accepts."""
    if len(value) == _POINT_BYTES:
        return value
    if len(value) == _POINT_BYTES + 2 and value[:2] == bytes([_DER_OCTET_STRING, _POINT_BYTES]):
        return value[2:]
    raise HsmError(f"{where}: CKA_EC_POINT of {len(value)} bytes is not a P-256 point")


@contextmanager
def _translated(where: str) -> Iterator[None]:
    """Turn python-pkcs11 exceptions into the KMS error tree, naming only their class."""
    try:
        yield
    except _PIN_ERRORS as err:
        raise WrongPin(f"{where}: PIN refused ({type(err).__name__})") from err
    except _PIN_ERRORS_X as err:
        raise WrongPin(f"{where}: the user PIN is not usable ({type(err).__name__})") from err
    except (p11.NoSuchToken, p11.MultipleTokensReturned) as err:
        raise KmsConfigError(f"{where}: {type(err).__name__}; check the token label") from err
    except (p11.NoSuchKey, p11.MultipleObjectsReturned) as err:
        raise KmsConfigError(
            f"{where}: {type(err).__name__}; was the KMS created on this token?"
        ) from err
    except (p11.UserAlreadyLoggedIn, p11.AnotherUserAlreadyLoggedIn) as err:
        raise KmsConfigError(
            f"{where}: already logged in by this process; close the other KMS first"
        ) from err
    except p11.PKCS11Error as err:
        raise HsmError(f"{where}: PKCS#11 operation failed ({type(err).__name__})") from err
