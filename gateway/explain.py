"""The explainer: per finding, the claim, expected against got, the likely cause and the fix.

DESIGN §10: the device gets reason codes only; people (operators, through the registry and
``edgeseal-gateway device ID``) get an ``Explanation`` per finding. This module is a table from
reason code to five plain sentences — which claim was judged, what was expected, what was found,
the likely cause and the fix — with ``{device}`` and ``{product}`` placeholders. The appraisal
replaces the generic "expected" and "got" with the concrete values it compared (digests in hex,
counters, flags) where it has them.

Nothing here is sent to a device, and nothing here ever holds key bytes: "expected" and "got"
carry measurements, signer ids, counters and names, all public.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from protocol.ids import DeviceId
from protocol.reasons import ReasonCode

#: Version of the explanation JSON document stored with each verdict.
EXPLANATION_FORMAT_VERSION: Final = 1
#: The marker recorded (never sent) with a verdict made under ``skip_measurement_checks``.
MEASUREMENTS_SKIPPED: Final = "policy.measurements_skipped"


@dataclass(frozen=True, slots=True)
class Explanation:
    """One finding explained for people: each field is one plain sentence (or a value)."""

    #: The reason code (or ``MEASUREMENTS_SKIPPED``).
    code: str
    #: Which claim or check was judged.
    claim: str
    expected: str
    got: str
    cause: str
    fix: str

    def to_json_obj(self) -> dict[str, str]:
        """The explanation as a JSON object of six strings."""
        return {
            "code": self.code,
            "claim": self.claim,
            "expected": self.expected,
            "got": self.got,
            "cause": self.cause,
            "fix": self.fix,
        }


@dataclass(frozen=True, slots=True)
class Advice:
    """The template of one code: the claim, generic expected/got, likely cause and fix."""

    claim: str
    expected: str
    got: str
    cause: str
    fix: str


_C = ReasonCode
# fmt: off
_TABLE: Final[tuple[tuple[ReasonCode, str, str, str, str, str], ...]] = (
    (_C.EVIDENCE_MALFORMED, "evidence token",
     "a well-formed PSA attestation token (RFC 9783)",
     "bytes that do not decode as a PSA token",
     "The device software building the evidence is broken, or the message was damaged or forged.",
     "Check the device's runtime version and the MQTT path; re-flash the device if it persists."),
    (_C.EVIDENCE_SIGNATURE_INVALID, "token signature",
     "a signature by the IAK enrolled for {device}",
     "a signature that verifies under neither enrolled IAK",
     "The token was signed by another key: a cloned flash on another board, or a forged token.",
     "Confirm the board is the one enrolled as {device}; if so re-enroll it, else investigate."),
    (_C.EVIDENCE_BINDING_MISMATCH, "token nonce (binding)",
     "SHA-256 of the challenge and the enclave key sent with the evidence",
     "a nonce for another challenge or another enclave key",
     "The evidence was replayed from another session or its enclave key was swapped in transit.",
     "Nothing to fix on the gateway; investigate the network path of {device} if it repeats."),
    (_C.EVIDENCE_PROFILE_UNSUPPORTED, "token profile",
     "a PSA profile the policy accepts",
     "a profile outside the policy's accepted profiles",
     "The device firmware emits a PSA profile this gateway's policy does not accept.",
     "Update the device firmware, or add the profile to accepted_profiles in the policy."),
    (_C.CERTIFICATE_UNTRUSTED, "device certificate chain",
     "a certificate signed by a trusted manufacturer CA",
     "a certificate no trusted manufacturer CA signed",
     "The manufacturer CA that issued it is not trusted here, or the certificate was forged.",
     "Trust the factory's CA ('edgeseal-gateway trust add') if genuine; else revoke {device}."),
    (_C.CERTIFICATE_EXPIRED, "device certificate validity",
     "the current gateway time within the certificate's validity period",
     "a time outside the validity period",
     "The device certificate expired or is not yet valid (or the gateway clock is wrong).",
     "Check the gateway clock; re-issue the certificate and re-enroll {device}."),
    (_C.CERTIFICATE_DEBUG_CLASS, "attestation key class",
     "a token signed by the SECURED-class IAK",
     "a token signed by the debug-class IAK",
     "The device's debug port was unlocked, so its keys moved to the debug class for good.",
     "Treat {device} as compromised: keep it out of production or return it to the factory."),
    (_C.CERTIFICATE_MISMATCH, "instance id and certificate",
     "the instance id and certificate key of the IAK enrolled for {device}",
     "an instance id or certificate that does not match the enrolled IAK",
     "The enrollment record is inconsistent, or the evidence comes from another device's RoT.",
     "Re-check the enrollment bundle of {device}; re-enroll it from the factory's records."),
    (_C.DEVICE_UNKNOWN, "device id",
     "a device enrolled in this gateway's registry",
     "no enrolled device with this id",
     "The device was never enrolled here, or it uses a wrong id.",
     "Import the factory's enrollment bundle that lists {device}, or fix the device's id."),
    (_C.DEVICE_REVOKED, "revocation status",
     "an active device",
     "a revoked device",
     "An operator or a revocation bundle revoked {device}.",
     "None if the revocation stands; otherwise re-manufacture and enroll the board anew."),
    (_C.CHALLENGE_INVALID, "challenge",
     "a challenge this gateway issued for this device and session",
     "a challenge with a bad MAC, or for another device or session",
     "The challenge was forged, or issued by a gateway with another challenge secret.",
     "Give every gateway instance the same challenge secret; otherwise investigate {device}."),
    (_C.CHALLENGE_EXPIRED, "challenge expiry",
     "evidence before the challenge expires",
     "evidence after the challenge expired",
     "The device or the network was too slow, or the evidence was held back and replayed late.",
     "Let the device retry; raise challenge_ttl_s in the policy if it happens often."),
    (_C.NONCE_REPLAYED, "challenge single use",
     "a challenge used once",
     "a challenge already used by an earlier session",
     "The same evidence was sent twice: a retry of a delivered message or a replay.",
     "Nothing to fix; the device must start a new session."),
    (_C.LIFECYCLE_DEBUG, "security lifecycle",
     "lifecycle class SECURED (0x30)",
     "a debug lifecycle class",
     "The device's debug port was unlocked; the lifecycle never returns to SECURED.",
     "Treat {device} as compromised: take it out of production."),
    (_C.LIFECYCLE_NOT_SECURED, "security lifecycle",
     "lifecycle class SECURED (0x30)",
     "a lifecycle that is neither SECURED nor debug",
     "The device was not fully provisioned at the factory, or was decommissioned.",
     "Finish provisioning {device} at the factory, or stop using it."),
    (_C.BOOT_MEASUREMENT_MISMATCH, "software component measurement",
     "a measurement listed in the reference values of {product}",
     "a measurement matching no reference value",
     "A software component was modified, or its reference value was never imported.",
     "Import the manufacturer's reference values for {product}, or re-flash {device}."),
    (_C.BOOT_BL2_MISMATCH, "BL2 measurement",
     "a BL2 measurement listed in the reference values of {product}",
     "a BL2 measurement matching no reference value",
     "The BL2 boot stage in flash was modified or replaced, or its reference value is missing.",
     "Re-flash the factory BL2 on {device}, or import the enrollment bundle with its reference."),
    (_C.BOOT_RUNTIME_MISMATCH, "runtime stage measurement",
     "a runtime measurement listed in the reference values of {product}",
     "a runtime measurement matching no reference value",
     "The runtime stage in flash was modified or replaced, or its reference value is missing.",
     "Re-flash the factory runtime stage on {device}; investigate how flash was written."),
    (_C.BOOT_SIGNER_MISMATCH, "boot stage signer id",
     "the ROTPK signer id of the matching reference value",
     "another signer id",
     "A boot stage was signed by a key other than the manufacturer's boot-stage key.",
     "Re-flash stages signed by the manufacturer's ROTPK; turn secure boot on in the fuses."),
    (_C.BOOT_STAGE_MISSING, "boot stage presence",
     "a software component for each boot stage",
     "no component for a boot stage",
     "The RoT did not measure that stage: a broken or non-edgeseal boot chain.",
     "Re-flash the full boot chain on {device}."),
    (_C.BOOT_STAGE_ROLLBACK, "boot stage version",
     "the newest boot stage version in the reference values of {product}",
     "an older genuine boot stage",
     "An older signed boot stage was written back to flash, or the device missed a stage update.",
     "Re-flash the newest boot stage, or set allow_older_boot_stages in the policy if intended."),
    (_C.APP_NOT_ASSIGNED, "application assignment",
     "a release of {product} assigned to {device}",
     "no assignment, or a release of another product",
     "No release was assigned to the device, or the device asks for another product's image.",
     "Assign a release of {product} to {device} ('edgeseal-gateway assign')."),
    (_C.APP_UNKNOWN_RELEASE, "application release",
     "a release held in the registry",
     "a release the registry does not hold",
     "The device runs or was assigned an image this gateway never imported (or a forged one).",
     "Import the vendor's release bundle, or assign a known release to {device}."),
    (_C.APP_NO_RELEASE, "application release",
     "a release available for {device}",
     "no release to grant",
     "No release exists for {product} yet.",
     "Import a release bundle for {product} and assign it."),
    (_C.IMAGE_BELOW_EPOCH, "release security counter",
     "a release counter at or above the epoch of {product}",
     "a release counter below the epoch",
     "The epoch of {product} was raised past the release assigned to {device}.",
     "Assign a release at or above the epoch to {device}."),
    (_C.COUNTER_ROLLBACK, "fuse counters",
     "fuse counters at or above the values last seen for {device}",
     "a fuse counter lower than last seen",
     "Fuse counters only go up: the evidence comes from a clone or an older recorded token.",
     "Investigate {device} for cloning; revoke it if the counters cannot be explained."),
    (_C.COUNTER_BELOW_EPOCH, "app fuse counter",
     "an app counter at or above the epoch of {product}",
     "an app counter below the epoch",
     "The device still runs an image older than the epoch: it needs the update.",
     "Nothing to do: the update at or above the epoch is released; check it is installed."),
    (_C.PLATFORM_SECURE_BOOT_OFF, "secure boot",
     "secure boot enabled in the fuses",
     "secure boot off",
     "The board's secure boot fuse was never blown: unsigned boot stages can run.",
     "Blow the secure boot fuse at the factory; do not deploy development boards."),
    (_C.PLATFORM_DEBUG_PORT_OPEN, "debug port",
     "the debug port closed",
     "the debug port open",
     "The board's debug port is open (development board or an unlock).",
     "Close the debug port at the factory; treat an unlocked board as compromised."),
    (_C.PLATFORM_SMT_ENABLED, "simultaneous multithreading",
     "SMT disabled",
     "SMT enabled",
     "The platform runs with hyperthreading on, which exposes side channels.",
     "Disable SMT on the platform, or set forbid_smt false in the policy if accepted."),
    (_C.POLICY_VIOLATION, "policy",
     "every rule of the policy met",
     "a rule not met",
     "A policy rule not covered by a more specific code failed.",
     "Read the expected and got values; fix the device or adjust the policy."),
    (_C.RATE_LIMITED, "attempt rate",
     "attestation attempts under the gateway's limit",
     "too many attempts",
     "The device retried too often (a boot loop or an attack).",
     "Let the device back off; investigate {device} if it persists."),
    (_C.INTERNAL_ERROR, "verifier",
     "an appraisal that completes",
     "an internal failure",
     "The gateway failed internally; this is not a judgement of the device.",
     "Read the gateway log for the failure and fix the gateway's configuration or data."),
)
# fmt: on

#: Every reason code's template.
ADVICE: Final[Mapping[ReasonCode, Advice]] = MappingProxyType(
    {row[0]: Advice(*row[1:]) for row in _TABLE}
)

_SKIPPED: Final = Advice(
    claim="boot measurements",
    expected="boot stages checked against the reference values of {product}",
    got="the checks skipped by the policy's skip_measurement_checks switch",
    cause="The policy in force has skip_measurement_checks on (a test-only negative control).",
    fix="Turn skip_measurement_checks off and store the policy under a new version.",
)


def _fill(template: str, device: DeviceId, product: str) -> str:
    return template.format_map({"device": device, "product": product or "its product"})


def explain(
    code: ReasonCode,
    *,
    device: DeviceId,
    product: str = "",
    expected: str | None = None,
    got: str | None = None,
) -> Explanation:
    """Explain one finding; ``expected``/``got`` replace the generic sentences when given."""
    advice = ADVICE[code]
    return _explanation(code.value, advice, device, product, expected, got)


def explain_skipped_measurements(device: DeviceId, product: str) -> Explanation:
    """The explanation of a verdict made under ``skip_measurement_checks`` (never silent)."""
    return _explanation(MEASUREMENTS_SKIPPED, _SKIPPED, device, product, None, None)


def _explanation(
    code: str,
    advice: Advice,
    device: DeviceId,
    product: str,
    expected: str | None,
    got: str | None,
) -> Explanation:
    return Explanation(
        code=code,
        claim=advice.claim,
        expected=_fill(advice.expected, device, product) if expected is None else expected,
        got=_fill(advice.got, device, product) if got is None else got,
        cause=_fill(advice.cause, device, product),
        fix=_fill(advice.fix, device, product),
    )


def explain_reasons(
    reasons: Iterable[ReasonCode], *, device: DeviceId, product: str = ""
) -> tuple[Explanation, ...]:
    """Generic explanations of bare reason codes (refusals made before any appraisal)."""
    return tuple(explain(code, device=device, product=product) for code in reasons)


def explanation_json(explanations: Iterable[Explanation]) -> str:
    """The JSON document stored with a verdict: ``{"v": 1, "findings": [...]}``."""
    findings = [item.to_json_obj() for item in explanations]
    return json.dumps(
        {"v": EXPLANATION_FORMAT_VERSION, "findings": findings},
        sort_keys=True,
        separators=(",", ":"),
    )


def parse_explanation_json(text: str) -> tuple[Explanation, ...]:
    """Read back ``explanation_json``'s document.

    Raises:
        ValueError: not an explanation document of version 1.
    """
    document = json.loads(text)
    if not isinstance(document, dict) or document.get("v") != EXPLANATION_FORMAT_VERSION:
        raise ValueError("explanation: expected a JSON object with v = 1")
    findings = document.get("findings")
    if not isinstance(findings, list):
        raise ValueError("explanation.findings: expected a list")
    return tuple(_from_json(item, index) for index, item in enumerate(findings))


def _from_json(item: object, index: int) -> Explanation:
    names = ("code", "claim", "expected", "got", "cause", "fix")
    if not isinstance(item, dict) or set(item) != set(names):
        raise ValueError(f"explanation.findings[{index}]: expected the keys {', '.join(names)}")
    values = [item[name] for name in names]
    if not all(isinstance(value, str) for value in values):
        raise ValueError(f"explanation.findings[{index}]: every value must be a string")
    return Explanation(*values)
