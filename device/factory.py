"""The board's manufacturing face: boot stages, fuses, flash and device certificates (DESIGN §3–§5).

Provisioning calls this module and nothing else of ``device``. A manufactured board is a home
directory holding ``fuses.bin`` (read only by the RoT process), ``flash.bin`` (public: partition
table, signed BL2 and runtime stages, the certificates, application slots) and ``device.json``
(public: device id and product). Two X.509 certificates are made by the manufacturer CA, subject
CN = device id: one over the SECURED-class IAK, one over the debug-class IAK, marked with
OU = "debug" (DESIGN §4). The flash partition "certs" holds both DER certificates as a blob of
canonical CBOR ``{"v": 1, "secured": der, "debug": der}``.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from device.enclave.stages import BL2_TEMPLATE, RUNTIME_TEMPLATE, render
from device.hardware.flash import FLASH_FILE, KIB, MIB, Flash, FlashLayout
from device.hardware.fuses import DEFAULT_COUNTERS, FUSES_FILE, Fuses, Lifecycle
from device.hardware.slots import SlotStore
from device.rot.service import BOOT_COUNTER, IMPLEMENTATION_ID
from protocol import cbor, ids, keys
from protocol.bundles import ComponentType, EnrolledDevice, ReferenceValue
from protocol.errors import UsageError
from protocol.ids import DeviceId, Product
from protocol.stage import (
    BootStage,
    StageKind,
    TrustAnchors,
    build_stage,
    parse_unverified_stage,
    stage_measurement,
    stage_signer_id,
)

DEVICE_FILE: Final = "device.json"
CERTS_PARTITION: Final = "certs"
DEBUG_OU: Final = "debug"
CERT_VALIDITY_DAYS: Final = 20 * 365
DEBUG_CLASS: Final = Lifecycle.NON_PSA_ROT_DEBUG >> 8
SECURED_CLASS: Final = Lifecycle.SECURED >> 8
_STAGE_PARTITION: Final = {StageKind.BL2: "bl2", StageKind.RUNTIME: "runtime"}


class FactoryError(UsageError):
    """Manufacture was asked for something impossible (an existing board, a bad layout)."""


@dataclass(frozen=True, slots=True)
class BuiltStage:
    """A boot-stage flash image and its reference value (the measurement the gateway expects)."""

    image: bytes
    reference: ReferenceValue


@dataclass(frozen=True, slots=True)
class ManufacturedDevice:
    """What the factory hands provisioning: identity, certificates, references, counters."""

    device_id: DeviceId
    product: Product
    home: Path
    cert_secured_der: bytes
    cert_debug_der: bytes
    reference_values: tuple[ReferenceValue, ...]
    counters: tuple[tuple[str, int], ...]
    implementation_id: bytes

    def enrolled(self) -> EnrolledDevice:
        """This device as an enrollment bundle entry."""
        return EnrolledDevice(
            device_id=self.device_id,
            cert_secured_der=self.cert_secured_der,
            cert_debug_der=self.cert_debug_der,
            counters=self.counters,
        )


def small_layout() -> FlashLayout:
    """A compact flash layout for tests and demos: 4 KiB sectors, 1 MiB slots."""
    return FlashLayout.build(
        [
            ("bl2", 32 * KIB),
            ("runtime", 64 * KIB),
            (CERTS_PARTITION, 8 * KIB),
            ("slot_a", 1 * MIB),
            ("slot_b", 1 * MIB),
            ("nvstore", 8 * KIB),
            ("trailer", 8 * KIB),
        ]
    )


def standard_layout() -> FlashLayout:
    """The board's full layout (16 MiB slots) with the certificates partition."""
    return FlashLayout.build(
        [
            ("bl2", 256 * KIB),
            ("runtime", 1 * MIB),
            (CERTS_PARTITION, 16 * KIB),
            ("slot_a", 16 * MIB + 4 * KIB),
            ("slot_b", 16 * MIB + 4 * KIB),
            ("nvstore", 64 * KIB),
            ("trailer", 8 * KIB),
        ]
    )


