"""Appraisal of verified evidence against policy, reference values and epochs (DESIGN §5, §10).

The verifier session (``protocol.verifier``) has already checked the challenge, the token
signature under an enrolled IAK, the binding and single use. ``appraise`` judges everything else
and collects EVERY finding — it never stops at the first (keylime's failure model):

- identity: the key class (a debug-class token → ``certificate.debug_class``); the enrolled
  certificate of that class chains to a trusted manufacturer CA (``certificate.untrusted``), is
  valid now (``certificate.expired``), carries the enrolled IAK and names the device
  (``certificate.mismatch``); instance id = 0x01 ‖ SHA-256(enrolled IAK point)
  (``certificate.mismatch``); revocation (``device.revoked``); the token profile;
- lifecycle: class (``value >> 8``) SECURED, else ``lifecycle.debug`` / ``lifecycle.not_secured``;
- boot chain: BL2 and the runtime stage against the product's reference values — measurement
  (``boot.bl2.mismatch``, ``boot.runtime.mismatch``), signer id (``boot.signer.mismatch``),
  presence (``boot.stage.missing``), and a genuine but older stage than the newest reference
  (``boot.stage.rollback``, unless the policy allows older stages);
- counters: the ``app`` fuse counter against the product's epoch (``counter.below_epoch``, a
  warning: the device needs the update); every fuse counter against what the registry last saw
  (``counter.rollback``);
- platform flags against the policy (secure boot, debug port, SMT);
- the application: an APP component must name a release of the device's product; the device's
  assigned release must exist (``app.not_assigned`` / ``app.unknown_release``) and its security
  counter must be at least the product's epoch (``image.below_epoch``, fatal).

Status is the worst severity of the findings (``protocol.reasons``); the AR4SI trust vector is
filled from them. Every finding carries an ``Explanation`` (``gateway.explain``); the device only
ever gets the reason codes. This module reads nothing itself: the caller (``gateway.hooks``)
passes what the registry holds.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.explain import (
    MEASUREMENTS_SKIPPED,
    Explanation,
    explain,
    explain_skipped_measurements,
)
from gateway.policy import LifecycleRule, Policy
from gateway.registry import (
    DeviceRecord,
    ReferenceValue,
    ReleaseRecord,
    TrustAnchor,
    TrustAnchorKind,
)
from protocol import keys, psa
from protocol.bundles import ComponentType
from protocol.ids import DeviceId, Product, ReleaseId, SessionId
from protocol.reasons import REASONS, ReasonCode, Severity, Status, status_of, worst
from protocol.results import Ar4si, Lease, TrustVector, tier_of
from protocol.verifier import Appraisal, AppraisalRequest, KeyClass, KeyRelease

#: The fuse counter that holds the running image's security counter (docs/token.md).
APP_COUNTER: Final = "app"
#: The boot stages checked, their mismatch code and their name for people.
_STAGES: Final = (
    (ComponentType.BL2, ReasonCode.BOOT_BL2_MISMATCH, "BL2"),
    (ComponentType.RUNTIME, ReasonCode.BOOT_RUNTIME_MISMATCH, "the runtime stage"),
)
_DEBUG_CLASSES: Final = frozenset(
    {
        psa.lifecycle_class(psa.Lifecycle.NON_PSA_ROT_DEBUG),
        psa.lifecycle_class(psa.Lifecycle.RECOVERABLE_PSA_ROT_DEBUG),
    }
)
_SECURED_CLASS: Final = psa.lifecycle_class(psa.Lifecycle.SECURED)
_MAX_NAME: Final = 120
#: Parsed certificates and certificate-signature checks kept per process (pure memos on bytes).
CERTIFICATE_CACHE_SIZE: Final = 4096

#: Looks a release up by id in the registry (``Registry.find_release``).
FindRelease = Callable[[ReleaseId], ReleaseRecord | None]


@dataclass(frozen=True, slots=True)
class Finding:
    """One finding of the appraisal: its reason code and its explanation for people."""

    code: ReasonCode
    explanation: Explanation

    @property
    def severity(self) -> Severity:
        """The finding's severity (the default of its code, ``protocol.reasons``)."""
        return REASONS[self.code].severity


