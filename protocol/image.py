"""The sealed application image and the app bundle inside it (DESIGN §5, §7; docs/image-format.md).

A sealed image is ``tag 55799 [format id, manifest, ciphertext]``: the vendor-signed manifest
(COSE_Sign1, ES256, kid = vendor signer id) followed by the AES-256-GCM ciphertext of an app bundle.
The header (everything before the ciphertext) parses from a short prefix, so a device can check a
download before it has read the payload. Parsing never verifies: ``verify_manifest`` checks the
signature against trusted vendors and the ciphertext against its digest; ``open_image`` also refuses
a rolled-back counter *before* it decrypts, then checks the plaintext digest.

The app's measurement (and its release id) is the SHA-256 of the COSE_Sign1 manifest bytes, never of
the plaintext (DESIGN §5).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocol import cbor, cose, keys
from protocol.errors import InvalidImage, InvalidSignature, MalformedMessage

#: Format id of the sealed image envelope: "ESI" ‖ version 1 (docs/image-format.md §2).
IMAGE_FORMAT_ID: Final = 0x45534901
MANIFEST_FORMAT_VERSION: Final = 1
APP_BUNDLE_FORMAT_VERSION: Final = 1
#: COSE algorithm id of AES-256-GCM (RFC 9053 §4.1), the only payload cipher of format 1.
ENC_ALG_A256GCM: Final = 3
COMPONENT_APP: Final = "APP"

CEK_BYTES: Final = 32
IV_BYTES: Final = 12
KEY_ID_BYTES: Final = 16
TAG_BYTES: Final = 16
DIGEST_BYTES: Final = 32
CLASS_ID_BYTES: Final = 16
MAX_COUNTER: Final = 0xFFFF_FFFF
MAX_TIME_S: Final = (1 << 63) - 1

MAX_PATH_CHARS: Final = 128
MAX_FILES: Final = 256
MAX_FILE_BYTES: Final = 16 << 20
MAX_APP_BUNDLE_BYTES: Final = 32 << 20
MAX_MANIFEST_BYTES: Final = 1024
#: Reading this many bytes of an image always suffices for ``parse_unverified_header``.
MAX_HEADER_BYTES: Final = 9 + 3 + MAX_MANIFEST_BYTES + 5
MAX_IMAGE_BYTES: Final = MAX_HEADER_BYTES + MAX_APP_BUNDLE_BYTES + TAG_BYTES

#: tag 55799 (self-described CBOR, RFC 8949 §3.4.6), array(3), uint32 format id: 9 fixed bytes.
IMAGE_PREFIX: Final = b"\xd9\xd9\xf7\x83\x1a" + IMAGE_FORMAT_ID.to_bytes(4, "big")

_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+-]{0,31}")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_MAX_VERSION_CHARS: Final = 32
_BUNDLE_KEYS: Final[frozenset[cbor.Key]] = frozenset({1, 2, 3, 4})
_MANIFEST_KEYS: Final[frozenset[cbor.Key]] = frozenset(range(1, 16))


class ImageRolledBack(InvalidImage):
    """``open_image``: the manifest's security counter is below the device's minimum (DESIGN §5).

    Raised before any decryption. The device needs a newer image; nothing is wrong with the key.
    """


class ImageClassMismatch(InvalidImage):
    """``open_image``: the image was built for another product (class id, DESIGN §5)."""


def check_version_text(text: str, *, what: str) -> str:
    """Validate a version string (1–32 of ``[0-9A-Za-z.+-]``, starting alphanumeric).

    Raises:
        MalformedMessage: ``text`` is not a valid version.
    """
    if not isinstance(text, str) or not _VERSION.fullmatch(text):
        raise MalformedMessage(f"{what}: expected a version like '1.2.0', got {text!r:.40}")
    return text


def check_path(path: str, *, what: str) -> str:
    """Validate a bundle path: relative, '/'-separated, no '.' or '..' segment, ≤ 128 characters.

    Raises:
        MalformedMessage: ``path`` is not a valid bundle path.
    """
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH_CHARS:
        raise MalformedMessage(f"{what}: expected a path of 1-{MAX_PATH_CHARS} characters")
    for segment in path.split("/"):
        if not _PATH_SEGMENT.fullmatch(segment):
            raise MalformedMessage(f"{what}: invalid path {path!r:.140}")
    return path


def _check_bytes(value: bytes, size: int, *, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise MalformedMessage(f"{what}: expected {size} bytes")


def _check_int(value: int, hi: int, *, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
        raise MalformedMessage(f"{what}: expected an integer in 0..{hi}, got {value!r:.40}")


# --- the app bundle (the plaintext) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AppBundle:
    """The application: MicroPython sources and compiled ``.mpy`` files by path (DESIGN §7, §11).

    The file tuples are kept sorted by path; the entry point must be one of the sources.
    """

    sources: tuple[tuple[str, bytes], ...]
    compiled: tuple[tuple[str, bytes], ...] = ()
    entry_point: str = "main.py"
    format_version: int = APP_BUNDLE_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format_version != APP_BUNDLE_FORMAT_VERSION:
            raise MalformedMessage(
                f"app bundle.format_version: expected {APP_BUNDLE_FORMAT_VERSION}, "
                f"got {self.format_version!r:.20}"
            )
        object.__setattr__(self, "sources", _check_files(self.sources, "app bundle.sources"))
        object.__setattr__(self, "compiled", _check_files(self.compiled, "app bundle.compiled"))
        if len(self.sources) + len(self.compiled) > MAX_FILES:
            raise MalformedMessage(f"app bundle: more than {MAX_FILES} files")
        total = sum(len(d) for _, d in self.sources) + sum(len(d) for _, d in self.compiled)
        if total > MAX_APP_BUNDLE_BYTES:
            raise MalformedMessage(f"app bundle: {total} bytes exceeds {MAX_APP_BUNDLE_BYTES}")
        check_path(self.entry_point, what="app bundle.entry_point")
        if self.entry_point not in dict(self.sources):
            raise MalformedMessage("app bundle.entry_point: not among the sources")

    def encode(self) -> bytes:
        """The canonical CBOR map ``{1: version, 2: {path: source}, 3: {path: mpy}, 4: entry}``."""
        return b"".join(self.encode_parts())

    def encode_parts(self) -> list[bytes]:
        """``encode()`` in pieces whose concatenation it is, the files' bytes among them as they
        are: ``seal_parts`` encrypts them without a copy of the whole bundle."""
        return [
            cbor.head(5, 4),
            cbor.dumps(1),
            cbor.dumps(self.format_version),
            cbor.dumps(2),
            *cbor.map_parts(dict(self.sources)),
            cbor.dumps(3),
            *cbor.map_parts(dict(self.compiled)),
            cbor.dumps(4),
            cbor.dumps(self.entry_point),
        ]

    @classmethod
    def decode(cls, data: bytes) -> AppBundle:
        """Decode and validate an app bundle.

        Raises:
            MalformedMessage: not a well-formed version-1 app bundle.
        """
        what = "app bundle"
        fields = cbor.Fields(
            cbor.loads(data, what=what, max_bytes=MAX_APP_BUNDLE_BYTES + (1 << 16)), what=what
        ).only(_BUNDLE_KEYS)
        return cls(
            format_version=fields.get_int(1),
            sources=_decode_files(fields.get_map(2)),
            compiled=_decode_files(fields.get_map(3)),
            entry_point=fields.get_str(4, max_len=MAX_PATH_CHARS),
        )


def _check_files(files: tuple[tuple[str, bytes], ...], what: str) -> tuple[tuple[str, bytes], ...]:
    ordered = tuple(sorted(files))
    if len(ordered) > MAX_FILES:
        raise MalformedMessage(f"{what}: more than {MAX_FILES} files")
    for index, (path, data) in enumerate(ordered):
        check_path(path, what=what)
        if index and ordered[index - 1][0] == path:
            raise MalformedMessage(f"{what}: duplicate path {path!r}")
        if not isinstance(data, bytes) or len(data) > MAX_FILE_BYTES:
            raise MalformedMessage(f"{what}.{path}: expected at most {MAX_FILE_BYTES} bytes")
    return ordered


def _decode_files(fields: cbor.Fields) -> tuple[tuple[str, bytes], ...]:
    if len(fields.keys()) > MAX_FILES:
        raise MalformedMessage(f"{fields.what}: more than {MAX_FILES} files")
    files = []
    paths = fields.keys()
    for path in paths:
        text = cbor.expect_str(path, what=f"{fields.what} key", max_len=MAX_PATH_CHARS)
        files.append((text, fields.get_bytes(text, max_size=MAX_FILE_BYTES)))
    return tuple(files)


# --- the manifest --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Manifest:
    """The vendor-signed description of a sealed image (DESIGN §7; docs/image-format.md §3)."""

    vendor_id: bytes
    class_id: bytes
    version: str
    security_counter: int
    payload_size: int
    ciphertext_sha256: bytes
    plaintext_sha256: bytes
    iv: bytes
    key_id: bytes
    min_runtime_version: str
    created_s: int
    entry_point: str = "main.py"
    component: str = COMPONENT_APP
    enc_alg: int = ENC_ALG_A256GCM
    format_version: int = MANIFEST_FORMAT_VERSION

    def __post_init__(self) -> None:
        what = "manifest"
        if self.format_version != MANIFEST_FORMAT_VERSION:
            raise MalformedMessage(f"{what}.format_version: expected {MANIFEST_FORMAT_VERSION}")
        if self.component != COMPONENT_APP:
            raise MalformedMessage(f"{what}.component: expected 'APP', got {self.component!r:.20}")
        if self.enc_alg != ENC_ALG_A256GCM:
            raise MalformedMessage(f"{what}.enc_alg: expected {ENC_ALG_A256GCM} (A256GCM)")
        _check_bytes(self.vendor_id, DIGEST_BYTES, what=f"{what}.vendor_id")
        _check_bytes(self.class_id, CLASS_ID_BYTES, what=f"{what}.class_id")
        _check_bytes(self.ciphertext_sha256, DIGEST_BYTES, what=f"{what}.ciphertext_sha256")
        _check_bytes(self.plaintext_sha256, DIGEST_BYTES, what=f"{what}.plaintext_sha256")
        _check_bytes(self.iv, IV_BYTES, what=f"{what}.iv")
        _check_bytes(self.key_id, KEY_ID_BYTES, what=f"{what}.key_id")
        check_version_text(self.version, what=f"{what}.version")
        check_version_text(self.min_runtime_version, what=f"{what}.min_runtime_version")
        check_path(self.entry_point, what=f"{what}.entry_point")
        _check_int(self.security_counter, MAX_COUNTER, what=f"{what}.security_counter")
        _check_int(self.payload_size, MAX_APP_BUNDLE_BYTES, what=f"{what}.payload_size")
        _check_int(self.created_s, MAX_TIME_S, what=f"{what}.created_s")

    def encode(self) -> bytes:
        """The canonical CBOR map with small integer keys (docs/image-format.md §3)."""
        return cbor.dumps(
            {
                1: self.format_version,
                2: self.vendor_id,
                3: self.class_id,
                4: self.component,
                5: self.version,
                6: self.security_counter,
                7: self.payload_size,
                8: self.ciphertext_sha256,
                9: self.plaintext_sha256,
                10: self.enc_alg,
                11: self.iv,
                12: self.key_id,
                13: self.min_runtime_version,
                14: self.created_s,
                15: self.entry_point,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Decode a manifest payload (the bytes inside the COSE_Sign1).

        Raises:
            MalformedMessage: not a well-formed version-1 manifest.
        """
        f = cbor.Fields(
            cbor.loads(data, what="manifest", max_bytes=MAX_MANIFEST_BYTES), what="manifest"
        ).only(_MANIFEST_KEYS)
        return cls(
            format_version=f.get_int(1),
            vendor_id=f.get_bytes(2),
            class_id=f.get_bytes(3),
            component=f.get_str(4, max_len=8),
            version=f.get_str(5, max_len=_MAX_VERSION_CHARS),
            security_counter=f.get_int(6),
            payload_size=f.get_int(7),
            ciphertext_sha256=f.get_bytes(8),
            plaintext_sha256=f.get_bytes(9),
            enc_alg=f.get_int(10),
            iv=f.get_bytes(11),
            key_id=f.get_bytes(12),
            min_runtime_version=f.get_str(13, max_len=_MAX_VERSION_CHARS),
            created_s=f.get_int(14),
            entry_point=f.get_str(15, max_len=MAX_PATH_CHARS),
        )