# --- boot stages ---------------------------------------------------------------------------------


def build_bl2(version: str, counter: int, rotpk: ec.EllipticCurvePrivateKey | None) -> BuiltStage:
    """BL2 from its template, signed by ``rotpk`` (unsigned when None)."""
    code = render(BL2_TEMPLATE, version=version)
    return _build(BootStage(StageKind.BL2, version, counter, code), rotpk)


def build_runtime(
    version: str,
    counter: int,
    anchors: TrustAnchors,
    rotpk: ec.EllipticCurvePrivateKey | None,
    code: str | None = None,
) -> BuiltStage:
    """The runtime stage carrying ``anchors``, from its template or from custom ``code``.

    Custom code lets tests and the attack bench build a modified runtime: it runs with ``BOOT``
    and ``STAGE`` in scope (see ``device.enclave.stages``) and is measured like any other.
    """
    source = render(RUNTIME_TEMPLATE, version=version) if code is None else code.encode()
    return _build(BootStage(StageKind.RUNTIME, version, counter, source, anchors), rotpk)


def _build(stage: BootStage, rotpk: ec.EllipticCurvePrivateKey | None) -> BuiltStage:
    image = build_stage(stage, rotpk)
    parsed = parse_unverified_stage(image)
    component = ComponentType.BL2 if stage.kind is StageKind.BL2 else ComponentType.RUNTIME
    reference = ReferenceValue(
        component=component,
        measurement=stage_measurement(parsed),
        version=stage.version,
        signer_id=stage_signer_id(parsed),
        security_counter=stage.security_counter,
    )
    return BuiltStage(image, reference)


def flash_stage(home: Path, stage: BuiltStage | bytes) -> None:
    """Write a boot-stage image into its partition of ``home``'s flash (factory or attacker)."""
    image = stage.image if isinstance(stage, BuiltStage) else stage
    kind = parse_unverified_stage(image).stage.kind
    Flash.open(home / FLASH_FILE).write_blob(_STAGE_PARTITION[kind], image)


# --- manufacture ---------------------------------------------------------------------------------


def manufacture(
    home: Path,
    *,
    device_id: str,
    product: str,
    huk: bytes,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    rotpk: ec.EllipticCurvePrivateKey | None,
    secure_boot: bool,
    anchors: TrustAnchors,
    bl2_version: str = "1.0.0",
    bl2_counter: int = 1,
    runtime_version: str = "1.0.0",
    runtime_counter: int = 1,
    counters: Mapping[str, int] | None = None,
    layout: FlashLayout | None = None,
    lifecycle: int = Lifecycle.SECURED,
    now: datetime.datetime | None = None,
) -> ManufacturedDevice:
    """Manufacture one board in ``home``: fuses, flash with both stages, certificates.

    Args:
        rotpk: the boot-stage signing key; None builds unsigned stages (a development board,
            which then needs ``secure_boot=False`` to boot) and burns no ROTPK hash.
        counters: initial fuse counters (default: "bl2", "runtime", "app", "offline_boots" at 0;
            the stage counters start at the stages' own).
        layout: the flash layout (default ``standard_layout()``; tests pass ``small_layout()``).
        now: the certificates' notBefore (default: the current time).

    Raises:
        FactoryError: ``home`` already holds a board, or secure boot is asked without a ROTPK.
    """
    device = ids.device_id(device_id)
    prod = ids.product(product)
    if secure_boot and rotpk is None:
        raise FactoryError("secure boot needs a ROTPK to verify the stages against")
    home.mkdir(parents=True, exist_ok=True)
    if (home / FUSES_FILE).exists() or (home / FLASH_FILE).exists():
        raise FactoryError(f"{home}: a board is manufactured there already")
    bl2 = build_bl2(bl2_version, bl2_counter, rotpk)
    runtime = build_runtime(runtime_version, runtime_counter, anchors, rotpk)
    initial = _initial_counters(counters, bl2_counter, runtime_counter)
    rotpk_hash = None if rotpk is None else keys.signer_id(rotpk.public_key())
    Fuses.burn(
        home / FUSES_FILE,
        device_id=device,
        product=prod,
        lifecycle=lifecycle,
        secure_boot=secure_boot,
        huk=huk,
        rotpk_hash=rotpk_hash,
        counters={**initial, BOOT_COUNTER: 0},
    )
    secured_der, debug_der = _certificates(device, huk, ca_key, ca_cert, now)
    flash = Flash.create(home / FLASH_FILE, layout or standard_layout())
    flash.write_blob("bl2", bl2.image)
    flash.write_blob("runtime", runtime.image)
    flash.write_blob(
        CERTS_PARTITION, cbor.dumps({"v": 1, "secured": secured_der, "debug": debug_der})
    )
    (home / DEVICE_FILE).write_text(json.dumps({"device_id": device, "product": prod}) + "\n")
    return ManufacturedDevice(
        device_id=device,
        product=prod,
        home=home,
        cert_secured_der=secured_der,
        cert_debug_der=debug_der,
        reference_values=(bl2.reference, runtime.reference),
        counters=tuple(sorted(initial.items())),
        implementation_id=IMPLEMENTATION_ID,
    )