@dataclass(frozen=True, slots=True)
class AppraisalOutcome:
    """Everything the appraisal concluded: status, findings, vector and the release judged."""

    device_id: DeviceId
    session_id: SessionId
    #: The device's product (None when the device is unknown).
    product: Product | None
    status: Status
    findings: tuple[Finding, ...]
    trust_vector: TrustVector
    policy_version: int
    #: The product's security epoch at appraisal time.
    epoch: int
    #: The device's assigned release, when it exists (even if a finding refuses it).
    release: ReleaseRecord | None
    #: True when made under the policy's ``skip_measurement_checks`` (never silent).
    measurements_skipped: bool = False

    @property
    def reasons(self) -> tuple[ReasonCode, ...]:
        """The reason codes, each once, in the order found: all the device ever sees."""
        return tuple(dict.fromkeys(finding.code for finding in self.findings))

    @property
    def explanations(self) -> tuple[Explanation, ...]:
        """One explanation per finding, then the skipped-measurements marker when set."""
        found = tuple(finding.explanation for finding in self.findings)
        if not self.measurements_skipped:
            return found
        product = "" if self.product is None else self.product
        return (*found, explain_skipped_measurements(self.device_id, product))

    @property
    def recorded_reasons(self) -> tuple[str, ...]:
        """The reasons as recorded in the registry: the codes plus the marker when set."""
        codes = tuple(code.value for code in self.reasons)
        return (*codes, MEASUREMENTS_SKIPPED) if self.measurements_skipped else codes

    def with_findings(self, findings: Iterable[Finding]) -> AppraisalOutcome:
        """This outcome with more findings; status and trust vector recomputed."""
        return conclude(
            device_id=self.device_id,
            session_id=self.session_id,
            product=self.product,
            findings=(*self.findings, *findings),
            policy_version=self.policy_version,
            epoch=self.epoch,
            release=self.release,
            measurements_skipped=self.measurements_skipped,
        )

    def to_appraisal(
        self, release: KeyRelease | None = None, lease: Lease | None = None
    ) -> Appraisal:
        """The verifier session's view: status, reason codes, vector, and what to release."""
        return Appraisal(
            status=self.status,
            reasons=self.reasons,
            trust_vector=self.trust_vector,
            policy_version=self.policy_version,
            release=release,
            lease=lease,
        )


def conclude(
    *,
    device_id: DeviceId,
    session_id: SessionId,
    product: Product | None,
    findings: Sequence[Finding],
    policy_version: int,
    epoch: int,
    release: ReleaseRecord | None,
    measurements_skipped: bool = False,
) -> AppraisalOutcome:
    """Build an outcome: status = worst severity (at least warning when measurements were
    skipped), trust vector = the findings' AR4SI values over the baseline."""
    codes = tuple(dict.fromkeys(finding.code for finding in findings))
    status = status_of(codes)
    vector = TrustVector.from_reasons(codes)
    if measurements_skipped:
        status = worst((status, Status.WARNING))
        vector = _executables_unverified(vector)
    return AppraisalOutcome(
        device_id=device_id,
        session_id=session_id,
        product=product,
        status=status,
        findings=tuple(findings),
        trust_vector=vector,
        policy_version=policy_version,
        epoch=epoch,
        release=release,
        measurements_skipped=measurements_skipped,
    )


def _executables_unverified(vector: TrustVector) -> TrustVector:
    """Lower the executables claim to warning (32) unless a finding already made it worse."""
    if tier_of(vector.executables) in (None, Status.AFFIRMING):
        return replace(vector, executables=int(Ar4si.WARNING))
    return vector


def unknown_device(request: AppraisalRequest, policy: Policy) -> AppraisalOutcome:
    """The outcome for evidence from a device the registry does not (or no longer) hold."""
    finding = Finding(
        ReasonCode.DEVICE_UNKNOWN, explain(ReasonCode.DEVICE_UNKNOWN, device=request.device_id)
    )
    return conclude(
        device_id=request.device_id,
        session_id=request.session_id,
        product=None,
        findings=(finding,),
        policy_version=policy.version,
        epoch=0,
        release=None,
    )


def failure(outcome: AppraisalOutcome, code: ReasonCode, *, got: str) -> AppraisalOutcome:
    """``outcome`` with one more finding of ``code`` (e.g. ``internal.error``)."""
    product = "" if outcome.product is None else outcome.product
    explanation = explain(code, device=outcome.device_id, product=product, got=got)
    return outcome.with_findings((Finding(code, explanation),))


