"""The appraisal policy as data: a versioned JSON document (DESIGN §10; docs/policy.md).

A policy document is one JSON object. ``format`` (the document format, 1) and ``version`` (the
policy's own number, a positive integer that only goes up; 0 is the built-in default) are
required; every other field is optional and takes the default of ``Policy.default()``. Unknown
fields are refused, so a misspelt rule never silently falls back to its default.

Policies are stored and versioned in the registry's ``policies`` table (``store_policy``); each
verdict records the version it was made under. ``RegistryPolicy`` is the policy provider of the
gateway hooks: it reads the newest stored version, or the built-in default when none is stored.
A stored document is parsed once per (version, document) and the ``Policy`` kept (a pure function
of the text); the hooks read the newest record itself with each appraisal snapshot.

``skip_measurement_checks`` is a test-only switch for the red team's negative control. It turns off
every boot measurement check: a modified runtime then receives the key. The appraisal marks every
verdict made under it (status at least warning, the ``policy.measurements_skipped`` marker in the
recorded reasons and explanation), so it is never silent. Never set it on a real gateway.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Final

from gateway.ledger import Ledger, LedgerKind
from gateway.registry import PolicyRecord, Registry
from protocol import cbor, psa
from protocol.errors import UsageError
from protocol.results import Signer
from protocol.verifier import VerifierConfig

POLICY_FORMAT_VERSION: Final = 1
#: The version of ``Policy.default()``; stored policies are numbered from 1.
DEFAULT_POLICY_VERSION: Final = 0
MAX_POLICY_BYTES: Final = 64 << 10
MAX_PROFILES: Final = 16
_MAX_U32: Final = 0xFFFF_FFFF
#: Longest lease, result or challenge lifetime accepted: ten years.
MAX_DURATION_S: Final = 10 * 365 * 86_400


class PolicyError(UsageError):
    """A policy document is not valid: the message names the field, expected against got.

    Raised by ``Policy.parse`` (an operator's file, or a stored document) and ``store_policy``.
    Fix the document and store it again under a new version.
    """


class LifecycleRule(StrEnum):
    """Which security lifecycle the policy requires (RFC 9783 §4.3.1; compared as value >> 8)."""

    SECURED = "secured"
    ANY = "any"


@dataclass(frozen=True, slots=True)
class LeaseRule:
    """The offline lease granted with a key (DESIGN §8)."""

    offline_boots: int = 3
    duration_s: int = 86_400


@dataclass(frozen=True, slots=True)
class Policy:
    """One version of the appraisal policy; build it with ``parse`` or ``default``."""

    version: int = DEFAULT_POLICY_VERSION
    accepted_profiles: tuple[str, ...] = (psa.PROFILE_RFC9783, psa.PROFILE_PSA_2_0_0)
    require_lifecycle: LifecycleRule = LifecycleRule.SECURED
    allow_debug_class: bool = False
    require_secure_boot: bool = True
    forbid_debug_port: bool = True
    forbid_smt: bool = False
    allow_older_boot_stages: bool = False
    lease: LeaseRule = field(default_factory=LeaseRule)
    result_ttl_s: int = 300
    challenge_ttl_s: int = 30
    #: Test-only negative control: skip every boot measurement check. Dangerous; see the module.
    skip_measurement_checks: bool = False

    @classmethod
    def default(cls) -> Policy:
        """The built-in policy (version 0): SECURED only, secure boot on, debug port closed."""
        return cls()

    @classmethod
    def parse(cls, text: str | bytes) -> Policy:
        """Parse and check a policy document.

        Raises:
            PolicyError: not JSON, not an object, a missing, unknown or mistyped field, or a value
                out of range; the message names the field.
        """
        if len(text) > MAX_POLICY_BYTES:
            raise PolicyError(f"policy: larger than {MAX_POLICY_BYTES} bytes")
        try:
            document = json.loads(text)
        except (ValueError, UnicodeDecodeError) as err:
            raise PolicyError(f"policy: not a JSON document ({err})") from err
        return _from_document(_expect_object(document, "policy"))

    def to_json(self) -> str:
        """The policy as a canonical JSON document (sorted keys); ``parse`` reads it back."""
        return json.dumps(self.to_document(), sort_keys=True, indent=2) + "\n"

    def to_document(self) -> dict[str, object]:
        """The policy as a JSON-ready mapping."""
        document: dict[str, object] = {"format": POLICY_FORMAT_VERSION}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, LeaseRule):
                value = {"offline_boots": value.offline_boots, "duration_s": value.duration_s}
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, LifecycleRule):
                value = value.value
            document[item.name] = value
        return document

    def verifier_config(
        self, *, secret: bytes, result_signer: Signer, verifier_id: str = "edgeseal-gateway"
    ) -> VerifierConfig:
        """The verifier session settings this policy implies (challenge and result lifetimes)."""
        return VerifierConfig(
            secret=secret,
            result_signer=result_signer,
            verifier_id=verifier_id,
            challenge_ttl_s=self.challenge_ttl_s,
            result_ttl_s=self.result_ttl_s,
        )


# --- parsing -------------------------------------------------------------------------------------

_FIELDS: Final = frozenset(item.name for item in fields(Policy)) | {"format"}


def _from_document(document: Mapping[str, object]) -> Policy:
    unknown = sorted(set(document) - _FIELDS)
    if unknown:
        raise PolicyError(f"policy.{unknown[0]}: unknown field (see docs/policy.md)")
    version_format = _int(document, "format", lo=0, required=True)
    if version_format != POLICY_FORMAT_VERSION:
        raise PolicyError(f"policy.format: expected {POLICY_FORMAT_VERSION}, got {version_format}")
    base = Policy.default()
    return Policy(
        version=_int(document, "version", lo=0, hi=(1 << 63) - 1, required=True),
        accepted_profiles=_profiles(document, base.accepted_profiles),
        require_lifecycle=_lifecycle(document, base.require_lifecycle),
        allow_debug_class=_bool(document, "allow_debug_class", base.allow_debug_class),
        require_secure_boot=_bool(document, "require_secure_boot", base.require_secure_boot),
        forbid_debug_port=_bool(document, "forbid_debug_port", base.forbid_debug_port),
        forbid_smt=_bool(document, "forbid_smt", base.forbid_smt),
        allow_older_boot_stages=_bool(
            document, "allow_older_boot_stages", base.allow_older_boot_stages
        ),
        lease=_lease(document, base.lease),
        result_ttl_s=_int(document, "result_ttl_s", lo=1, default=base.result_ttl_s),
        challenge_ttl_s=_int(document, "challenge_ttl_s", lo=1, default=base.challenge_ttl_s),
        skip_measurement_checks=_bool(
            document, "skip_measurement_checks", base.skip_measurement_checks
        ),
    )


def _expect_object(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise PolicyError(f"{what}: expected a JSON object, got {_kind(value)}")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return f"the integer {value}" if abs(value) < 1 << 64 else "a big integer"
    if isinstance(value, str):
        return f"text of {len(value)} characters"
    return {list: "a list", dict: "an object", float: "a number"}.get(type(value), "a value")


def _int(
    document: Mapping[str, object],
    name: str,
    *,
    lo: int,
    hi: int = MAX_DURATION_S,
    default: int = 0,
    required: bool = False,
    what: str = "policy",
) -> int:
    if name not in document:
        if required:
            raise PolicyError(f"{what}.{name}: missing (expected an integer in [{lo}, {hi}])")
        return default
    value = document[name]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise PolicyError(f"{what}.{name}: expected an integer in [{lo}, {hi}], got {_kind(value)}")
    return value


def _bool(document: Mapping[str, object], name: str, default: bool) -> bool:
    value = document.get(name, default)
    if not isinstance(value, bool):
        raise PolicyError(f"policy.{name}: expected true or false, got {_kind(value)}")
    return value


def _profiles(document: Mapping[str, object], default: tuple[str, ...]) -> tuple[str, ...]:
    value = document.get("accepted_profiles", list(default))
    what = "policy.accepted_profiles"
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_PROFILES:
        raise PolicyError(
            f"{what}: expected a list of 1-{MAX_PROFILES} profiles, got {_kind(value)}"
        )
    known = (psa.PROFILE_RFC9783, psa.PROFILE_PSA_2_0_0)
    for item in value:
        if item not in known:
            raise PolicyError(f"{what}: expected profiles among {list(known)}, got {_kind(item)}")
    if len(set(value)) != len(value):
        raise PolicyError(f"{what}: a profile is listed twice")
    return tuple(value)


def _lifecycle(document: Mapping[str, object], default: LifecycleRule) -> LifecycleRule:
    value = document.get("require_lifecycle", default.value)
    if isinstance(value, str) and value in {rule.value for rule in LifecycleRule}:
        return LifecycleRule(value)
    expected = " or ".join(repr(rule.value) for rule in LifecycleRule)
    raise PolicyError(f"policy.require_lifecycle: expected {expected}, got {_kind(value)}")


def _lease(document: Mapping[str, object], default: LeaseRule) -> LeaseRule:
    if "lease" not in document:
        return default
    lease = _expect_object(document["lease"], "policy.lease")
    unknown = sorted(set(lease) - {"offline_boots", "duration_s"})
    if unknown:
        raise PolicyError(f"policy.lease.{unknown[0]}: unknown field")
    return LeaseRule(
        offline_boots=_int(
            lease, "offline_boots", lo=0, hi=_MAX_U32, default=default.offline_boots,
            what="policy.lease",
        ),
        duration_s=_int(lease, "duration_s", lo=1, default=default.duration_s, what="policy.lease"),
    )  # fmt: skip


# --- storage in the registry ---------------------------------------------------------------------


def store_policy(
    registry: Registry, policy: Policy, *, now_s: int, ledger: Ledger | None = None
) -> PolicyRecord:
    """Store ``policy`` as a new version (above every stored one) and log it in the ledger.

    Raises:
        PolicyError: ``policy.version`` is 0 (reserved for the built-in default).
        RegistryConflict: the version is not above the newest stored version.
    """
    if policy.version <= DEFAULT_POLICY_VERSION:
        raise PolicyError("policy.version: stored policies are numbered from 1")
    record = registry.add_policy(policy.version, policy.to_json(), now_s=now_s)
    if ledger is not None:
        body = cbor.dumps({"v": 1, "version": policy.version, "document": record.document})
        ledger.append(LedgerKind.POLICY_CHANGE, body, now_s=now_s)
    return record


def load_policy(registry: Registry) -> Policy:
    """The newest stored policy, or ``Policy.default()`` when none is stored.

    Raises:
        PolicyError: the stored document is invalid, or its version is not the stored version.
    """
    return policy_of_record(registry.latest_policy())


def policy_of_record(record: PolicyRecord | None) -> Policy:
    """The policy a stored record holds, or ``Policy.default()`` for None (no policy stored).

    Raises:
        PolicyError: the stored document is invalid, or its version is not the stored version.
    """
    if record is None:
        return Policy.default()
    return _stored_policy(record.version, record.document)


@functools.lru_cache(maxsize=16)
def _stored_policy(version: int, document: str) -> Policy:
    """A stored document parsed and checked against its stored version, once per pair (a pure
    function of the two, so kept; a failure raises every time and is never kept)."""
    policy = Policy.parse(document)
    if policy.version != version:
        raise PolicyError(
            f"policy.version: the document says {policy.version}, stored as {version}"
        )
    return policy


#: What the gateway hooks call for the policy in force at each appraisal.
PolicyProvider = Callable[[], Policy]


class RegistryPolicy:
    """A ``PolicyProvider`` reading the newest stored policy at every call (every process sees
    a new version at its next appraisal)."""

    __slots__ = ("_registry",)

    def __init__(self, registry: Registry) -> None:
        """Read policies from ``registry``."""
        self._registry = registry

    @property
    def registry(self) -> Registry:
        """The registry the policies are read from."""
        return self._registry

    def __call__(self) -> Policy:
        """The policy in force now."""
        return load_policy(self._registry)
