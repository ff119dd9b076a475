"""The refusal matrix of issue #4 over a real mosquitto, against the real gateway service.

One gateway runs for the whole module (``tests.scripted_fleet.world_context``) on the session's
mosquitto; every case scripts its own device (``protocol.attester.AttesterSession``) under its own
device id, so the cases share nothing but the trusted CA, the reference values and one release.
Each refusal must reach the device as a refusal carrying exactly the expected reason codes and
nothing else (no grant, no explanation text), and must be kept for operators: a contraindicated
verdict in the registry with the explainer's sentences, and a verdict entry in the ledger. Refused
hellos are the exception by design (``gateway.service``): they are counted, never recorded, so a
flood of them cannot fill the ledger.

Gateway time is the wall clock plus a skew the expired-challenge case moves forward, so that case
needs no sleep.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.broker import Broker
from gateway.explain import Explanation, explain, parse_explanation_json
from gateway.ledger import LedgerKind
from gateway.policy import load_policy
from gateway.service import RateLimits
from protocol import cbor, cose, image, keys, messages, psa, topics
from protocol.bundles import ComponentType
from protocol.ids import Product, SessionId
from protocol.reasons import ReasonCode, Status
from protocol.results import verify_result
from tests.scripted_fleet import (
    PRODUCT,
    Fleet,
    FleetDevice,
    Outcome,
    Release,
    World,
    add_reference_values,
    enroll_device,
    publish_release,
    trust,
    world_context,
)

#: A product whose epoch the update case raises above the device's app counter.
UPDATE_PRODUCT = Product("boiler")
#: A product whose epoch the below-epoch case raises above the assigned release.
OVERTAKEN_PRODUCT = Product("kettle")
EPOCH = 2
#: The update case's chunk size: small, so the image comes in several chunks.
CHUNK_BYTES = 128


class SkewedClock:
    """Gateway time: the wall clock plus a skew that only ever grows (ledger times stay ordered)."""

    def __init__(self) -> None:
        """Start with no skew."""
        self._skew_s = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        """Seconds since the epoch, skewed."""
        with self._lock:
            return time.time() + self._skew_s

    def advance(self, seconds: float) -> None:
        """Move gateway time ``seconds`` ahead of the wall clock for good."""
        with self._lock:
            self._skew_s += seconds


@dataclass
class Bench:
    """The module's gateway, its clock, and the release assigned to ordinary devices."""

    world: World
    clock: SkewedClock
    release: Release

    @property
    def fleet(self) -> Fleet:
        """The trusted manufacturer's fleet."""
        return self.world.fleet

    def enrolled(
        self, name: str, *, release: Release | None = None, assign: bool = True
    ) -> FleetDevice:
        """A device of the trusted fleet, enrolled and (unless ``assign`` is off) assigned
        ``release`` (the module's release by default)."""
        chosen = release or self.release
        device = self.fleet.make_device(name, product=chosen.product)
        enroll_device(self.world.registry, device)
        if assign:
            self.world.registry.assign(device.device_id, chosen.release_id, now_s=2)
        return device

    def attest(
        self,
        device: FleetDevice,
        *,
        app_counter: int = 1,
        make_token: Callable[[bytes], bytes] | None = None,
        before_evidence: Callable[[], None] | None = None,
    ) -> Outcome:
        """One attestation of ``device`` over the broker (connect, attest, disconnect)."""
        scripted = self.world.device(device)
        try:
            return scripted.attest(
                app_counter=app_counter, make_token=make_token, before_evidence=before_evidence
            )
        finally:
            scripted.close()

    def product_with_release(self, product: Product, counter: int) -> Release:
        """Reference values for ``product`` and a published release of it at ``counter``."""
        add_reference_values(self.world.registry, self.fleet, product)
        release = self.fleet.make_release(300, counter, product=product)
        publish_release(self.world.registry, self.world.kms, release)
        return release


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory, broker: Broker) -> Iterator[Bench]:
    """One gateway for the module: the fleet's CA trusted, its stages referenced, a release."""
    clock = SkewedClock()
    home = tmp_path_factory.mktemp("refusals")
    rng = random.Random(0xED6E5EA1)
    with world_context(home, broker, rng, RateLimits(), clock=clock) as world:
        trust(world.registry, world.fleet)
        add_reference_values(world.registry, world.fleet, PRODUCT)
        release = world.fleet.make_release(500)
        publish_release(world.registry, world.kms, release)
        yield Bench(world, clock, release)