def associated_data(manifest: Manifest) -> bytes:
    """The GCM associated data: CBOR [format, vendor, class, version, counter, key id, IV] (§7)."""
    return cbor.dumps(
        [
            manifest.format_version,
            manifest.vendor_id,
            manifest.class_id,
            manifest.version,
            manifest.security_counter,
            manifest.key_id,
            manifest.iv,
        ]
    )


# --- the sealed image ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What an image prefix says: the manifest and where the ciphertext lies. Unverified."""

    manifest_bytes: bytes
    manifest: Manifest
    ciphertext_offset: int
    ciphertext_size: int


@dataclass(frozen=True, slots=True)
class SealedImage:
    """A parsed sealed image. ``manifest`` is UNVERIFIED until ``verify_manifest`` returns."""

    manifest_bytes: bytes
    manifest: Manifest
    #: A read-only view into the parsed image's bytes (no copy of the payload), or bytes.
    ciphertext: bytes | memoryview

    def encode(self) -> bytes:
        """The image bytes again (the inverse of ``parse_unverified_image``)."""
        return b"".join(
            (
                IMAGE_PREFIX,
                cbor.bstr_head(len(self.manifest_bytes)),
                self.manifest_bytes,
                cbor.bstr_head(len(self.ciphertext)),
                self.ciphertext,
            )
        )


