"""The gateway KMS (DESIGN §4, §10): key file and PKCS#11 (SoftHSM2) backends behind one interface.

PKCS#11 tests make a fresh SoftHSM2 token per test under ``tmp_path`` with their own
``SOFTHSM2_CONF``, and re-initialize the module so it reads that configuration. A missing SoftHSM2
skips them with the reason (fails under CI=true).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pkcs11
import pytest
from cryptography.exceptions import InvalidSignature as CryptoInvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.kms import (
    FileSpec,
    KeyFileCorrupt,
    KeyFileError,
    KeyFileExists,
    KeyFileKms,
    Kms,
    KmsConfigError,
    Pkcs11Spec,
    UnwrapError,
    WrongPassphrase,
    WrongPin,
    create_kms,
    export_public_pems,
    keyfile,
    open_kms,
    parse_kms_spec,
)
from gateway.kms._pkcs11_wrapper import reload_module
from gateway.kms.pkcs11 import LABEL_KEK, LABEL_RESULT, Pkcs11Kms
from protocol import cbor
from protocol.cose import sign1_create, sign1_verify
from protocol.errors import InvalidSignature, MalformedMessage, UsageError, VerificationError
from tests.conftest import missing

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "246813579"
SO_PIN = "97531864"
PIN_ARGS = ("--pin", PIN, "--so-pin", SO_PIN)
PASSPHRASE = b"correct horse battery staple"
AAD = b"release:42"
SETTINGS = settings(max_examples=150, deadline=None)
FILE_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(autouse=True)
def cheap_scrypt(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """New key files use scrypt n = 2**10 in tests (files record n, so opening follows), except
    in the test of the default cost."""
    if request.node.name != "test_default_scrypt_cost":
        monkeypatch.setattr(keyfile, "SCRYPT_N", 1 << 10)


@dataclass(frozen=True, slots=True)
class Token:
    """A fresh SoftHSM2 token for one test."""

    module: str
    label: str
    pin: str
    home: Path


@dataclass(frozen=True, slots=True)
class Backend:
    """How one test creates and reopens a KMS of one backend configuration."""

    name: str
    create: Callable[[], Kms]
    open: Callable[[], Kms]


def init_token(home: Path, label: str) -> None:
    """Initialize a SoftHSM2 token labelled ``label`` in the token directory under ``home``."""
    subprocess.run(
        [*("softhsm2-util", "--init-token", "--free", "--label", label), *PIN_ARGS],
        check=True,
        capture_output=True,
        env={**os.environ, "SOFTHSM2_CONF": str(home / "softhsm2.conf")},
    )


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Token:
    """A fresh token ``edgeseal`` in a private SoftHSM2 configuration."""
    if shutil.which("softhsm2-util") is None or not Path(MODULE).exists():
        missing("SoftHSM2 is not installed (apt-get install softhsm2)")
    home = tmp_path / "softhsm"
    (home / "tokens").mkdir(parents=True)
    (home / "softhsm2.conf").write_text(
        f"directories.tokendir = {home / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    monkeypatch.setenv("SOFTHSM2_CONF", str(home / "softhsm2.conf"))
    init_token(home, "edgeseal")
    reload_module(MODULE)  # python-pkcs11 keeps the module loaded: make it read this config
    return Token(MODULE, "edgeseal", PIN, home)


#: Every backend configuration; the tests of signing and wrapping skip the one that differs from
#: "pkcs11" only in where the HPKE blob is stored.
ALL_BACKENDS = ["file", "file+passphrase", "pkcs11", "pkcs11+hpke-file"]
BACKENDS = ALL_BACKENDS[:3]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each backend configuration: key file with and without passphrase, token with and without
    an HPKE blob file."""
    name: str = request.param
    if name.startswith("file"):
        path = tmp_path / "gateway.key"
        phrase = PASSPHRASE if "passphrase" in name else None
        return Backend(
            name, lambda: KeyFileKms.create(path, phrase), lambda: KeyFileKms.open(path, phrase)
        )
    token: Token = request.getfixturevalue("softhsm")
    blob = tmp_path / "hpke.blob" if "hpke-file" in name else None
    return Backend(
        name,
        lambda: Pkcs11Kms.create(token.module, token.label, token.pin, blob),
        lambda: Pkcs11Kms.open(token.module, token.label, token.pin, blob),
    )


