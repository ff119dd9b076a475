"""``scripts/bench provision``: manufacturing rate and sealing throughput beside their bounds.

- manufacture: 1,000 devices through ``provisioning.manufacture.manufacture_batch`` (the factory,
  fuses with their fsyncs, flash, certificates, the signed enrollment bundle, the final sync) with
  the factory's *small* flash layout (two 1 MiB slots, ~2 MiB per board; the standard layout
  writes ~34 MiB of erased flash per board). Target: at least 100 devices/s.
- seal: ``provisioning.build.seal_app`` of a 10 MiB app bundle (mpy-cross excluded: the bundle
  is built from random bytes): encrypt the bundle's CBOR pieces in turn into the image buffer,
  hash ciphertext and plaintext, sign the manifest. Compared with 1 / (AES-256-GCM + 2 × SHA-256
  + ES256 sign) of the same 10 MiB, measured in the same run, interleaved. Target ratio ≥ 0.8.
- release build: ``provisioning.build.seal_release`` (the seal, then the CEK HPKE-wrapped and the
  release bundle signed, which hashes the image once more), beside its own bound.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocol import bundles, keys
from protocol.ids import product
from protocol.image import AppBundle
from protocol.stage import TrustAnchors
from provisioning import build, manufacture, vendor
from scripts.benchmarks.timing import Figure, bursts_interleaved, combined, report

MIB = 1 << 20
DEVICES = 1000
TARGET_DEVICES_PER_S = 100.0
BUNDLE_BYTES = 10 * MIB
NOW_S = 1_800_000_000


def manufacture_rate(work: Path, workspace: vendor.Vendor) -> float:
    """Devices per second over one batch of ``DEVICES`` (small flash layout)."""
    factory_keys = manufacture.FactoryKeys(
        ca_key=workspace.private_key(vendor.Role.CA, None),
        ca_cert=workspace.ca_certificate(),
        rotpk=workspace.private_key(vendor.Role.ROTPK, None),
        now=datetime.datetime.now(datetime.UTC),
    )
    result_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    anchors = TrustAnchors((workspace.firmware.signer_id,), keys.p256_point(result_key))
    spec = manufacture.BatchSpec(
        product("bench"), DEVICES, "bench", flash=manufacture.FlashSize.SMALL
    )
    start = time.perf_counter()
    manufacture.manufacture_batch(
        work / "fleet",
        spec,
        keys=factory_keys,
        anchors=anchors,
        created_s=NOW_S,
        random=os.urandom,
    )
    elapsed = time.perf_counter() - start
    shutil.rmtree(work / "fleet")
    return DEVICES / elapsed


def ten_mib_bundle() -> AppBundle:
    """An app bundle of about 10 MiB: ten 1 MiB sources and their fake ``.mpy`` beside them."""
    rng = random.Random(7)
    half = BUNDLE_BYTES // 2 // 10
    sources = [(f"mod{i}.py", rng.randbytes(half)) for i in range(9)]
    sources.append(("main.py", rng.randbytes(half)))
    compiled = [(path[:-3] + ".mpy", rng.randbytes(half)) for path, _ in sources]
    return AppBundle(sources=tuple(sources), compiled=tuple(compiled))


def seal_figures(workspace: vendor.Vendor) -> list[Figure]:
    """Sealing a 10 MiB bundle, and the whole release build, beside their primitives' bounds."""
    bundle = ten_mib_bundle()
    payload = bundle.encode()
    firmware_key = workspace.private_key(vendor.Role.FIRMWARE, None)
    hpke = x25519.X25519PrivateKey.generate().public_key()
    spec = build.ReleaseSpec(product("bench"), "1.0.0", 1)
    aes = AESGCM(os.urandom(32))
    iv = os.urandom(12)
    digest = os.urandom(32)

    def seal() -> object:
        return build.seal_app(
            bundle, spec, firmware_key=firmware_key, created_s=NOW_S, random=os.urandom
        )

    def release() -> object:
        return build.seal_release(
            bundle,
            spec,
            firmware_key=firmware_key,
            gateway_hpke_key=hpke,
            created_s=NOW_S,
            random=os.urandom,
        )

    # The seal and its primitives timed in turn (bursts of 0.3 s: several 10 MiB seals each).
    bursts = bursts_interleaved(
        {
            "aes": lambda: aes.encrypt(iv, payload, b"aad"),
            "sha": lambda: hashlib.sha256(payload).digest(),
            "sign": lambda: firmware_key.sign(digest, ec.ECDSA(hashes.SHA256())),
            "hpke": lambda: bundles.wrap_release_cek(digest, hpke, digest),
            "seal": seal,
            "release": release,
        },
        rounds=7,
        burst_s=0.3,
    )
    seal_parts = ("aes", "sha", "sha", "sign")
    # The release bundle's signature hashes the whole image once more (COSE_Sign1 over it).
    release_parts = ("aes", "sha", "sha", "sha", "sign", "sign", "hpke")
    seal_bound = combined(*(bursts.rate(part) for part in seal_parts))
    release_bound = combined(*(bursts.rate(part) for part in release_parts))
    return [
        Figure(
            "seal 10 MiB app bundle",
            bursts.rate("seal"),
            seal_bound,
            0.8,
            bursts.ratio("seal", seal_parts),
        ),
        Figure(
            "release build, 10 MiB (seal+wrap+sign)",
            bursts.rate("release"),
            release_bound,
            paired_ratio=bursts.ratio("release", release_parts),
        ),
    ]


def main() -> int:
    """Measure and print; exit 1 when a target is missed."""
    with tempfile.TemporaryDirectory(prefix="edgeseal-bench-") as tmp:
        work = Path(tmp)
        workspace = vendor.init_vendor(work / "vendor", now=datetime.datetime.now(datetime.UTC))
        devices_per_s = manufacture_rate(work, workspace)
        seals = seal_figures(workspace)
    figures = [
        # The bound of this figure is the target rate itself, so "ratio ≥ 1" is "≥ 100/s".
        Figure(
            f"manufacture {DEVICES} devices (small flash), devices/s",
            devices_per_s,
            TARGET_DEVICES_PER_S,
            1.0,
        ),
        *seals,
    ]
    ok = report("edgeseal provisioning benchmark", figures)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
