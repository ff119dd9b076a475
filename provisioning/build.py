"""``firmware build``: check an app, seal it, and sign its release bundle (DESIGN §7, §11).

The app bundle (sources and ``.mpy`` files, ``protocol.image.AppBundle``) is encrypted under a
fresh AES-256 CEK with a fresh IV, both from the RNG given (``os.urandom`` in the CLI). The CEK is
never written in clear: it stays in memory until it is HPKE-wrapped (RFC 9180) to the gateway's
X25519 key inside the release bundle. Two files are written, all or nothing::

    PRODUCT-VERSION.sealed    the sealed image (what devices download)
    PRODUCT-VERSION.release   the release bundle for the gateway, signed by the firmware key
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec, x25519

from protocol import bundles, image
from protocol.errors import MalformedMessage, UsageError
from protocol.ids import Product, class_id
from protocol.image import Manifest
from provisioning import files
from provisioning.firmware import Board, CheckReport, check_app

SEALED_SUFFIX: Final = ".sealed"
RELEASE_SUFFIX: Final = ".release"
DEFAULT_MIN_RUNTIME: Final = "0.0.0"

#: Randomness: n → n random bytes (``os.urandom``, or a seeded source in tests).
Random = Callable[[int], bytes]


@dataclass(frozen=True, slots=True)
class ReleaseSpec:
    """What to build: the product, the version and counter, the runtime it needs."""

    product: Product
    version: str
    security_counter: int
    min_runtime_version: str = DEFAULT_MIN_RUNTIME

    def __post_init__(self) -> None:
        image.check_version_text(self.version, what="--version")
        image.check_version_text(self.min_runtime_version, what="--min-runtime")
        if not 0 <= self.security_counter <= image.MAX_COUNTER:
            raise UsageError(f"--security-counter: expected 0..{image.MAX_COUNTER}")

    @property
    def stem(self) -> str:
        """The output files' name without suffix: ``PRODUCT-VERSION``."""
        return f"{self.product}-{self.version}"


@dataclass(frozen=True, slots=True)
class SealedRelease:
    """A built release: the sealed image, the signed release bundle and the manifest's digest."""

    image: bytes
    release: bytes
    manifest: Manifest
    manifest_digest: bytes


@dataclass(frozen=True, slots=True)
class BuildResult:
    """What ``firmware build`` wrote."""

    sealed_path: Path
    release_path: Path
    release: SealedRelease
    files: tuple[str, ...]


def app_bundle(report: CheckReport) -> image.AppBundle:
    """The app bundle of a passed check: every source and its ``.mpy``, entry point ``main.py``.

    Raises:
        UsageError: a file name the bundle format refuses (e.g. a space in a path).
    """
    try:
        return image.AppBundle(
            sources=tuple(report.sources().items()), compiled=tuple(report.compiled().items())
        )
    except MalformedMessage as err:
        raise UsageError(f"app: {err}") from err


def seal_app(
    bundle: image.AppBundle,
    spec: ReleaseSpec,
    *,
    firmware_key: ec.EllipticCurvePrivateKey,
    created_s: int,
    random: Random,
) -> tuple[bytes, bytes]:
    """Encrypt ``bundle`` under a fresh CEK and IV and sign its manifest (DESIGN §7).

    Returns:
        The sealed image and its CEK. The CEK is for :func:`release_bundle` to wrap, in memory;
        nothing writes it.
    """
    cek = random(image.CEK_BYTES)
    sealed = image.seal_image(
        bundle.encode_parts(),  # sealed piece by piece: no copy of the whole bundle
        cek=cek,
        iv=random(image.IV_BYTES),
        key_id=random(image.KEY_ID_BYTES),
        vendor_key=firmware_key,
        class_id=class_id(spec.product),
        version=spec.version,
        security_counter=spec.security_counter,
        min_runtime_version=spec.min_runtime_version,
        created_s=created_s,
        entry_point=bundle.entry_point,
    )
    return sealed, cek


def release_bundle(
    sealed: bytes,
    cek: bytes,
    spec: ReleaseSpec,
    *,
    firmware_key: ec.EllipticCurvePrivateKey,
    gateway_hpke_key: x25519.X25519PublicKey,
    created_s: int,
) -> SealedRelease:
    """The signed release bundle of a sealed image: its reference value and its wrapped CEK."""
    header = image.parse_unverified_header(sealed)  # the header only: no copy of the payload
    # protocol.image.manifest_digest: SHA-256 of the COSE_Sign1 manifest bytes (DESIGN §5).
    digest = hashlib.sha256(header.manifest_bytes).digest()
    release = bundles.ReleaseBundle(
        product=spec.product,
        image=sealed,
        reference_value=bundles.ReferenceValue(
            component=bundles.ComponentType.APP,
            measurement=digest,
            version=spec.version,
            signer_id=header.manifest.vendor_id,
            security_counter=spec.security_counter,
        ),
        wrapped_cek=bundles.wrap_release_cek(cek, gateway_hpke_key, digest),
        created_s=created_s,
    )
    signed = bundles.sign_bundle(release, firmware_key)
    return SealedRelease(sealed, signed, header.manifest, digest)


def seal_release(
    bundle: image.AppBundle,
    spec: ReleaseSpec,
    *,
    firmware_key: ec.EllipticCurvePrivateKey,
    gateway_hpke_key: x25519.X25519PublicKey,
    created_s: int,
    random: Random,
) -> SealedRelease:
    """Seal ``bundle`` and sign its release bundle (no files; pure but for the RNG).

    Returns:
        The image and the release bundle bytes; the CEK is in the latter only HPKE-wrapped.
    """
    sealed, cek = seal_app(
        bundle, spec, firmware_key=firmware_key, created_s=created_s, random=random
    )
    return release_bundle(
        sealed,
        cek,
        spec,
        firmware_key=firmware_key,
        gateway_hpke_key=gateway_hpke_key,
        created_s=created_s,
    )


def output_paths(out_dir: Path, spec: ReleaseSpec) -> tuple[Path, Path]:
    """The sealed image's and the release bundle's paths in ``out_dir``."""
    return out_dir / (spec.stem + SEALED_SUFFIX), out_dir / (spec.stem + RELEASE_SUFFIX)


def build_firmware(
    app_dir: Path,
    spec: ReleaseSpec,
    *,
    board: Board,
    firmware_key: ec.EllipticCurvePrivateKey,
    gateway_hpke_key: x25519.X25519PublicKey,
    out_dir: Path,
    created_s: int,
    random: Random,
    force: bool = False,
) -> BuildResult:
    """Check the app, seal it and write ``PRODUCT-VERSION.sealed`` and ``.release`` (both or none).

    Raises:
        FirmwareCheckError: the app does not pass ``firmware check``.
        OutputExists: an output exists and ``force`` is false (checked before any work).
        UsageError: a missing app or output directory, an unusable file name.
    """
    sealed_path, release_path = output_paths(out_dir, spec)
    for path in (sealed_path, release_path):
        files.check_output_file(path, force=force)
    report = check_app(app_dir, board=board)
    built = seal_release(
        app_bundle(report),
        spec,
        firmware_key=firmware_key,
        gateway_hpke_key=gateway_hpke_key,
        created_s=created_s,
        random=random,
    )
    files.write_files(
        [files.OutputFile(sealed_path, built.image), files.OutputFile(release_path, built.release)],
        force=force,
    )
    return BuildResult(sealed_path, release_path, built, tuple(f.path for f in report.files))