@pytest.fixture
def kms(backend: Backend) -> Iterator[Kms]:
    """A freshly created KMS of each backend, closed afterwards."""
    with backend.create() as created:
        yield created


@pytest.fixture(scope="module")
def file_kms(tmp_path_factory: pytest.TempPathFactory) -> KeyFileKms:
    """One key file KMS shared by the property tests."""
    return KeyFileKms.create(tmp_path_factory.mktemp("kms") / "gateway.key")


def hpke_raw(key: x25519.X25519PrivateKey) -> bytes:
    """The 32 raw bytes of an X25519 private key."""
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def file_secrets(path: Path) -> list[bytes]:
    """The secret byte strings of an unprotected key file (KEK, result scalar)."""
    outer = cbor.Fields(cbor.loads(path.read_bytes(), what="t"), what="t")
    inner = cbor.Fields(cbor.loads(outer.get_bytes("secrets"), what="t"), what="t")
    return [inner.get_bytes("kek"), inner.get_bytes("result")]


def assert_no_secret(err: BaseException, secrets: list[bytes]) -> None:
    """Assert that no secret appears in the error's text, raw, hex or as text."""
    text = str(err)
    for secret in secrets:
        assert secret.hex() not in text
        assert secret.hex().upper() not in text
        assert repr(secret)[2:-1] not in text
        assert secret.decode("latin-1") not in text