# --- the cases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """What a case did: the device, how its last exchange ended, and the grants it got before
    that exchange (only the replay case has one: the genuine exchange it replays)."""

    device: FleetDevice
    outcome: Outcome
    earlier_grants: int = 0


#: A case: given the bench and a fresh device id, make the device misbehave once.
Scenario = Callable[[Bench, str], Refusal]


def _revoked(bench: Bench, name: str) -> Refusal:
    device = bench.enrolled(name)
    bench.world.registry.revoke_device(device.device_id, reason="reported stolen", now_s=3)
    return Refusal(device, bench.attest(device))


def _bad_signature(bench: Bench, name: str) -> Refusal:
    device = bench.enrolled(name)
    clone = ec.generate_private_key(ec.SECP256R1())  # a cloned flash on another board
    return Refusal(
        device,
        bench.attest(device, make_token=lambda n: bench.fleet.token(device, n, signing_key=clone)),
    )


def _untrusted_ca(bench: Bench, name: str) -> Refusal:
    rogue = Fleet(random.Random(7))  # another manufacturer, whose CA the operator never trusted
    device = rogue.make_device(name)
    enroll_device(bench.world.registry, device)
    bench.world.registry.assign(device.device_id, bench.release.release_id, now_s=2)
    # The trusted fleet's stages: only the certificate chain is wrong.
    return Refusal(device, bench.attest(device))


def _debug_class_key(bench: Bench, name: str) -> Refusal:
    # The key class alone is judged here (the lifecycle claimed is SECURED); an unlocked board's
    # debug lifecycle is the lifecycle cases' finding.
    device = bench.enrolled(name)

    def token(nonce: bytes) -> bytes:
        return bench.fleet.token(device, nonce, signing_key=device.debug_iak)

    return Refusal(device, bench.attest(device, make_token=token))


def _wrong_binding(bench: Bench, name: str) -> Refusal:
    device = bench.enrolled(name)

    def token(nonce: bytes) -> bytes:
        return bench.fleet.token(device, bytes([nonce[0] ^ 1]) + nonce[1:])

    return Refusal(device, bench.attest(device, make_token=token))


def _replayed_challenge(bench: Bench, name: str) -> Refusal:
    device = bench.enrolled(name)
    scripted = bench.world.device(device)
    try:
        genuine = scripted.attest()
        assert genuine.cek == bench.release.cek, genuine.refused
        reply = scripted.send_attest(genuine.evidence)
    finally:
        scripted.close()
    refusal = messages.decode_attest_down(reply)
    assert isinstance(refusal, messages.Refusal), refusal
    replayed = Outcome(refused=refusal.reasons, session_id=genuine.session_id, reply=reply)
    return Refusal(device, replayed, earlier_grants=1)


def _expired_challenge(bench: Bench, name: str) -> Refusal:
    device = bench.enrolled(name)
    ttl_s = load_policy(bench.world.registry).challenge_ttl_s
    return Refusal(
        device, bench.attest(device, before_evidence=lambda: bench.clock.advance(ttl_s + 1))
    )


def _lifecycle(state: psa.Lifecycle) -> Scenario:
    def scenario(bench: Bench, name: str) -> Refusal:
        device = bench.enrolled(name)

        def token(nonce: bytes) -> bytes:
            return bench.fleet.token(device, nonce, lifecycle=int(state))

        return Refusal(device, bench.attest(device, make_token=token))

    return scenario


def _stage_modified(stage: ComponentType) -> Scenario:
    def scenario(bench: Bench, name: str) -> Refusal:
        device = bench.enrolled(name)
        modified = {stage: bench.fleet.rng.randbytes(32)}

        def token(nonce: bytes) -> bytes:
            return bench.fleet.token(device, nonce, measurements=modified)

        return Refusal(device, bench.attest(device, make_token=token))

    return scenario


def _image_below_epoch(bench: Bench, name: str) -> Refusal:
    release = bench.product_with_release(OVERTAKEN_PRODUCT, counter=EPOCH - 1)
    device = bench.enrolled(name, release=release)
    bench.world.registry.set_epoch(OVERTAKEN_PRODUCT, EPOCH, now_s=3)
    # The device already runs at the epoch: only the assigned image is below it.
    return Refusal(device, bench.attest(device, app_counter=EPOCH))


def _not_assigned(bench: Bench, name: str) -> Refusal:
    device = bench.enrolled(name, assign=False)
    return Refusal(device, bench.attest(device))


#: Each boot stage the genuine token measures, with the code its mismatch must produce.
BOOT_STAGE_CODES = {
    ComponentType.BL2: ReasonCode.BOOT_BL2_MISMATCH,
    ComponentType.RUNTIME: ReasonCode.BOOT_RUNTIME_MISMATCH,
}

#: (case id, scenario, the reason codes the device must receive, in order).
EVIDENCE_CASES: list[tuple[str, Scenario, tuple[ReasonCode, ...]]] = [
    ("revoked-device", _revoked, (ReasonCode.DEVICE_REVOKED,)),
    ("bad-signature", _bad_signature, (ReasonCode.EVIDENCE_SIGNATURE_INVALID,)),
    ("untrusted-ca", _untrusted_ca, (ReasonCode.CERTIFICATE_UNTRUSTED,)),
    ("debug-class-key", _debug_class_key, (ReasonCode.CERTIFICATE_DEBUG_CLASS,)),
    ("wrong-binding", _wrong_binding, (ReasonCode.EVIDENCE_BINDING_MISMATCH,)),
    ("replayed-challenge", _replayed_challenge, (ReasonCode.NONCE_REPLAYED,)),
    ("expired-challenge", _expired_challenge, (ReasonCode.CHALLENGE_EXPIRED,)),
    *(
        (
            f"lifecycle-{state.name.lower().replace('_', '-')}",
            _lifecycle(state),
            (ReasonCode.LIFECYCLE_DEBUG,),
        )
        for state in (psa.Lifecycle.NON_PSA_ROT_DEBUG, psa.Lifecycle.RECOVERABLE_PSA_ROT_DEBUG)
    ),
    *(
        (f"boot-{stage.name.lower()}-mismatch", _stage_modified(stage), (code,))
        for stage, code in BOOT_STAGE_CODES.items()
    ),
    ("image-below-epoch", _image_below_epoch, (ReasonCode.IMAGE_BELOW_EPOCH,)),
    ("image-not-assigned", _not_assigned, (ReasonCode.APP_NOT_ASSIGNED,)),
]


# --- what every refusal must show ----------------------------------------------------------------


def assert_device_gets_codes_only(outcome: Outcome, expected: tuple[ReasonCode, ...]) -> None:
    """The device received a refusal with exactly ``expected``: no verdict, no grant, no text."""
    assert outcome.verdict is None and outcome.cek is None
    assert outcome.refused == expected
    # Byte for byte the refusal of those codes: nothing else (explanations, grants) rides along.
    sent = messages.Refusal(session_id=SessionId(outcome.session_id), reasons=expected)
    assert outcome.reply == sent.encode()


def assert_explained(found: Explanation, device: FleetDevice) -> None:
    """``found`` is the explainer's account of its code: every sentence there, the cause and fix
    the explainer's own (with or without the device's product filled in)."""
    code = ReasonCode(found.code)
    assert all((found.claim, found.expected, found.got, found.cause, found.fix)), found
    plain = {
        (made.cause, made.fix)
        for made in (
            explain(code, device=device.device_id, product=device.product),
            explain(code, device=device.device_id),
        )
    }
    assert (found.cause, found.fix) in plain


def assert_recorded(bench: Bench, refusal: Refusal, expected: tuple[ReasonCode, ...]) -> None:
    """The registry holds a contraindicated, explained verdict for the session, the ledger its
    entry, and no key was released for it."""
    device_id, session_id = refusal.device.device_id, refusal.outcome.session_id
    registry, ledger = bench.world.registry, bench.world.ledger
    record = registry.verdicts(device_id)[-1]
    assert (record.session_id, record.status) == (session_id, Status.CONTRAINDICATED)
    assert record.reasons == tuple(code.value for code in expected)
    explanations = parse_explanation_json(record.explanation_json)
    assert {found.code for found in explanations} == set(record.reasons)
    for found in explanations:
        assert_explained(found, refusal.device)
    entries = ledger.entries(device_id)
    verdicts = [cbor.loads(e.body, what="verdict") for e in entries if e.kind is LedgerKind.VERDICT]
    logged = verdicts[-1]
    assert isinstance(logged, dict)
    assert (logged["session_id"], logged["reasons"]) == (session_id, list(record.reasons))
    releases = [e for e in entries if e.kind is LedgerKind.RELEASE]
    assert len(releases) == len(registry.receipts(device_id)) == refusal.earlier_grants
    assert bench.world.service.counters["internal.error"] == 0


# --- the matrix ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [pytest.param(scenario, codes, id=name) for name, scenario, codes in EVIDENCE_CASES],
)
def test_refused_with_its_code_explained_and_no_grant(
    bench: Bench,
    request: pytest.FixtureRequest,
    scenario: Scenario,
    expected: tuple[ReasonCode, ...],
) -> None:
    """Each refusal case reaches the device as its reason codes only, with no grant, and is
    recorded for operators with the explainer's sentences."""
    name = f"dev-{request.node.callspec.id}"
    refusal = scenario(bench, name)
    assert_device_gets_codes_only(refusal.outcome, expected)
    assert_recorded(bench, refusal, expected)