def es256_signer_and_point(
    key: ec.EllipticCurvePrivateKey | cose.Es256Signer,
    public: ec.EllipticCurvePublicKey | None,
    *,
    what: str,
) -> tuple[cose.Es256Signer, bytes]:
    """A signer callable and the SEC1 point of its public key.

    A private key gives both; an ``Es256Signer`` (KMS, HSM) needs ``public`` beside it.

    Raises:
        TypeError: an ``Es256Signer`` was given without its public key, or a key is not P-256.
    """
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return cose.es256_signer(key), keys.p256_point(key.public_key())
    if public is None:
        raise TypeError(f"{what}: an Es256Signer needs its public key beside it")
    return key, keys.p256_point(public)


def seal_image(
    plaintext: bytes | Sequence[bytes],
    *,
    cek: bytes,
    iv: bytes,
    key_id: bytes,
    vendor_key: ec.EllipticCurvePrivateKey | cose.Es256Signer,
    class_id: bytes,
    version: str,
    security_counter: int,
    min_runtime_version: str,
    created_s: int,
    entry_point: str = "main.py",
    vendor_public: ec.EllipticCurvePublicKey | None = None,
) -> bytes:
    """Encrypt ``plaintext`` (an encoded app bundle) and sign its manifest; return the image bytes.

    ``plaintext`` may come in pieces (``AppBundle.encode_parts``): they are encrypted in turn,
    as if joined, without a copy of the whole.

    The CEK and IV come in as parameters (they are random at build time, chosen by the caller).
    ``vendor_public`` is needed only when ``vendor_key`` is an ``Es256Signer``.

    Raises:
        ValueError: a key, IV or id has the wrong size, or a field is out of range.
        TypeError: an ``Es256Signer`` without ``vendor_public``.
    """
    if len(cek) != CEK_BYTES:
        raise ValueError(f"CEK must be {CEK_BYTES} bytes, got {len(cek)}")
    parts: Sequence[bytes] = (plaintext,) if isinstance(plaintext, bytes) else plaintext
    signer, point = es256_signer_and_point(vendor_key, vendor_public, what="vendor_key")
    vendor_id = hashlib.sha256(point).digest()
    # Validates every field before any work on the payload; the digests are filled in below.
    draft = Manifest(
        vendor_id=vendor_id,
        class_id=class_id,
        version=version,
        security_counter=security_counter,
        payload_size=sum(len(part) for part in parts),
        ciphertext_sha256=bytes(DIGEST_BYTES),
        plaintext_sha256=bytes(DIGEST_BYTES),
        iv=iv,
        key_id=key_id,
        min_runtime_version=min_runtime_version,
        created_s=created_s,
        entry_point=entry_point,
    )
    # One buffer holds the whole image and the cipher writes the ciphertext in place
    # (docs/image-format.md §2): a 10 MiB seal then touches one fresh buffer, not three. The
    # signed manifest's length does not depend on the digests (fixed-size byte strings), so the
    # layout is known before the ciphertext exists.
    manifest_size = len(cose.sign1_create(draft.encode(), _placeholder_signer, kid=vendor_id))
    ciphertext_size = draft.payload_size + TAG_BYTES
    ciphertext_at = (
        len(IMAGE_PREFIX)
        + len(cbor.bstr_head(manifest_size))
        + manifest_size
        + len(cbor.bstr_head(ciphertext_size))
    )
    # BytesIO over a fresh bytes object it alone holds: getbuffer() writes into it and
    # getvalue() hands that same object back, without the copy bytes(bytearray) would make.
    out = io.BytesIO(bytes(ciphertext_at + ciphertext_size))
    with out.getbuffer() as view:
        plaintext_sha256 = _encrypt_into(
            cek, iv, associated_data(draft), parts, view[ciphertext_at:]
        )
        manifest = dataclasses.replace(
            draft,
            ciphertext_sha256=hashlib.sha256(view[ciphertext_at:]).digest(),
            plaintext_sha256=plaintext_sha256,
        )
        manifest_bytes = cose.sign1_create(manifest.encode(), signer, kid=vendor_id)
        if len(manifest_bytes) != manifest_size:  # an encoder change would break the layout
            raise ValueError("sealed manifest changed size after the digests were filled in")
        view[:ciphertext_at] = b"".join(
            (
                IMAGE_PREFIX,
                cbor.bstr_head(manifest_size),
                manifest_bytes,
                cbor.bstr_head(ciphertext_size),
            )
        )
    return out.getvalue()