def verify_raw(public: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> None:
    """Verify a raw r‖s ES256 signature with `cryptography`."""
    assert len(signature) == 64
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    public.verify(der, data, ec.ECDSA(hashes.SHA256()))


# --- both backends ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
def test_reopen_keeps_every_key(backend: Backend) -> None:
    """A reopened KMS has the same result key and HPKE key and opens blobs wrapped before."""
    with backend.create() as created:
        blob = created.wrap(b"cek" * 11, AAD)
        result_pub = created.result_public_key().public_numbers()
        hpke_pub = created.hpke_public_key().public_bytes_raw()
        hpke_priv = hpke_raw(created.hpke_private_key())
    with backend.open() as reopened:
        assert reopened.result_public_key().public_numbers() == result_pub
        assert reopened.hpke_public_key().public_bytes_raw() == hpke_pub
        assert hpke_raw(reopened.hpke_private_key()) == hpke_priv
        assert reopened.unwrap(blob, AAD) == b"cek" * 11


def test_signer_verifies_with_exported_pem(kms: Kms, tmp_path: Path) -> None:
    """A raw r‖s signature from the signer verifies under the exported result-key.pem."""
    result_pem, hpke_pem = export_public_pems(kms, tmp_path / "pub")
    assert (result_pem.name, hpke_pem.name) == ("result-key.pem", "hpke-key.pem")
    public = serialization.load_pem_public_key(result_pem.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)
    data = b"ledger checkpoint 17"
    verify_raw(public, kms.result_signer()(data), data)
    with pytest.raises(CryptoInvalidSignature):
        verify_raw(public, kms.result_signer()(data), data + b"!")
    hpke = serialization.load_pem_public_key(hpke_pem.read_bytes())
    assert isinstance(hpke, x25519.X25519PublicKey)
    assert hpke.public_bytes_raw() == kms.hpke_public_key().public_bytes_raw()


def test_signer_makes_cose_sign1(kms: Kms) -> None:
    """``sign1_create`` with the KMS signer verifies under the result key, and only under it."""
    message = sign1_create(b"result payload", kms.result_signer(), kid=b"gw")
    assert sign1_verify(message, kms.result_public_key()) == b"result payload"
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(InvalidSignature):
        sign1_verify(message, other)
    flipped = bytearray(message)
    flipped[-1] ^= 0x01  # last byte of the signature
    with pytest.raises(InvalidSignature):
        sign1_verify(bytes(flipped), kms.result_public_key())


def test_wrap_unwrap_round_trip(kms: Kms) -> None:
    """A wrapped blob opens with the same aad and has the documented layout."""
    for size in (0, 1, 15, 16, 17, 32, 1000):
        plaintext = os.urandom(size)
        blob = kms.wrap(plaintext, AAD)
        assert len(blob) == 1 + 12 + size + 16
        assert blob[0] == 1
        assert kms.unwrap(blob, AAD) == plaintext
        assert kms.wrap(plaintext, AAD) != blob  # a fresh IV each time


def test_unwrap_refuses_every_alteration_opaquely(kms: Kms) -> None:
    """Wrong aad, any flipped bit, truncation or trailing bytes all raise one opaque UnwrapError."""
    secret = b"CEK-0123456789abcdef"
    blob = kms.wrap(secret, AAD)
    variants = [(blob, b"release:43"), (blob, b""), (blob + b"\x00", AAD), (b"", AAD)]
    variants += [(blob[:cut], AAD) for cut in range(1, len(blob), 7)]
    for index in range(len(blob)):
        flipped = bytearray(blob)
        flipped[index] ^= 1 << (index % 8)
        variants.append((bytes(flipped), AAD))
    messages = set()
    for candidate, aad in variants:
        with pytest.raises(UnwrapError) as caught:
            kms.unwrap(candidate, aad)
        assert isinstance(caught.value, VerificationError)
        messages.add(str(caught.value))
        assert_no_secret(caught.value, [secret])
    assert messages == {"KEK-wrapped blob did not open"}


def test_unwrap_refuses_another_kms_blob(kms: Kms, tmp_path: Path) -> None:
    """A blob wrapped under another KEK does not open."""
    with KeyFileKms.create(tmp_path / "other.key") as other:
        blob = other.wrap(b"x" * 32, AAD)
    with pytest.raises(UnwrapError):
        kms.unwrap(blob, AAD)


# --- key file backend -------------------------------------------------------------------------


@SETTINGS
@given(plaintext=st.binary(max_size=512), aad=st.binary(max_size=64))
def test_keyfile_wrap_round_trip_property(
    file_kms: KeyFileKms, plaintext: bytes, aad: bytes
) -> None:
    """Any plaintext and aad round-trip, and a different aad never opens the blob."""
    blob = file_kms.wrap(plaintext, aad)
    assert file_kms.unwrap(blob, aad) == plaintext
    with pytest.raises(UnwrapError):
        file_kms.unwrap(blob, aad + b"\x00")


@SETTINGS
@given(blob=st.binary(max_size=80))
def test_unwrap_of_arbitrary_bytes_raises_only_unwrap_error(
    file_kms: KeyFileKms, blob: bytes
) -> None:
    """Arbitrary bytes given to unwrap raise UnwrapError and nothing else."""
    with pytest.raises(UnwrapError):
        file_kms.unwrap(blob, AAD)


@pytest.mark.parametrize("passphrase", [None, PASSPHRASE])
def test_key_file_mode_is_0600(tmp_path: Path, passphrase: bytes | None) -> None:
    """A new key file is readable and writable by its owner only, whatever the umask."""
    old = os.umask(0o000)
    try:
        KeyFileKms.create(tmp_path / "gateway.key", passphrase).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "gateway.key").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["gateway.key"]  # no temporary left behind


