"""``manufacture``: make a batch of devices and its signed enrollment bundle (DESIGN §4, §5, §7).

Per device, ``device.factory`` burns the fuses (a fresh HUK from the RNG, the ROTPK hash, secure
boot, counters), writes the signed boot stages into flash and issues both device certificates
from the manufacturer CA. The runtime stage carries the batch's trust anchors: the vendor's
firmware signer id and the gateway's result key. The HUK is handed to the factory and kept nowhere
else: it lives only in the device's fuses file.

Devices are made a few at a time on threads (the factory mostly waits on fsync) and enrolled in
id order. The batch is built in a staging directory beside ``OUT``, synced, and renamed into place
at the end, so a failure leaves nothing behind::

    OUT/DEVICE_ID/          one device's home: fuses.bin (0600), flash.bin (stages, certificates),
                            device.json
    OUT/enrollment.bundle   signed by the manufacturer CA key: product, certificates, initial
                            counters and the boot stages' reference values
"""

from __future__ import annotations

import datetime
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from device import factory
from protocol import bundles, image
from protocol.errors import UsageError
from protocol.ids import DeviceId, Product, class_id, device_id
from protocol.keys import HUK_BYTES
from protocol.stage import TrustAnchors
from provisioning import files

ENROLLMENT_FILE: Final = "enrollment.bundle"
DEFAULT_STAGE_VERSION: Final = "1.0.0"
DEFAULT_STAGE_COUNTER: Final = 1
#: Devices made at once: the factory mostly waits on fsync, so a few threads overlap the waits.
DEFAULT_WORKERS: Final = 4

#: Randomness: n → n random bytes (``os.urandom``).
Random = Callable[[int], bytes]


class FlashSize(StrEnum):
    """The boards' flash layout (``device.factory``).

    STANDARD has two 16 MiB slots (~34 MiB of flash file per board); SMALL has two 1 MiB slots
    (~2 MiB per board), for tests, demos and benchmarks.
    """

    STANDARD = "standard"
    SMALL = "small"


@dataclass(frozen=True, slots=True)
class StageVersions:
    """The versions and security counters the factory builds BL2 and the runtime stage with."""

    bl2_version: str = DEFAULT_STAGE_VERSION
    bl2_counter: int = DEFAULT_STAGE_COUNTER
    runtime_version: str = DEFAULT_STAGE_VERSION
    runtime_counter: int = DEFAULT_STAGE_COUNTER

    def __post_init__(self) -> None:
        image.check_version_text(self.bl2_version, what="--bl2-version")
        image.check_version_text(self.runtime_version, what="--runtime-version")
        for name, value in (
            ("--bl2-counter", self.bl2_counter),
            ("--runtime-counter", self.runtime_counter),
        ):
            if not 0 <= value <= image.MAX_COUNTER:
                raise UsageError(f"{name}: expected 0..{image.MAX_COUNTER}, got {value}")


@dataclass(frozen=True, slots=True)
class BatchSpec:
    """A batch: the product, how many devices, their id prefix, secure boot, the stage versions."""

    product: Product
    count: int
    prefix: str
    secure_boot: bool = True
    stages: StageVersions = StageVersions()
    flash: FlashSize = FlashSize.STANDARD

    def __post_init__(self) -> None:
        if not 1 <= self.count <= bundles.MAX_DEVICES:
            raise UsageError(f"--count: expected 1..{bundles.MAX_DEVICES}, got {self.count}")
        device_ids(self.prefix, self.count)  # every id must be valid before anything is made


@dataclass(frozen=True, slots=True)
class FactoryKeys:
    """The vendor workspace's keys the factory uses."""

    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    rotpk: ec.EllipticCurvePrivateKey
    #: The device certificates' notBefore (less the factory's clock-skew margin).
    now: datetime.datetime


@dataclass(frozen=True, slots=True)
class Batch:
    """A manufactured batch: where it is, and its (signed) enrollment bundle."""

    out_dir: Path
    enrollment_path: Path
    enrollment: bundles.EnrollmentBundle
    enrollment_signed: bytes