# --- the appraisal -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Context:
    """What every check reads: the request, the device record and the policy."""

    request: AppraisalRequest
    device: DeviceRecord
    policy: Policy

    @property
    def claims(self) -> psa.PsaClaims:
        return self.request.claims

    def finding(
        self, code: ReasonCode, *, expected: str | None = None, got: str | None = None
    ) -> Finding:
        """A finding of ``code`` explained for this device."""
        explanation = explain(
            code,
            device=self.device.device_id,
            product=self.device.product,
            expected=expected,
            got=got,
        )
        return Finding(code, explanation)


def appraise(
    request: AppraisalRequest,
    *,
    device: DeviceRecord,
    policy: Policy,
    anchors: Sequence[TrustAnchor],
    reference_values: Sequence[ReferenceValue],
    epoch: int,
    assigned: ReleaseId | None,
    find_release: FindRelease,
) -> AppraisalOutcome:
    """Appraise verified evidence, collecting every finding.

    Args:
        request: the verified evidence from the verifier session.
        device: the device's registry record (its id is the request's).
        policy: the policy in force.
        anchors: the trusted manufacturer CAs.
        reference_values: the reference values of the device's product.
        epoch: the product's security epoch.
        assigned: the release assigned to the device, if any.
        find_release: looks a release up in the registry.

    Returns:
        The outcome; its ``release`` is the assigned release when the registry holds it.
    """
    ctx = _Context(request, device, policy)
    skip = policy.skip_measurement_checks
    release, release_findings = _check_release(ctx, epoch, assigned, find_release)
    findings = [
        *_check_profile(ctx),
        *_check_identity(ctx, anchors),
        *_check_revocation(ctx),
        *_check_lifecycle(ctx),
        *([] if skip else _check_boot(ctx, reference_values)),
        *_check_counters(ctx, epoch),
        *_check_platform(ctx),
        *_check_app_component(ctx, find_release),
        *release_findings,
    ]
    return conclude(
        device_id=request.device_id,
        session_id=request.session_id,
        product=device.product,
        findings=findings,
        policy_version=policy.version,
        epoch=epoch,
        release=release,
        measurements_skipped=skip,
    )


def _check_profile(ctx: _Context) -> list[Finding]:
    if ctx.claims.profile in ctx.policy.accepted_profiles:
        return []
    expected = "one of " + ", ".join(ctx.policy.accepted_profiles)
    return [ctx.finding(ReasonCode.EVIDENCE_PROFILE_UNSUPPORTED, expected=expected)]


def _check_revocation(ctx: _Context) -> list[Finding]:
    device = ctx.device
    if not device.revoked:
        return []
    reason = (device.revoke_reason or "no reason given")[:_MAX_NAME]
    got = f"revoked at gateway time {device.revoked_at_s}: {reason}"
    return [ctx.finding(ReasonCode.DEVICE_REVOKED, got=got)]


# --- identity: key class, certificate, instance id -----------------------------------------------


def _check_identity(ctx: _Context, anchors: Sequence[TrustAnchor]) -> list[Finding]:
    device = ctx.device
    findings: list[Finding] = []
    if ctx.request.key_class is KeyClass.SECURED:
        cert_der, point = device.cert_secured_der, device.iak_secured_point
    else:
        cert_der, point = device.cert_debug_der, device.iak_debug_point
        if not ctx.policy.allow_debug_class:
            findings.append(ctx.finding(ReasonCode.CERTIFICATE_DEBUG_CLASS))
    findings += _check_certificate(ctx, cert_der, point, anchors)
    findings += _check_instance_id(ctx, point)
    return findings


def _check_instance_id(ctx: _Context, point: bytes) -> list[Finding]:
    expected = _instance_id_of(point)
    got = ctx.claims.instance_id
    if expected and hmac.compare_digest(expected, got):
        return []
    return [
        ctx.finding(
            ReasonCode.CERTIFICATE_MISMATCH,
            expected=f"instance id {expected.hex() or '(enrolled IAK unreadable)'}",
            got=f"instance id {got.hex()}",
        )
    ]