def test_key_file_refuses_overwrite(tmp_path: Path) -> None:
    """Creating over an existing key file fails and leaves it intact; force replaces it."""
    path = tmp_path / "gateway.key"
    first = KeyFileKms.create(path)
    before = path.read_bytes()
    with pytest.raises(KeyFileExists) as caught:
        KeyFileKms.create(path)
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, UsageError)
    assert path.read_bytes() == before
    second = KeyFileKms.create(path, force=True)
    assert path.read_bytes() != before
    assert second.result_public_key() != first.result_public_key()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_wrong_passphrase_is_a_typed_error(tmp_path: Path) -> None:
    """A wrong, missing or unexpected passphrase raises WrongPassphrase naming the file."""
    path = tmp_path / "gateway.key"
    KeyFileKms.create(path, PASSPHRASE)
    for attempt in (b"wrong horse", None):
        with pytest.raises(WrongPassphrase) as caught:
            KeyFileKms.open(path, attempt)
        assert str(path) in str(caught.value)
        assert caught.value.path == path
        assert_no_secret(caught.value, [PASSPHRASE, b"wrong horse"])
    plain = tmp_path / "plain.key"
    KeyFileKms.create(plain)
    with pytest.raises(WrongPassphrase, match="has no passphrase"):
        KeyFileKms.open(plain, PASSPHRASE)


def test_passphrase_hides_secrets(tmp_path: Path) -> None:
    """With a passphrase the secrets field is ciphertext; without one it is the CBOR map."""
    plain, protected = tmp_path / "plain.key", tmp_path / "protected.key"
    KeyFileKms.create(plain)
    KeyFileKms.create(protected, PASSPHRASE)
    assert len(file_secrets(plain)) == 2
    outer = cbor.Fields(cbor.loads(protected.read_bytes(), what="t"), what="t")
    assert outer.get_map("kdf").get_str("alg") == "scrypt"
    with pytest.raises(MalformedMessage):
        cbor.Fields(cbor.loads(outer.get_bytes("secrets"), what="t"), what="t")


def test_default_scrypt_cost(tmp_path: Path) -> None:
    """A passphrase-protected file records scrypt with n = 2**15, r = 8, p = 1 and reopens."""
    path = tmp_path / "gateway.key"
    KeyFileKms.create(path, PASSPHRASE)
    kdf = cbor.Fields(cbor.loads(path.read_bytes(), what="t"), what="t").get_map("kdf")
    assert (kdf.get_int("n"), kdf.get_int("r"), kdf.get_int("p")) == (1 << 15, 8, 1)
    assert len(kdf.get_bytes("salt")) == 16
    KeyFileKms.open(path, PASSPHRASE).close()


def test_altered_protected_file_fails(tmp_path: Path) -> None:
    """A changed salt or secrets ciphertext in a protected file fails as WrongPassphrase."""
    path = tmp_path / "gateway.key"
    KeyFileKms.create(path, PASSPHRASE)
    document = cbor.loads(path.read_bytes(), what="t")
    assert isinstance(document, dict)
    for field in ("secrets", "salt"):
        altered = dict(document)
        if field == "salt":
            altered["kdf"] = dict(document["kdf"]) | {"salt": bytes(16)}
        else:
            sealed = bytearray(document["secrets"])
            sealed[-1] ^= 0x80
            altered["secrets"] = bytes(sealed)
        path.write_bytes(cbor.dumps(altered))
        with pytest.raises(WrongPassphrase, match="altered"):
            KeyFileKms.open(path, PASSPHRASE)


def corruptions(original: bytes, secrets: list[bytes]) -> Iterator[tuple[str, bytes]]:
    """Named corrupt versions of a good unprotected key file."""
    document = cbor.loads(original, what="t")
    assert isinstance(document, dict)
    yield "empty", b""
    yield "garbage", b"\xff" * 40
    yield "truncated", original[:-5]
    yield "trailing", original + b"\x00"
    yield "not a map", cbor.dumps([1, 2])
    yield "wrong format", cbor.dumps(document | {"format": "something-else"})
    yield "wrong version", cbor.dumps(document | {"version": 2})
    yield "extra field", cbor.dumps(document | {"extra": 1})
    yield "no hpke", cbor.dumps({k: v for k, v in document.items() if k != "hpke"})
    hpke = bytearray(document["hpke"])
    hpke[20] ^= 1
    yield "hpke altered", cbor.dumps(document | {"hpke": bytes(hpke)})
    kek, scalar = secrets[:2]
    other_kek = cbor.dumps({"kek": bytes(32), "result": scalar})
    yield "kek replaced", cbor.dumps(document | {"secrets": other_kek})
    zero_scalar = cbor.dumps({"kek": kek, "result": bytes(32)})
    yield "scalar zero", cbor.dumps(document | {"secrets": zero_scalar})
    short_kek = cbor.dumps({"kek": kek[:16], "result": scalar})
    yield "short kek", cbor.dumps(document | {"secrets": short_kek})
    yield "bad kdf", cbor.dumps(document | {"kdf": {"alg": "argon2"}})


