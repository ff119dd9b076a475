"""``scripts/bench protocol``: the protocol's operations beside the primitives they rest on."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocol import grant, image, keys, psa
from protocol.attester import AttesterSession, ChallengeReceived
from protocol.ids import DeviceId, ReleaseId, SessionId, class_id, product
from protocol.reasons import Status
from protocol.results import TrustVector
from protocol.verifier import (
    Accepted,
    Appraisal,
    AppraisalRequest,
    ChallengeIssued,
    DeviceKeys,
    KeyRelease,
    VerifierConfig,
    VerifierSession,
)
from scripts.benchmarks.timing import Figure, bursts_interleaved, combined, report

MIB = 1 << 20
DEVICE = DeviceId("bench-0001")
NOW = 1_800_000_000


def _claims(nonce: bytes, iak: ec.EllipticCurvePrivateKey) -> psa.PsaClaims:
    component = psa.SoftwareComponent(
        measurement_value=bytes(32), signer_id=bytes(32), measurement_type="RT", version="1.0.0"
    )
    return psa.PsaClaims(
        profile=psa.PROFILE_RFC9783,
        client_id=1,
        lifecycle=psa.Lifecycle.SECURED,
        implementation_id=bytes(32),
        boot_seed=bytes(32),
        instance_id=keys.instance_id(iak.public_key()),
        nonce=nonce,
        software_components=(component, component, component),
    )


def raw_primitives(payload: bytes) -> dict[str, Callable[[], object]]:
    """The raw primitives the protocol's operations rest on, to be timed in this run."""
    key = ec.generate_private_key(ec.SECP256R1())
    data = os.urandom(200)
    sig = key.sign(data, ec.ECDSA(hashes.SHA256()))
    aes = AESGCM(os.urandom(32))
    iv = os.urandom(12)
    ciphertext = aes.encrypt(iv, payload, b"aad")
    recipient = x25519.X25519PrivateKey.generate()
    return {
        "es256_sign": lambda: key.sign(data, ec.ECDSA(hashes.SHA256())),
        "es256_verify": lambda: key.public_key().verify(sig, data, ec.ECDSA(hashes.SHA256())),
        "aes_gcm_decrypt": lambda: aes.decrypt(iv, ciphertext, b"aad"),
        "aes_gcm_encrypt": lambda: aes.encrypt(iv, payload, b"aad"),
        "sha256": lambda: hashlib.sha256(payload).digest(),
        "hpke_seal": lambda: grant._SUITE.encrypt(
            bytes(32), recipient.public_key(), info=b"x" * 32
        ),
    }


class _Hooks:
    def __init__(self, iak: ec.EllipticCurvePrivateKey, appraisal: Appraisal) -> None:
        self.keys = DeviceKeys(iak.public_key())
        self.appraisal = appraisal

    def device_keys(self, device_id: DeviceId) -> DeviceKeys | None:
        return self.keys

    def appraise(self, request: AppraisalRequest) -> Appraisal:
        return self.appraisal