def _initial_counters(
    counters: Mapping[str, int] | None, bl2_counter: int, runtime_counter: int
) -> dict[str, int]:
    base = dict.fromkeys(DEFAULT_COUNTERS, 0)
    base.update({"bl2": bl2_counter, "runtime": runtime_counter})
    if counters is not None:
        base.update(counters)
    if BOOT_COUNTER in base:
        raise FactoryError(f"counter name {BOOT_COUNTER!r} is reserved for the boot count")
    return base


def install_image(home: Path, image: bytes) -> str:
    """Put a sealed image in a slot as the confirmed primary (manufacture, tests). The slot name."""
    return SlotStore(Flash.open(home / FLASH_FILE)).install(image)


def read_certificates(home: Path) -> tuple[bytes, bytes]:
    """The (SECURED, debug) DER certificates from the board's flash (the NW sends them).

    Raises:
        FactoryError: the partition does not hold the certificates.
    """
    try:
        blob = Flash.open(home / FLASH_FILE).read_blob(CERTS_PARTITION)
        f = cbor.Fields(cbor.loads(blob, what="certs", max_bytes=64 * KIB), what="certs")
        f.get_int("v", lo=1, hi=1)
        return f.get_bytes("secured"), f.get_bytes("debug")
    except (ValueError, UsageError) as err:
        raise FactoryError(f"{home}: no readable certificates in flash ({err})") from err


# --- certificates --------------------------------------------------------------------------------


def iak_public(huk: bytes, lifecycle_class: int) -> ec.EllipticCurvePublicKey:
    """The IAK public key of a HUK in a lifecycle class (what the certificates certify)."""
    return keys.derive_iak(huk, lifecycle_class).public_key()


def _certificates(
    device: DeviceId,
    huk: bytes,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    now: datetime.datetime | None,
) -> tuple[bytes, bytes]:
    start = now or datetime.datetime.now(datetime.UTC)
    secured = _certificate(device, iak_public(huk, SECURED_CLASS), (), ca_key, ca_cert, start)
    debug = _certificate(device, iak_public(huk, DEBUG_CLASS), (DEBUG_OU,), ca_key, ca_cert, start)
    return secured, debug


def _certificate(
    device: DeviceId,
    public: ec.EllipticCurvePublicKey,
    units: Sequence[str],
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    start: datetime.datetime,
) -> bytes:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, device)]
    attributes += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit) for unit in units]
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(int.from_bytes(os.urandom(16), "big") >> 1)
        .not_valid_before(start - datetime.timedelta(minutes=5))
        .not_valid_after(start + datetime.timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)