def test_corrupt_key_file_names_the_file(tmp_path: Path) -> None:
    """Every kind of corrupt key file raises KeyFileCorrupt naming the file, never key bytes."""
    path = tmp_path / "gateway.key"
    with KeyFileKms.create(path) as created:
        hpke = hpke_raw(created.hpke_private_key())
    original = path.read_bytes()
    secrets = [*file_secrets(path), hpke]
    for name, data in corruptions(original, secrets):
        path.write_bytes(data)
        with pytest.raises(KeyFileCorrupt) as caught:
            KeyFileKms.open(path)
        assert str(path) in str(caught.value), name
        assert_no_secret(caught.value, secrets)


@FILE_SETTINGS
@given(data=st.binary(max_size=300))
def test_arbitrary_key_file_raises_only_key_file_errors(tmp_path: Path, data: bytes) -> None:
    """Arbitrary bytes as a key file raise a KeyFileError (corrupt or passphrase), nothing else."""
    path = tmp_path / "fuzz.key"
    path.write_bytes(data)
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as caught:
        KeyFileKms.open(path)
    assert str(path) in str(caught.value)


def test_missing_or_exposed_key_file_is_refused(tmp_path: Path) -> None:
    """A missing key file, or one group or others can read, raises KeyFileError naming it."""
    path = tmp_path / "gateway.key"
    with pytest.raises(KeyFileError, match="not found") as caught:
        KeyFileKms.open(path)
    assert str(path) in str(caught.value)
    KeyFileKms.create(path)
    path.chmod(0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        KeyFileKms.open(path)


def test_closed_keyfile_kms_refuses_wrap(tmp_path: Path) -> None:
    """After close, wrap and unwrap raise ValueError."""
    kms = KeyFileKms.create(tmp_path / "gateway.key")
    blob = kms.wrap(b"x", AAD)
    kms.close()
    with pytest.raises(ValueError, match="closed"):
        kms.wrap(b"x", AAD)
    with pytest.raises(ValueError, match="closed"):
        kms.unwrap(blob, AAD)


def test_bad_passphrase_arguments(tmp_path: Path) -> None:
    """An empty or non-bytes passphrase is a caller error, not a key file."""
    with pytest.raises(ValueError, match="empty"):
        KeyFileKms.create(tmp_path / "a.key", b"")
    with pytest.raises(TypeError, match="bytes"):
        KeyFileKms.create(tmp_path / "b.key", "text")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


# --- PKCS#11 backend ---------------------------------------------------------------------------


def test_pkcs11_keys_never_leave_the_token(softhsm: Token) -> None:
    """The KEK and the result key are sensitive and were never extractable; reading fails."""
    with Pkcs11Kms.create(softhsm.module, softhsm.label, softhsm.pin) as kms:
        for flags in (kms.kek_flags(), kms.result_key_flags()):
            assert flags.token
            assert flags.sensitive
            assert flags.always_sensitive
            assert not flags.extractable
            assert flags.never_extractable
    token = pkcs11.lib(softhsm.module).get_token(token_label=softhsm.label)
    with token.open(user_pin=softhsm.pin) as session:
        kek = session.get_key(object_class=pkcs11.ObjectClass.SECRET_KEY, label=LABEL_KEK)
        result = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=LABEL_RESULT)
        for key in (kek, result):
            assert key[pkcs11.Attribute.EXTRACTABLE] is False
            with pytest.raises(pkcs11.exceptions.AttributeSensitive):
                key[pkcs11.Attribute.VALUE]