def main() -> int:
    """Measure and print; exit 1 when a target is missed."""
    rng = random.Random(1)
    payload = rng.randbytes(MIB)
    iak = keys.derive_iak(bytes(32), 0x30)
    vendor = ec.generate_private_key(ec.SECP256R1())
    token = psa.sign_token(_claims(bytes(32), iak), iak)
    cek = os.urandom(32)
    cls = class_id(product("bench"))

    def seal(iv: bytes) -> bytes:
        return image.seal_image(
            payload,
            cek=cek,
            iv=iv,
            key_id=bytes(16),
            vendor_key=vendor,
            class_id=cls,
            version="1.0.0",
            security_counter=1,
            min_runtime_version="1.0.0",
            created_s=NOW,
        )

    sealed = seal(os.urandom(12))
    parsed = image.parse_unverified_image(sealed)
    vendors = {keys.signer_id(vendor.public_key()): vendor.public_key()}
    enclave = x25519.X25519PrivateKey.generate()
    sid = SessionId(bytes(16))
    digest = image.manifest_digest(parsed)
    a_grant = grant.seal_grant(
        cek, enclave.public_key(), device_id=DEVICE, session_id=sid, manifest_digest=digest
    )
    result_key = ec.generate_private_key(ec.SECP256R1())
    appraisal = Appraisal(
        status=Status.AFFIRMING,
        reasons=(),
        trust_vector=TrustVector(),
        policy_version=1,
        release=KeyRelease(
            cek=cek,
            manifest_digest=digest,
            release_id=ReleaseId(digest.hex()),
            image_size=len(sealed),
        ),
    )
    config = VerifierConfig(secret=bytes(32), result_signer=result_key)
    hooks = _Hooks(iak, appraisal)

    def exchange_evidence() -> bytes:
        attester = AttesterSession(DEVICE, SessionId(rng.randbytes(16)), timeout_s=5)
        issued = VerifierSession(config, hooks, DEVICE).receive_data(
            attester.start(now_s=NOW, certificates=()), now_s=NOW, randomness=rng.randbytes
        )
        assert isinstance(issued, ChallengeIssued)
        event = attester.receive_data(issued.payload)
        assert isinstance(event, ChallengeReceived)
        enclave_raw = keys.x25519_raw(enclave.public_key())
        signed = psa.sign_token(_claims(event.binding_for(enclave_raw), iak), iak)
        return attester.send_evidence(token=signed, enclave_key=enclave_raw, now_s=NOW)

    evidences = [exchange_evidence() for _ in range(64)]
    counter = iter(range(1 << 30))

    def verifier_side() -> None:
        # A fresh instance each time: the stateless rebuild path, as a second gateway would do.
        outcome = VerifierSession(config, hooks, DEVICE).receive_data(
            evidences[next(counter) % len(evidences)], now_s=NOW, randomness=rng.randbytes
        )
        assert isinstance(outcome, Accepted)

    operations: dict[str, Callable[[], object]] = {
        "token sign": lambda: psa.sign_token(_claims(bytes(32), iak), iak),
        "token verify": lambda: psa.verify_token(token, iak.public_key()),
        "image seal (1 MiB)": lambda: seal(bytes(12)),
        "image open (1 MiB)": lambda: image.open_image(
            image.parse_unverified_image(sealed),
            cek,
            trusted_vendors=vendors,
            min_security_counter=0,
        ),
        "grant seal": lambda: grant.seal_grant(
            cek, enclave.public_key(), device_id=DEVICE, session_id=sid, manifest_digest=digest
        ),
        "grant open": lambda: grant.open_grant(
            a_grant, enclave, device_id=DEVICE, session_id=sid, manifest_digest=digest
        ),
        "verifier side of an exchange": verifier_side,
    }
    # Each operation timed in turn with the primitives of its own bound, and nothing else: the
    # ratio then compares figures taken over the same minutes and the same cache conditions (the
    # 1 MiB operations, interleaved with everything, evicted the small ones' working set).
    bounds: dict[str, tuple[tuple[str, ...], float | None]] = {
        "token sign": (("es256_sign",), None),
        "token verify": (("es256_verify",), 0.8),
        "image seal (1 MiB)": (("es256_sign", "aes_gcm_encrypt", "sha256", "sha256"), None),
        "image open (1 MiB)": (("es256_verify", "aes_gcm_decrypt", "sha256", "sha256"), 0.8),
        "grant seal": (("hpke_seal",), None),
        "grant open": ((), None),
        "verifier side of an exchange": (("es256_verify", "hpke_seal", "es256_sign"), 0.5),
    }
    primitives = raw_primitives(payload)
    figures = []
    for name, operation in operations.items():
        parts, target = bounds[name]
        bursts = bursts_interleaved({name: operation, **{p: primitives[p] for p in parts}})
        bound = combined(*(bursts.rate(p) for p in parts)) if parts else None
        paired = bursts.ratio(name, parts) if parts else None
        figures.append(Figure(name, bursts.rate(name), bound, target, paired))
    ok = report("edgeseal protocol benchmark", figures)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