def _encrypt_into(
    cek: bytes, iv: bytes, aad: bytes, parts: Sequence[bytes], out: memoryview
) -> bytes:
    """AES-256-GCM of the pieces joined, written to ``out`` (ciphertext, then the 16-byte tag);
    the SHA-256 of the plaintext."""
    if len(parts) == 1:  # one piece: the one-shot AEAD
        AESGCM(cek).encrypt_into(iv, parts[0], aad, out)
        return hashlib.sha256(parts[0]).digest()
    encryptor = Cipher(algorithms.AES(cek), modes.GCM(iv)).encryptor()
    encryptor.authenticate_additional_data(aad)
    digest = hashlib.sha256()
    at = 0
    for part in parts:  # ``out`` always has room: what is left of the plaintext + the tag
        at += encryptor.update_into(part, out[at:])
        digest.update(part)
    encryptor.finalize()
    out[at : at + TAG_BYTES] = encryptor.tag
    return digest.digest()


def _placeholder_signer(data: bytes) -> bytes:
    """An ``Es256Signer`` of the right size for measuring a manifest's length, never for use."""
    return bytes(64)


_HEAD_WIDTH: Final = {24: 1, 25: 2, 26: 4}
_HEAD_MIN: Final = {1: 24, 2: 0x100, 4: 0x1_0000}