def test_pkcs11_wrong_pin_is_a_typed_error(softhsm: Token) -> None:
    """A wrong PIN raises WrongPin without echoing the PIN."""
    Pkcs11Kms.create(softhsm.module, softhsm.label, softhsm.pin).close()
    with pytest.raises(WrongPin) as caught:
        Pkcs11Kms.open(softhsm.module, softhsm.label, "00000000")
    assert isinstance(caught.value, UsageError)
    assert "00000000" not in str(caught.value)
    assert softhsm.pin not in str(caught.value)


def test_pkcs11_unknown_token_or_module(softhsm: Token, tmp_path: Path) -> None:
    """An unknown token label or an unloadable module raises KmsConfigError."""
    with pytest.raises(KmsConfigError, match="token label"):
        Pkcs11Kms.open(softhsm.module, "no-such-token", softhsm.pin)
    with pytest.raises(KmsConfigError, match="cannot load"):
        Pkcs11Kms.open(str(tmp_path / "missing.so"), softhsm.label, softhsm.pin)


def test_pkcs11_open_before_create(softhsm: Token) -> None:
    """Opening a token that holds no edgeseal keys says to create the KMS."""
    with pytest.raises(KmsConfigError, match="created"):
        Pkcs11Kms.open(softhsm.module, softhsm.label, softhsm.pin)


def test_pkcs11_refuses_overwrite(softhsm: Token) -> None:
    """A second create refuses to replace the token keys; force replaces them."""
    with Pkcs11Kms.create(softhsm.module, softhsm.label, softhsm.pin) as first:
        first_pub = first.result_public_key().public_numbers()
    with pytest.raises(KmsConfigError, match="refusing"):
        Pkcs11Kms.create(softhsm.module, softhsm.label, softhsm.pin)
    with Pkcs11Kms.open(softhsm.module, softhsm.label, softhsm.pin) as same:
        assert same.result_public_key().public_numbers() == first_pub
    with Pkcs11Kms.create(softhsm.module, softhsm.label, softhsm.pin, force=True) as second:
        assert second.result_public_key().public_numbers() != first_pub
        second.unwrap(second.wrap(b"k", AAD), AAD)


def test_pkcs11_one_session_per_process(softhsm: Token) -> None:
    """A second open of a token already open in this process is refused with advice."""
    with (
        Pkcs11Kms.create(softhsm.module, softhsm.label, softhsm.pin),
        pytest.raises(KmsConfigError, match="close the other"),
    ):
        Pkcs11Kms.open(softhsm.module, softhsm.label, softhsm.pin)


def test_pkcs11_close_is_idempotent(softhsm: Token) -> None:
    """Closing twice, or after the module was re-initialized under the KMS, is harmless."""
    kms = Pkcs11Kms.create(softhsm.module, softhsm.label, softhsm.pin)
    reload_module(softhsm.module)
    kms.close()
    kms.close()
    with pytest.raises(ValueError, match="closed"):
        kms.result_signer()(b"data")
    with Pkcs11Kms.open(softhsm.module, softhsm.label, softhsm.pin) as again:
        again.close()