def _check_certificate(
    ctx: _Context, cert_der: bytes, point: bytes, anchors: Sequence[TrustAnchor]
) -> list[Finding]:
    try:
        facts = _certificate_facts(cert_der)
    except ValueError:
        got = "an enrolled certificate that is not DER X.509"
        return [ctx.finding(ReasonCode.CERTIFICATE_UNTRUSTED, got=got)]
    findings: list[Finding] = []
    if not any(_signed_by(cert_der, anchor.cert_der, anchor.public_point) for anchor in anchors):
        expected = f"a certificate signed by one of the {len(anchors)} trusted manufacturer CAs"
        got = f"a certificate issued by {facts.cert.issuer.rfc4514_string()[:_MAX_NAME]!r}"
        findings.append(ctx.finding(ReasonCode.CERTIFICATE_UNTRUSTED, expected=expected, got=got))
    findings += _check_validity(ctx, facts)
    findings += _check_subject(ctx, facts, point)
    return findings


def _check_validity(ctx: _Context, facts: _CertificateFacts) -> list[Finding]:
    start, end = facts.not_before_s, facts.not_after_s
    now_s = ctx.request.now_s
    if start <= now_s <= end:
        return []
    expected = f"gateway time within [{start}, {end}]"
    return [ctx.finding(ReasonCode.CERTIFICATE_EXPIRED, expected=expected, got=f"{now_s}")]


def _check_subject(ctx: _Context, facts: _CertificateFacts, point: bytes) -> list[Finding]:
    findings: list[Finding] = []
    if not hmac.compare_digest(facts.point, point):
        findings.append(
            ctx.finding(
                ReasonCode.CERTIFICATE_MISMATCH,
                expected="a certificate over the enrolled IAK",
                got="a certificate over another key",
            )
        )
    common_name = facts.common_name
    if common_name != ctx.device.device_id:
        findings.append(
            ctx.finding(
                ReasonCode.CERTIFICATE_MISMATCH,
                expected=f"certificate subject CN {ctx.device.device_id!r}",
                got=f"subject CN {common_name[:_MAX_NAME]!r}",
            )
        )
    return findings


def _certificate_point(cert: x509.Certificate) -> bytes:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return b""
    return keys.p256_point(key)


@dataclass(frozen=True, slots=True)
class _CertificateFacts:
    """What the identity checks read from an enrolled certificate."""

    cert: x509.Certificate
    not_before_s: int
    not_after_s: int
    #: The SEC1 point of its P-256 key; empty for any other key.
    point: bytes
    #: Its subject's first common name; empty when it has none.
    common_name: str


@functools.lru_cache(maxsize=CERTIFICATE_CACHE_SIZE)
def _certificate_facts(cert_der: bytes) -> _CertificateFacts:
    """The facts of ``cert_der``, derived once (a pure function of the bytes, so kept).

    Raises:
        ValueError: not DER X.509 (never kept: a failure is recomputed).
    """
    cert = _parsed_certificate(cert_der)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return _CertificateFacts(
        cert=cert,
        not_before_s=int(cert.not_valid_before_utc.timestamp()),
        not_after_s=int(cert.not_valid_after_utc.timestamp()),
        point=_certificate_point(cert),
        common_name=str(names[0].value) if names else "",
    )


@functools.lru_cache(maxsize=CERTIFICATE_CACHE_SIZE)
def _instance_id_of(point: bytes) -> bytes:
    """The instance id of the enrolled IAK ``point`` (0x01 ‖ SHA-256 of it); empty when the
    point is not a P-256 point. A pure function of the bytes, so kept."""
    try:
        return keys.instance_id(keys.p256_from_point(point))
    except ValueError:
        return b""


@functools.lru_cache(maxsize=CERTIFICATE_CACHE_SIZE)
def _parsed_certificate(cert_der: bytes) -> x509.Certificate:
    """The certificate ``cert_der``, parsed once (a pure function of the bytes, so kept).

    Raises:
        ValueError: not DER X.509 (never kept: a failure is recomputed).
    """
    return x509.load_der_x509_certificate(cert_der)


@functools.lru_cache(maxsize=CERTIFICATE_CACHE_SIZE)
def _signed_by(cert_der: bytes, anchor_cert_der: bytes | None, anchor_point: bytes) -> bool:
    """``_issued_by`` memoized on the bytes of both certificates and the anchor key.

    A pure function of its arguments, so a kept answer is never stale: the anchors are read
    from the registry at each appraisal, and a removed anchor is simply no longer asked.
    """
    try:
        cert = _parsed_certificate(cert_der)
    except ValueError:
        return False
    anchor = TrustAnchor(
        kind=TrustAnchorKind.MANUFACTURER_CA,
        signer_id=b"",
        public_point=anchor_point,
        name="",
        added_at_s=0,
        cert_der=anchor_cert_der,
    )
    return _issued_by(cert, anchor)