def test_unknown_device_is_refused_at_hello_counted_not_recorded(
    bench: Bench, caplog: pytest.LogCaptureFixture
) -> None:
    """A device the registry does not hold is refused ``device.unknown`` at its hello, with no
    challenge and no grant; the refusal is counted, never recorded (flood-proof), and logged
    (at most once a minute per reason) with the explainer's cause and fix."""
    service = bench.world.service
    before = service.counters["attest.refused.device.unknown"]
    ghost = bench.fleet.make_device("ghost-unknown")
    with caplog.at_level(logging.WARNING, logger="gateway.service"):
        outcome = bench.attest(ghost)
    advice = explain(ReasonCode.DEVICE_UNKNOWN, device=ghost.device_id)
    logged = [r.getMessage() for r in caplog.records if "device.unknown" in r.getMessage()]
    assert logged and advice.fix in logged[0] and ghost.device_id in logged[0], logged
    assert outcome.evidence == b""  # refused before any challenge
    assert_device_gets_codes_only(outcome, (ReasonCode.DEVICE_UNKNOWN,))
    assert service.counters["attest.refused.device.unknown"] == before + 1
    assert bench.world.registry.verdicts(ghost.device_id) == ()
    assert bench.world.ledger.entries(ghost.device_id) == ()
    sentence = explain(ReasonCode.DEVICE_UNKNOWN, device=ghost.device_id)
    assert sentence.cause and sentence.fix