def _read_bstr_head(data: bytes | memoryview, offset: int, what: str) -> tuple[int, int]:
    """Read a definite, shortest-form byte string head at ``offset``; return (length, next)."""
    if offset >= len(data):
        raise MalformedMessage(f"{what}: truncated before its head")
    initial = data[offset]
    if initial >> 5 != 2:
        raise MalformedMessage(f"{what}: expected a byte string, got major type {initial >> 5}")
    info = initial & 0x1F
    if info < 24:
        return info, offset + 1
    width = _HEAD_WIDTH.get(info)
    if width is None:
        raise MalformedMessage(f"{what}: unsupported length encoding {info}")
    end = offset + 1 + width
    if end > len(data):
        raise MalformedMessage(f"{what}: truncated head")
    length = int.from_bytes(data[offset + 1 : end], "big")
    if length < _HEAD_MIN[width]:
        raise MalformedMessage(f"{what}: length {length} not in its shortest form")
    return length, end


def parse_unverified_header(prefix: bytes) -> ImageHeader:
    """Parse the header of a sealed image from a prefix of it (``MAX_HEADER_BYTES`` suffice).

    Nothing is verified: the manifest is what the bytes say.

    Raises:
        MalformedMessage: the prefix does not start a well-formed version-1 sealed image.
    """
    what = "sealed image"
    if not isinstance(prefix, bytes | bytearray | memoryview):
        raise MalformedMessage(f"{what}: expected bytes, got {type(prefix).__name__}")
    view = memoryview(prefix)
    if bytes(view[: len(IMAGE_PREFIX)]) != IMAGE_PREFIX:
        raise MalformedMessage(f"{what}: expected the magic {IMAGE_PREFIX.hex()} at offset 0")
    size, start = _read_bstr_head(view, len(IMAGE_PREFIX), f"{what}.manifest")
    if size > MAX_MANIFEST_BYTES:
        raise MalformedMessage(f"{what}.manifest: {size} bytes exceeds {MAX_MANIFEST_BYTES}")
    if start + size > len(view):
        raise MalformedMessage(f"{what}.manifest: truncated")
    manifest_bytes = bytes(view[start : start + size])
    manifest = _decode_manifest_message(manifest_bytes)
    ct_size, ct_offset = _read_bstr_head(view, start + size, f"{what}.ciphertext")
    if ct_size != manifest.payload_size + TAG_BYTES:
        raise MalformedMessage(
            f"{what}.ciphertext: expected {manifest.payload_size + TAG_BYTES} bytes, got {ct_size}"
        )
    return ImageHeader(manifest_bytes, manifest, ct_offset, ct_size)