def _issued_by(cert: x509.Certificate, anchor: TrustAnchor) -> bool:
    """Whether ``anchor`` (its certificate when stored, else its bare key) signed ``cert``."""
    try:
        if anchor.cert_der is not None:
            cert.verify_directly_issued_by(x509.load_der_x509_certificate(anchor.cert_der))
            return True
        algorithm = cert.signature_hash_algorithm
        if algorithm is None:
            return False
        anchor.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


# --- lifecycle and platform ----------------------------------------------------------------------


def _check_lifecycle(ctx: _Context) -> list[Finding]:
    if ctx.policy.require_lifecycle is LifecycleRule.ANY:
        return []
    value = ctx.claims.lifecycle
    major = psa.lifecycle_class(value)
    if major == _SECURED_CLASS:
        return []
    code = (
        ReasonCode.LIFECYCLE_DEBUG if major in _DEBUG_CLASSES else ReasonCode.LIFECYCLE_NOT_SECURED
    )
    return [ctx.finding(code, got=f"lifecycle 0x{value:04x} ({_lifecycle_name(value)})")]


def _lifecycle_name(value: int) -> str:
    try:
        return psa.lifecycle_state(value).name
    except ValueError:
        return "not a PSA state"


def _check_platform(ctx: _Context) -> list[Finding]:
    policy = ctx.policy
    platform = ctx.claims.platform
    if platform is None:
        if not (policy.require_secure_boot or policy.forbid_debug_port or policy.forbid_smt):
            return []
        expected = "edgeseal platform claims (secure boot, debug port, SMT) the policy rules on"
        return [
            ctx.finding(ReasonCode.POLICY_VIOLATION, expected=expected, got="a token without them")
        ]
    rules = (
        (policy.require_secure_boot and not platform.secure_boot,
         ReasonCode.PLATFORM_SECURE_BOOT_OFF),
        (policy.forbid_debug_port and platform.debug_port_open,
         ReasonCode.PLATFORM_DEBUG_PORT_OPEN),
        (policy.forbid_smt and platform.smt_enabled, ReasonCode.PLATFORM_SMT_ENABLED),
    )  # fmt: skip
    return [ctx.finding(code) for hit, code in rules if hit]


# --- boot chain ----------------------------------------------------------------------------------


def _check_boot(ctx: _Context, reference_values: Sequence[ReferenceValue]) -> list[Finding]:
    findings: list[Finding] = []
    for component, mismatch, label in _STAGES:
        refs = [ref for ref in reference_values if ref.component is component]
        findings += _check_stage(ctx, refs, component, mismatch, label)
    return findings


def _check_stage(
    ctx: _Context,
    refs: Sequence[ReferenceValue],
    component: ComponentType,
    mismatch: ReasonCode,
    label: str,
) -> list[Finding]:
    measured = psa.find_component(ctx.claims, component.value)
    if measured is None:
        count = len(ctx.claims.software_components)
        return [
            ctx.finding(
                ReasonCode.BOOT_STAGE_MISSING,
                expected=f"a software component of type {component.value}",
                got=f"none among the token's {count} components",
            )
        ]
    match = next(
        (r for r in refs if hmac.compare_digest(r.measurement, measured.measurement_value)), None
    )
    if match is None:
        return _unmatched_stage(ctx, refs, measured, mismatch, label)
    return _matched_stage(ctx, refs, match, measured, label)


def _unmatched_stage(
    ctx: _Context,
    refs: Sequence[ReferenceValue],
    measured: psa.SoftwareComponent,
    mismatch: ReasonCode,
    label: str,
) -> list[Finding]:
    expected = f"one of the {len(refs)} reference measurements of {label}"
    findings = [
        ctx.finding(mismatch, expected=expected, got=_measured_text(measured)),
    ]
    signers = {ref.signer_id for ref in refs}
    if signers and measured.signer_id not in signers:
        findings.append(_signer_finding(ctx, sorted(signers), measured, label))
    return findings