def device_ids(prefix: str, count: int) -> tuple[DeviceId, ...]:
    """The ids of a batch: ``PREFIX-0001`` … (at least four digits).

    Raises:
        MalformedMessage: an id would not be a valid device id (bad prefix, too long).
    """
    width = max(4, len(str(count)))
    return tuple(device_id(f"{prefix}-{index:0{width}d}") for index in range(1, count + 1))


def manufacture_batch(
    out_dir: Path,
    spec: BatchSpec,
    *,
    keys: FactoryKeys,
    anchors: TrustAnchors,
    created_s: int,
    random: Random,
    force: bool = False,
    on_device: Callable[[DeviceId], None] | None = None,
    workers: int = DEFAULT_WORKERS,
) -> Batch:
    """Manufacture ``spec.count`` devices into ``out_dir`` and sign their enrollment bundle.

    Devices are made by ``workers`` threads (the factory mostly waits on fsync), and enrolled
    in id order. Before the batch is renamed into place, ``os.sync`` makes every file durable.

    Args:
        random: the RNG the HUKs come from (32 bytes per device); called from the worker
            threads, so it must be thread-safe (``os.urandom`` is).
        on_device: called in the caller's thread after each device, in id order (a progress bar).
        workers: how many devices are made at once (1: one after the other).

    Raises:
        OutputExists: ``out_dir`` is a non-empty directory and ``force`` is false.
        OutputError: its parent directory is missing.
        UsageError: the factory refused a parameter.
    """
    enrolled: list[bundles.EnrolledDevice] = []
    references: list[bundles.ReferenceValue] = []
    with files.staged_directory(out_dir, force=force) as staging:

        def make(dev: DeviceId) -> factory.ManufacturedDevice:
            return _make_device(staging / dev, dev, spec, keys, anchors, random)

        for made in _in_order(make, device_ids(spec.prefix, spec.count), workers):
            enrolled.append(made.enrolled())
            references += [rv for rv in made.reference_values if rv not in references]
            if on_device is not None:
                on_device(made.device_id)
        enrollment = bundles.EnrollmentBundle(
            product=spec.product,
            class_id=class_id(spec.product),
            devices=tuple(enrolled),
            reference_values=tuple(references),
            created_s=created_s,
        )
        signed = bundles.sign_bundle(enrollment, keys.ca_key)
        files.write_file(staging / ENROLLMENT_FILE, signed)
        os.sync()  # the factory fsyncs the fuses, not the flash files: make the whole batch durable
    return Batch(out_dir, out_dir / ENROLLMENT_FILE, enrollment, signed)


def _in_order(
    make: Callable[[DeviceId], factory.ManufacturedDevice],
    ids: Sequence[DeviceId],
    workers: int,
) -> Iterator[factory.ManufacturedDevice]:
    """``make`` each id on a thread pool, at most ``4 × workers`` in flight; yield in id order.

    On any failure (or when the consumer stops) the devices not yet started are cancelled and
    the running ones finished before the error propagates, so the caller can clean up.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    window = 4 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="factory") as pool:
        pending: deque[Future[factory.ManufacturedDevice]] = deque()
        try:
            for dev in ids:
                pending.append(pool.submit(make, dev))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _make_device(
    home: Path,
    dev: DeviceId,
    spec: BatchSpec,
    keys: FactoryKeys,
    anchors: TrustAnchors,
    random: Random,
) -> factory.ManufacturedDevice:
    """One device through the factory; the HUK goes from the RNG straight into its fuses."""
    home.mkdir(mode=files.DIRECTORY_MODE)
    stages = spec.stages
    small = spec.flash is FlashSize.SMALL
    return factory.manufacture(
        home,
        device_id=dev,
        product=spec.product,
        huk=random(HUK_BYTES),
        ca_key=keys.ca_key,
        ca_cert=keys.ca_cert,
        rotpk=keys.rotpk,
        secure_boot=spec.secure_boot,
        anchors=anchors,
        bl2_version=stages.bl2_version,
        bl2_counter=stages.bl2_counter,
        runtime_version=stages.runtime_version,
        runtime_counter=stages.runtime_counter,
        layout=factory.small_layout() if small else factory.standard_layout(),
        now=keys.now,
    )