def _decode_manifest_message(manifest_bytes: bytes) -> Manifest:
    what = "sealed image.manifest"
    if manifest_bytes[:1] != b"\xd2":
        raise MalformedMessage(f"{what}: expected a COSE_Sign1 with tag 18")
    parsed = cose.sign1_parse_unverified(manifest_bytes)
    if parsed.alg is not cose.Algorithm.ES256:
        raise MalformedMessage(f"{what}: expected ES256, got {int(parsed.alg)}")
    manifest = Manifest.decode(parsed.payload)
    if parsed.kid != manifest.vendor_id:
        raise MalformedMessage(f"{what}: kid is not the manifest's vendor id")
    return manifest


def parse_unverified_image(data: bytes) -> SealedImage:
    """Parse a whole sealed image without verifying anything.

    Raises:
        MalformedMessage: not exactly one well-formed version-1 sealed image (truncated, trailing
            bytes, bad header).
    """
    header = parse_unverified_header(data)
    end = header.ciphertext_offset + header.ciphertext_size
    if len(data) != end:
        raise MalformedMessage(f"sealed image: expected {end} bytes, got {len(data)}")
    return SealedImage(
        manifest_bytes=header.manifest_bytes,
        manifest=header.manifest,
        ciphertext=memoryview(data).toreadonly()[header.ciphertext_offset :],
    )


def manifest_digest(image: SealedImage) -> bytes:
    """SHA-256 of the COSE_Sign1 manifest bytes: the app's measurement and release id (§5)."""
    return hashlib.sha256(image.manifest_bytes).digest()


def verify_manifest(
    image: SealedImage, trusted_vendors: Mapping[bytes, ec.EllipticCurvePublicKey]
) -> Manifest:
    """Verify the manifest signature and the ciphertext against it; return the verified manifest.

    Args:
        image: a parsed image.
        trusted_vendors: signer id (SHA-256 of the SEC1 point) → vendor public key.

    Raises:
        InvalidImage: unknown signer, bad signature, or a ciphertext that does not match.
    """
    try:
        parsed = cose.sign1_parse_unverified(image.manifest_bytes)
        manifest = Manifest.decode(parsed.payload)
    except MalformedMessage as err:
        raise InvalidImage("sealed image: manifest is malformed") from err
    key = trusted_vendors.get(manifest.vendor_id)
    if key is None:
        raise InvalidImage("sealed image: manifest signer is not trusted")
    try:
        cose.verify_parsed(parsed, key)
    except InvalidSignature as err:
        raise InvalidImage("sealed image: manifest signature does not verify") from err
    ciphertext = image.ciphertext
    if len(ciphertext) != manifest.payload_size + TAG_BYTES or not hmac.compare_digest(
        hashlib.sha256(ciphertext).digest(), manifest.ciphertext_sha256
    ):
        raise InvalidImage("sealed image: ciphertext does not match the manifest")
    return manifest


def open_image(
    image: SealedImage,
    cek: bytes,
    *,
    trusted_vendors: Mapping[bytes, ec.EllipticCurvePublicKey],
    min_security_counter: int,
    class_id: bytes | None = None,
) -> bytes:
    """Verify, check the counter and class, decrypt and check the plaintext; return the plaintext.

    The rollback check comes before decryption (DESIGN §5): an old image is refused even with the
    right key.

    Raises:
        ImageRolledBack: the security counter is below ``min_security_counter``.
        ImageClassMismatch: ``class_id`` is given and differs from the manifest's.
        InvalidImage: any other check failed (signer, signature, digests, decryption).
        ValueError: ``cek`` is not 32 bytes.
    """
    if len(cek) != CEK_BYTES:
        raise ValueError(f"CEK must be {CEK_BYTES} bytes, got {len(cek)}")
    manifest = verify_manifest(image, trusted_vendors)
    if manifest.security_counter < min_security_counter:
        raise ImageRolledBack("sealed image: security counter below the minimum")
    if class_id is not None and not hmac.compare_digest(manifest.class_id, class_id):
        raise ImageClassMismatch("sealed image: built for another class id")
    try:
        plaintext = AESGCM(cek).decrypt(manifest.iv, image.ciphertext, associated_data(manifest))
    except InvalidTag as err:
        raise InvalidImage("sealed image: payload does not decrypt") from err
    if not hmac.compare_digest(hashlib.sha256(plaintext).digest(), manifest.plaintext_sha256):
        raise InvalidImage("sealed image: plaintext does not match the manifest")
    return plaintext