def test_pkcs11_hpke_blob_file(softhsm: Token, tmp_path: Path) -> None:
    """The HPKE blob file is 0600, refuses overwrite, and a corrupt or foreign one names itself."""
    blob = tmp_path / "hpke.blob"
    Pkcs11Kms.create(softhsm.module, softhsm.label, softhsm.pin, blob).close()
    assert stat.S_IMODE(blob.stat().st_mode) == 0o600
    good = blob.read_bytes()
    init_token(softhsm.home, "other")
    reload_module(softhsm.module)  # let the module see the new token
    with pytest.raises(KeyFileExists):
        Pkcs11Kms.create(softhsm.module, "other", softhsm.pin, blob)
    Pkcs11Kms.create(softhsm.module, "other", softhsm.pin, tmp_path / "other.blob").close()
    foreign = (tmp_path / "other.blob").read_bytes()
    for data in (b"", good[:-3], good + b"\x00", foreign):
        blob.write_bytes(data)
        with pytest.raises(KeyFileCorrupt) as caught:
            Pkcs11Kms.open(softhsm.module, softhsm.label, softhsm.pin, blob)
        assert str(blob) in str(caught.value)
    blob.unlink()
    with pytest.raises(KeyFileError, match="not found"):
        Pkcs11Kms.open(softhsm.module, softhsm.label, softhsm.pin, blob)


# --- specs -----------------------------------------------------------------------------------


def test_parse_kms_spec() -> None:
    """Both spec forms parse to their dataclasses, with the documented defaults."""
    assert parse_kms_spec("file:/var/lib/gw.key") == FileSpec(Path("/var/lib/gw.key"))
    assert parse_kms_spec("file:gw.key;passphrase-env=PW") == FileSpec(Path("gw.key"), "PW")
    assert parse_kms_spec(
        "pkcs11:module=/usr/lib/softhsm/libsofthsm2.so;token=edgeseal;pin-env=EDGESEAL_PIN"
    ) == Pkcs11Spec("edgeseal", "EDGESEAL_PIN", MODULE)
    assert parse_kms_spec("pkcs11:token=t;pin-env=P;hpke-file=/x/h.blob") == Pkcs11Spec(
        "t", "P", MODULE, Path("/x/h.blob")
    )


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "expected"),
        ("vault:x", "expected"),
        ("file:", "empty"),
        ("file:a;passphrase-env=", "empty"),
        ("file:a;pass=1", "unknown parameter 'pass'"),
        ("pkcs11:token=t", "missing pin-env"),
        ("pkcs11:pin-env=P", "missing token"),
        ("pkcs11:token=t;token=u;pin-env=P", "twice"),
        ("pkcs11:token=t;pin=1234;pin-env=P", "unknown parameter 'pin'"),
        ("pkcs11:token=t;secret1234;pin-env=P", "not name=value"),
    ],
)
def test_bad_kms_spec(spec: str, match: str) -> None:
    """A bad spec raises KmsConfigError naming the problem without echoing values."""
    with pytest.raises(KmsConfigError, match=match) as caught:
        parse_kms_spec(spec)
    assert "1234" not in str(caught.value)


def test_open_kms_file_spec(tmp_path: Path) -> None:
    """create_kms and open_kms with a file spec read the passphrase from the environment."""
    spec = f"file:{tmp_path / 'gw.key'};passphrase-env=GW_PASS"
    env = {"GW_PASS": "s3cret phrase"}
    with create_kms(spec, env=env) as created:
        blob = created.wrap(b"cek", AAD)
    with open_kms(spec, env=env) as opened:
        assert isinstance(opened, KeyFileKms)
        assert opened.unwrap(blob, AAD) == b"cek"
    with pytest.raises(KmsConfigError, match="GW_PASS"):
        open_kms(spec, env={})
    with pytest.raises(WrongPassphrase):
        open_kms(spec, env={"GW_PASS": "other"})


def test_open_kms_pkcs11_spec(softhsm: Token) -> None:
    """create_kms and open_kms with a pkcs11 spec read the PIN from the environment."""
    spec = f"pkcs11:module={softhsm.module};token={softhsm.label};pin-env=EDGESEAL_PIN"
    env = {"EDGESEAL_PIN": softhsm.pin}
    with create_kms(spec, env=env) as created:
        pub = created.result_public_key().public_numbers()
    with open_kms(spec, env=env) as opened:
        assert isinstance(opened, Pkcs11Kms)
        assert opened.result_public_key().public_numbers() == pub
    with pytest.raises(KmsConfigError, match="EDGESEAL_PIN"):
        open_kms(spec, env={})