def _matched_stage(
    ctx: _Context,
    refs: Sequence[ReferenceValue],
    match: ReferenceValue,
    measured: psa.SoftwareComponent,
    label: str,
) -> list[Finding]:
    findings: list[Finding] = []
    if not hmac.compare_digest(match.signer_id, measured.signer_id):
        findings.append(_signer_finding(ctx, [match.signer_id], measured, label))
    newest = max(ref.security_counter for ref in refs)
    if not ctx.policy.allow_older_boot_stages and match.security_counter < newest:
        findings.append(
            ctx.finding(
                ReasonCode.BOOT_STAGE_ROLLBACK,
                expected=f"{label} at security counter {newest} (the newest reference)",
                got=f"{label} version {match.version}, security counter {match.security_counter}",
            )
        )
    return findings


def _signer_finding(
    ctx: _Context, signers: Sequence[bytes], measured: psa.SoftwareComponent, label: str
) -> Finding:
    expected = f"{label} signed by " + " or ".join(signer.hex() for signer in signers)
    got = f"signer id {measured.signer_id.hex()}"
    return ctx.finding(ReasonCode.BOOT_SIGNER_MISMATCH, expected=expected, got=got)


def _measured_text(measured: psa.SoftwareComponent) -> str:
    version = "" if measured.version is None else f" (version {measured.version[:32]})"
    return f"measurement {measured.measurement_value.hex()}{version}"


# --- counters ------------------------------------------------------------------------------------


def _check_counters(ctx: _Context, epoch: int) -> list[Finding]:
    platform = ctx.claims.platform
    if platform is None:
        return []
    findings: list[Finding] = []
    app = platform.counter(APP_COUNTER)
    if (app or 0) < epoch:
        findings.append(
            ctx.finding(
                ReasonCode.COUNTER_BELOW_EPOCH,
                expected=f"app counter at or above the epoch {epoch} of {ctx.device.product}",
                got="no app counter" if app is None else f"app counter {app}",
            )
        )
    rolled = [
        f"{name} {value} < {last}"
        for name, last in ctx.device.counters.items()
        if (value := platform.counter(name)) is not None and value < last
    ]
    if rolled:
        findings.append(
            ctx.finding(
                ReasonCode.COUNTER_ROLLBACK,
                expected="fuse counters at or above the values last seen",
                got="; ".join(rolled),
            )
        )
    return findings


# --- the application -----------------------------------------------------------------------------


def _check_app_component(ctx: _Context, find_release: FindRelease) -> list[Finding]:
    measured = psa.find_component(ctx.claims, ComponentType.APP.value)
    if measured is None:
        return []
    digest = measured.measurement_value
    found = find_release(ReleaseId(digest.hex())) if len(digest) == 32 else None
    if found is None:
        return [
            ctx.finding(
                ReasonCode.APP_UNKNOWN_RELEASE,
                expected="an APP measurement naming a release in the registry",
                got=f"APP measurement {digest.hex()}",
            )
        ]
    if found.product != ctx.device.product:
        return [
            ctx.finding(
                ReasonCode.APP_NOT_ASSIGNED,
                expected=f"an APP release of {ctx.device.product}",
                got=f"release {found.release_id} of {found.product}",
            )
        ]
    return []


def _check_release(
    ctx: _Context, epoch: int, assigned: ReleaseId | None, find_release: FindRelease
) -> tuple[ReleaseRecord | None, list[Finding]]:
    if assigned is None:
        return None, [ctx.finding(ReasonCode.APP_NOT_ASSIGNED, got="no release assigned")]
    release = find_release(assigned)
    if release is None:
        got = f"assigned release {assigned}, which the registry does not hold"
        return None, [ctx.finding(ReasonCode.APP_UNKNOWN_RELEASE, got=got)]
    if release.product != ctx.device.product:
        got = f"assigned release {assigned} of {release.product}"
        return None, [ctx.finding(ReasonCode.APP_NOT_ASSIGNED, got=got)]
    if release.security_counter < epoch:
        finding = ctx.finding(
            ReasonCode.IMAGE_BELOW_EPOCH,
            expected=f"a release at security counter {epoch} (the epoch) or above",
            got=f"release {release.version} at security counter {release.security_counter}",
        )
        return release, [finding]
    return release, []