def test_every_boot_stage_the_token_carries_has_a_mismatch_case(bench: Bench) -> None:
    """The matrix covers each boot stage a genuine token measures and the reference values hold."""
    device = bench.fleet.make_device("dev-stages")
    token = bench.fleet.token(device, bytes(32))
    claims = psa.decode_claims(cose.sign1_parse_unverified(token).payload)
    carried = {component.measurement_type for component in claims.software_components}
    referenced = {value.component.value for value in bench.fleet.reference_values()}
    assert carried == referenced == {stage.value for stage in BOOT_STAGE_CODES}


# --- the accepted controls -----------------------------------------------------------------------


def test_genuine_device_is_affirmed_and_its_grant_opens(bench: Bench) -> None:
    """The control: a genuine, enrolled, assigned device gets an affirming result and a grant
    that opens to the release's key, recorded with its receipt."""
    device = bench.enrolled("dev-genuine")
    outcome = bench.attest(device)
    assert outcome.verdict is not None, outcome.refused
    assert outcome.cek == bench.release.cek
    result = verify_result(
        outcome.verdict.result,
        bench.world.kms.result_public_key(),
        device_id=device.device_id,
        session_id=outcome.verdict.session_id,
        now_s=int(bench.clock()),
    )
    assert (result.status, result.reasons) == (Status.AFFIRMING, ())
    record = bench.world.registry.verdicts(device.device_id)[-1]
    assert (record.status, record.reasons) == (Status.AFFIRMING, ())
    assert len(bench.world.registry.receipts(device.device_id)) == 1


def test_update_to_the_assigned_release_is_granted_and_served_in_chunks(bench: Bench) -> None:
    """A device below its product's epoch is granted the assigned release at the epoch (the
    releasable warning) and downloads it chunk by chunk; it reassembles and opens."""
    release = bench.product_with_release(UPDATE_PRODUCT, counter=EPOCH)
    bench.world.registry.set_epoch(UPDATE_PRODUCT, EPOCH, now_s=3)
    device = bench.enrolled("dev-update", release=release)
    scripted = bench.world.device(device)
    try:
        outcome = scripted.attest(app_counter=EPOCH - 1)
        assert outcome.verdict is not None and outcome.cek == release.cek, outcome.refused
        size = outcome.verdict.image_size
        assert size == len(release.image)
        assembled, chunks = bytearray(), 0
        while len(assembled) < size:
            scripted.fetch(release.release_id, len(assembled), CHUNK_BYTES)
            chunk = messages.Chunk.decode(scripted.receive(topics.Channel.CHUNK))
            assert (chunk.offset, chunk.total_size) == (len(assembled), size)
            assembled, chunks = assembled + chunk.data, chunks + 1
    finally:
        scripted.close()
    assert outcome.verdict.release_id == release.release_id
    assert bytes(assembled) == release.image and chunks == -(-size // CHUNK_BYTES) > 1
    result = verify_result(
        outcome.verdict.result,
        bench.world.kms.result_public_key(),
        device_id=device.device_id,
        session_id=outcome.verdict.session_id,
        now_s=int(bench.clock()),
    )
    assert (result.status, result.reasons) == (Status.WARNING, (ReasonCode.COUNTER_BELOW_EPOCH,))
    vendor = bench.fleet.vendor_key.public_key()
    sealed = image.parse_unverified_image(bytes(assembled))
    image.open_image(
        sealed,
        outcome.cek,
        trusted_vendors={keys.signer_id(vendor): vendor},
        min_security_counter=EPOCH,
    )
    assert len(bench.world.registry.receipts(device.device_id)) == 1
