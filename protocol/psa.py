"""The PSA attestation token (RFC 9783): edgeseal's evidence (DESIGN §6, docs/token.md).

A token is a COSE_Sign1 (ES256, tag 18) over a CBOR map of claims. Rules kept here:

- Two profiles are accepted: ``tag:psacertified.org,2023:psa#tfm`` (RFC 9783) and TF-M's
  ``http://arm.com/psa/2.0.0``. They share every claim key except the boot seed (268, 8–32 bytes
  and optional in RFC 9783 §4.3.2; 2397, 32 bytes and mandatory in 2.0.0). Any other profile,
  ``PSA_IOT_PROFILE_1`` included, is refused.
- Decoding checks every claim the profile defines (presence, type, size, range) and ignores claims
  it does not know (RFC 9783 §5.1: "the receiver MUST NOT error out on claims it does not
  understand"). Claim maps need not be in canonical order; ours always are.
- edgeseal's platform claims (fuse counters, boot count, secure boot, debug port, SMT) live in the
  CWT private-use range (below -65536): all five or none.
- ``verify_token`` checks the signature before it reads a single claim: a tampered token is
  ``InvalidToken``, a well-signed but ill-formed one ``MalformedMessage``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec

from protocol import cbor, cose
from protocol.errors import InvalidSignature, InvalidToken, MalformedMessage

PROFILE_RFC9783: Final = "tag:psacertified.org,2023:psa#tfm"
PROFILE_PSA_2_0_0: Final = "http://arm.com/psa/2.0.0"

# Claim keys: EAT (RFC 9711) and RFC 9783 §4.
CLAIM_NONCE: Final = 10
CLAIM_INSTANCE_ID: Final = 256
CLAIM_PROFILE: Final = 265
CLAIM_BOOT_SEED: Final = 268
CLAIM_CLIENT_ID: Final = 2394
CLAIM_LIFECYCLE: Final = 2395
CLAIM_IMPLEMENTATION_ID: Final = 2396
CLAIM_BOOT_SEED_PSA_2_0_0: Final = 2397
CLAIM_CERTIFICATION_REFERENCE: Final = 2398
CLAIM_SOFTWARE_COMPONENTS: Final = 2399
CLAIM_VERIFICATION_SERVICE: Final = 2400

# edgeseal private-use claims (CWT Claims registry: keys below -65536 are private use).
CLAIM_FUSE_COUNTERS: Final = -80001
CLAIM_BOOT_COUNT: Final = -80002
CLAIM_SECURE_BOOT: Final = -80003
CLAIM_DEBUG_PORT_OPEN: Final = -80004
CLAIM_SMT_ENABLED: Final = -80005
PLATFORM_CLAIMS: Final = (
    CLAIM_FUSE_COUNTERS,
    CLAIM_BOOT_COUNT,
    CLAIM_SECURE_BOOT,
    CLAIM_DEBUG_PORT_OPEN,
    CLAIM_SMT_ENABLED,
)

# Software component keys (RFC 9783 §4.4.1).
COMPONENT_TYPE: Final = 1
COMPONENT_VALUE: Final = 2
COMPONENT_VERSION: Final = 4
COMPONENT_SIGNER_ID: Final = 5
COMPONENT_DESC: Final = 6

MAX_TOKEN_BYTES: Final = 32 << 10
MAX_COMPONENTS: Final = 64
MAX_TEXT: Final = 256
MAX_FUSE_COUNTERS: Final = 16
MAX_COUNTER_NAME: Final = 32
MAX_COUNTER: Final = 0xFFFF_FFFF
MAX_BOOT_COUNT: Final = 0xFFFF_FFFF_FFFF_FFFF
#: psa-hash-type (RFC 9783 §4): nonces, measurements and signer ids.
HASH_SIZES: Final = frozenset({32, 48, 64})
IMPLEMENTATION_ID_BYTES: Final = 32
INSTANCE_ID_BYTES: Final = 33
INSTANCE_ID_TYPE_RAND: Final = 0x01
CLIENT_ID_MIN: Final = -(1 << 31)
CLIENT_ID_MAX: Final = (1 << 31) - 1
BIND_LABEL: Final = "edgeseal/bind/v1"
CHALLENGE_BYTES: Final = 32
X25519_PUBLIC_BYTES: Final = 32

_WHAT: Final = "PSA token"
_MISSING: Final = object()


class Lifecycle(IntEnum):
    """PSA security lifecycle states (RFC 9783 §4.3.1): the major state is ``value >> 8``."""

    UNKNOWN = 0x0000
    ASSEMBLY_AND_TEST = 0x1000
    PSA_ROT_PROVISIONING = 0x2000
    SECURED = 0x3000
    NON_PSA_ROT_DEBUG = 0x4000
    RECOVERABLE_PSA_ROT_DEBUG = 0x5000
    DECOMMISSIONED = 0x6000


_LIFECYCLE_MAX: Final = 0x60FF


def lifecycle_class(value: int) -> int:
    """The major lifecycle state (bits 15:8): compare lifecycles only by this."""
    return value >> 8


def lifecycle_state(value: int) -> Lifecycle:
    """The named major state of a lifecycle value; the low byte is implementation defined.

    Raises:
        ValueError: ``value`` is outside every state's range (RFC 9783 §4.3.1).
    """
    if not _lifecycle_ok(value):
        raise ValueError(f"lifecycle: 0x{value:04x} is not a PSA security lifecycle value")
    return Lifecycle(lifecycle_class(value) << 8)


def _lifecycle_ok(value: int) -> bool:
    return 0 <= value <= _LIFECYCLE_MAX and (value & 0x0F00) == 0


@dataclass(frozen=True, slots=True)
class SoftwareComponent:
    """One measured software component (RFC 9783 §4.4.1)."""

    measurement_value: bytes
    signer_id: bytes
    measurement_type: str | None = None
    version: str | None = None
    measurement_desc: str | None = None


@dataclass(frozen=True, slots=True)
class PlatformClaims:
    """edgeseal's private-use claims: fuse counters, boot count and platform flags.

    ``fuse_counters`` holds (name, value) pairs; it is stored sorted by name, and names are unique.
    """

    fuse_counters: tuple[tuple[str, int], ...]
    boot_count: int
    secure_boot: bool
    debug_port_open: bool
    smt_enabled: bool

    def __post_init__(self) -> None:
        counters: object = self.fuse_counters
        if isinstance(counters, Mapping):  # tolerated at run time; the type says pairs
            counters = counters.items()
        if not isinstance(counters, Iterable):
            raise TypeError("fuse counters: expected (name, value) pairs")
        pairs = tuple(sorted(counters))
        if not all(isinstance(pair, tuple) and len(pair) == 2 for pair in pairs):
            raise TypeError("fuse counters: expected (name, value) pairs")
        if len(dict(pairs)) != len(pairs):
            raise ValueError("fuse counters: names must be unique")
        object.__setattr__(self, "fuse_counters", pairs)

    @classmethod
    def create(
        cls,
        fuse_counters: Mapping[str, int],
        *,
        boot_count: int,
        secure_boot: bool,
        debug_port_open: bool,
        smt_enabled: bool,
    ) -> PlatformClaims:
        """Platform claims from a mapping of fuse counter name to value."""
        return cls(
            tuple(fuse_counters.items()), boot_count, secure_boot, debug_port_open, smt_enabled
        )

    def counter(self, name: str) -> int | None:
        """The value of fuse counter ``name``, or None when the token does not carry it."""
        return dict(self.fuse_counters).get(name)


@dataclass(frozen=True, slots=True)
class PsaClaims:
    """The claims of a PSA token.

    ``boot_seed`` is empty when an RFC 9783 token carries none (the claim is optional there).
    """

    profile: str
    client_id: int
    lifecycle: int
    implementation_id: bytes
    boot_seed: bytes
    instance_id: bytes
    nonce: bytes
    software_components: tuple[SoftwareComponent, ...]
    certification_reference: str | None = None
    verification_service: str | None = None
    platform: PlatformClaims | None = None


@dataclass(frozen=True, slots=True)
class _Rules:
    """What differs between the accepted profiles."""

    boot_seed_key: int
    boot_seed_sizes: range
    boot_seed_required: bool
    certification_reference: re.Pattern[str]


_RULES: Final = {
    # RFC 9783 §4.2.3 (EAN-13+5), §4.3.2 (optional, 8..32 bytes).
    PROFILE_RFC9783: _Rules(
        CLAIM_BOOT_SEED, range(8, 33), False, re.compile(r"[0-9]{13}-[0-9]{5}")
    ),
    # TF-M's PSA 2.0.0 profile: EAN-13 (optionally +5), a 32-byte boot seed at 2397.
    PROFILE_PSA_2_0_0: _Rules(
        CLAIM_BOOT_SEED_PSA_2_0_0, range(32, 33), True, re.compile(r"[0-9]{13}(-[0-9]{5})?")
    ),
}


# --- encoding ------------------------------------------------------------------------------------


def encode_claims(claims: PsaClaims) -> bytes:
    """The canonical CBOR claims map of ``claims``.

    Raises:
        MalformedMessage: (a ``ValueError``) the claims would not decode: an unknown profile, a
            wrong size, a value out of range. The message names the claim.
    """
    claims_map = _claims_map(claims)
    _claims_from_map(claims_map)
    return cbor.dumps(claims_map)


def _claims_map(claims: PsaClaims) -> dict[int, object]:
    boot_seed_key = (
        CLAIM_BOOT_SEED_PSA_2_0_0 if claims.profile == PROFILE_PSA_2_0_0 else CLAIM_BOOT_SEED
    )
    claims_map: dict[int, object] = {
        CLAIM_PROFILE: claims.profile,
        CLAIM_CLIENT_ID: _plain_int(claims.client_id),
        CLAIM_LIFECYCLE: _plain_int(claims.lifecycle),
        CLAIM_IMPLEMENTATION_ID: claims.implementation_id,
        CLAIM_INSTANCE_ID: claims.instance_id,
        CLAIM_NONCE: claims.nonce,
        CLAIM_SOFTWARE_COMPONENTS: [_component_map(c) for c in claims.software_components],
    }
    if claims.boot_seed:
        claims_map[boot_seed_key] = claims.boot_seed
    _put_optional(claims_map, CLAIM_CERTIFICATION_REFERENCE, claims.certification_reference)
    _put_optional(claims_map, CLAIM_VERIFICATION_SERVICE, claims.verification_service)
    if claims.platform is not None:
        claims_map.update(_platform_map(claims.platform))
    return claims_map


def _component_map(component: SoftwareComponent) -> dict[int, object]:
    component_map: dict[int, object] = {
        COMPONENT_VALUE: component.measurement_value,
        COMPONENT_SIGNER_ID: component.signer_id,
    }
    _put_optional(component_map, COMPONENT_TYPE, component.measurement_type)
    _put_optional(component_map, COMPONENT_VERSION, component.version)
    _put_optional(component_map, COMPONENT_DESC, component.measurement_desc)
    return component_map


def _platform_map(platform: PlatformClaims) -> dict[int, object]:
    return {
        CLAIM_FUSE_COUNTERS: dict(platform.fuse_counters),
        CLAIM_BOOT_COUNT: _plain_int(platform.boot_count),
        CLAIM_SECURE_BOOT: platform.secure_boot,
        CLAIM_DEBUG_PORT_OPEN: platform.debug_port_open,
        CLAIM_SMT_ENABLED: platform.smt_enabled,
    }


def _plain_int(value: int) -> int:
    """``int(value)`` for an int subclass such as ``Lifecycle.SECURED``; a bool stays a bool."""
    return value if isinstance(value, bool) or not isinstance(value, int) else int(value)


def _put_optional(target: dict[int, object], key: int, value: object | None) -> None:
    if value is not None:
        target[key] = value


# --- decoding ------------------------------------------------------------------------------------
#
# Verifying is on the gateway's hot path (DESIGN §12), so each claim costs one dict look-up and
# one exact type test (cbor2 yields exact ``bytes``/``str``/``int``/``dict``/``list``); the error
# message is built only on failure. The checks are written twice. ``_claims_fast`` makes them all
# inline, with no call per claim, and only answers "all good" (the claims) or "not all good"
# (None). ``_claims_checked`` makes the same checks through one getter per claim and raises the
# error naming the first claim that fails. A map goes through the fast one and, only when that
# fails, through the checked one: the errors are always the checked one's, and a map the fast one
# would wrongly refuse still decodes. tests/test_psa.py holds the two equal on generated and
# mutated maps; a rule changed in one must be changed in the other.


def decode_claims(payload: bytes) -> PsaClaims:
    """Decode and check a PSA claims map (the payload of a token).

    Raises:
        MalformedMessage: not CBOR, not a map, an unknown profile, or a claim of the profile
            missing, of the wrong type, size or range.
    """
    return _claims_from_map(cbor.loads(payload, what=_WHAT, max_bytes=MAX_TOKEN_BYTES))


def _claims_from_map(obj: object) -> PsaClaims:
    if type(obj) is dict:
        claims = _claims_fast(obj)
        if claims is not None:
            return claims
    return _claims_checked(obj)


# A frozen dataclass's ``__init__`` pays one ``object.__setattr__`` by name per field; the fast
# decoder has already checked every value, so it writes the slots through their descriptors
# instead, unrolled: the same object, for about 60 % of the cost (tests/test_psa.py holds what it
# builds equal to what the constructors build).
_new: Final = object.__new__
_COMPONENT_SLOTS: Final = tuple(
    getattr(SoftwareComponent, f.name).__set__ for f in fields(SoftwareComponent)
)
_PLATFORM_SLOTS: Final = tuple(
    getattr(PlatformClaims, f.name).__set__ for f in fields(PlatformClaims)
)
_CLAIMS_SLOTS: Final = tuple(getattr(PsaClaims, f.name).__set__ for f in fields(PsaClaims))


def _claims_fast(claims: dict[object, object]) -> PsaClaims | None:
    """``_claims_checked(claims)`` when every check passes, else None: the same checks, inline.

    An optional text claim reads as None both when absent and when CBOR null; null is refused (as
    ``_opt_text`` refuses it) by a second look-up, made only in that case.
    """
    get = claims.get
    profile = get(CLAIM_PROFILE)
    if type(profile) is not str:
        return None
    rules = _RULES.get(profile)  # a known profile is short enough
    if rules is None:
        return None
    client_id = get(CLAIM_CLIENT_ID)
    if type(client_id) is not int or not CLIENT_ID_MIN <= client_id <= CLIENT_ID_MAX:
        return None
    lifecycle = get(CLAIM_LIFECYCLE)  # then _lifecycle_ok's rule, inline
    if type(lifecycle) is not int or not 0 <= lifecycle <= _LIFECYCLE_MAX or lifecycle & 0x0F00:
        return None
    implementation_id = get(CLAIM_IMPLEMENTATION_ID)
    if type(implementation_id) is not bytes or len(implementation_id) != IMPLEMENTATION_ID_BYTES:
        return None
    boot_seed = get(rules.boot_seed_key, _MISSING)
    if boot_seed is _MISSING:
        if rules.boot_seed_required:
            return None
        boot_seed = b""
    elif type(boot_seed) is not bytes or len(boot_seed) not in rules.boot_seed_sizes:
        return None
    instance_id = get(CLAIM_INSTANCE_ID)
    if (
        type(instance_id) is not bytes
        or len(instance_id) != INSTANCE_ID_BYTES
        or instance_id[0] != INSTANCE_ID_TYPE_RAND
    ):
        return None
    nonce = get(CLAIM_NONCE)
    if type(nonce) is not bytes or len(nonce) not in HASH_SIZES:
        return None
    components = _components_fast(get(CLAIM_SOFTWARE_COMPONENTS))
    if components is None:
        return None
    reference = get(CLAIM_CERTIFICATION_REFERENCE)
    if type(reference) is str:
        if len(reference) > MAX_TEXT or not rules.certification_reference.fullmatch(reference):
            return None
    elif reference is not None or CLAIM_CERTIFICATION_REFERENCE in claims:
        return None
    service = get(CLAIM_VERIFICATION_SERVICE)
    if type(service) is str:
        if len(service) > MAX_TEXT:
            return None
    elif service is not None or CLAIM_VERIFICATION_SERVICE in claims:
        return None
    platform = None
    if not _PLATFORM_KEYS.isdisjoint(claims):
        platform = _platform_fast(claims)
        if platform is None:
            return None
    obj: PsaClaims = _new(PsaClaims)
    (s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10) = _CLAIMS_SLOTS  # in PsaClaims's field order
    s0(obj, profile)
    s1(obj, client_id)
    s2(obj, lifecycle)
    s3(obj, implementation_id)
    s4(obj, boot_seed)
    s5(obj, instance_id)
    s6(obj, nonce)
    s7(obj, components)
    s8(obj, reference)
    s9(obj, service)
    s10(obj, platform)
    return obj


def _components_fast(items: object) -> tuple[SoftwareComponent, ...] | None:
    """``_components(claims)`` for ``items`` (the claim's value) when all checks pass, else None."""
    if type(items) is not list or not 1 <= len(items) <= MAX_COMPONENTS:
        return None
    components = []
    set_value, set_signer, set_kind, set_version, set_desc = _COMPONENT_SLOTS
    for item in items:
        if type(item) is not dict:
            return None
        value = item.get(COMPONENT_VALUE)
        signer = item.get(COMPONENT_SIGNER_ID)
        if (
            type(value) is not bytes
            or len(value) not in HASH_SIZES
            or type(signer) is not bytes
            or len(signer) not in HASH_SIZES
        ):
            return None
        kind = item.get(COMPONENT_TYPE)
        if type(kind) is str:
            if len(kind) > MAX_TEXT:
                return None
        elif kind is not None or COMPONENT_TYPE in item:
            return None
        version = item.get(COMPONENT_VERSION)
        if type(version) is str:
            if len(version) > MAX_TEXT:
                return None
        elif version is not None or COMPONENT_VERSION in item:
            return None
        desc = item.get(COMPONENT_DESC)
        if type(desc) is str:
            if len(desc) > MAX_TEXT:
                return None
        elif desc is not None or COMPONENT_DESC in item:
            return None
        component: SoftwareComponent = _new(SoftwareComponent)
        set_value(component, value)
        set_signer(component, signer)
        set_kind(component, kind)
        set_version(component, version)
        set_desc(component, desc)
        components.append(component)
    return tuple(components)


def _platform_fast(claims: dict[object, object]) -> PlatformClaims | None:
    """``_platform(claims)`` when every check passes, else None (only called with some present)."""
    get = claims.get
    counters = get(CLAIM_FUSE_COUNTERS)
    if type(counters) is not dict or len(counters) > MAX_FUSE_COUNTERS:
        return None
    for name, value in counters.items():
        if (
            type(name) is not str
            or not 1 <= len(name) <= MAX_COUNTER_NAME
            or type(value) is not int
            or not 0 <= value <= MAX_COUNTER
        ):
            return None
    boot_count = get(CLAIM_BOOT_COUNT)
    if type(boot_count) is not int or not 0 <= boot_count <= MAX_BOOT_COUNT:
        return None
    secure_boot = get(CLAIM_SECURE_BOOT)
    debug_port_open = get(CLAIM_DEBUG_PORT_OPEN)
    smt_enabled = get(CLAIM_SMT_ENABLED)
    if type(secure_boot) is not bool or type(debug_port_open) is not bool:
        return None
    if type(smt_enabled) is not bool:
        return None
    platform: PlatformClaims = _new(PlatformClaims)
    set_counters, set_boot_count, set_secure_boot, set_debug_port, set_smt = _PLATFORM_SLOTS
    # The names are unique (map keys), so these pairs are what PlatformClaims.__post_init__ makes.
    set_counters(platform, tuple(sorted(counters.items())))
    set_boot_count(platform, boot_count)
    set_secure_boot(platform, secure_boot)
    set_debug_port(platform, debug_port_open)
    set_smt(platform, smt_enabled)
    return platform


def _claims_checked(obj: object) -> PsaClaims:
    claims = _as_map(obj, _WHAT)
    profile = _text(claims, CLAIM_PROFILE, _WHAT, "profile")
    rules = _RULES.get(profile)
    if rules is None:
        raise MalformedMessage(f"{_WHAT}.profile: unsupported profile {profile!r:.80}")
    return PsaClaims(  # in field order: the checks run in this order
        profile,
        _int(claims, CLAIM_CLIENT_ID, "client id", CLIENT_ID_MIN, CLIENT_ID_MAX),
        _lifecycle(claims),
        _bytes(claims, CLAIM_IMPLEMENTATION_ID, _WHAT, "implementation id", _ID),
        _boot_seed(claims, rules),
        _instance_id(claims),
        _bytes(claims, CLAIM_NONCE, _WHAT, "nonce", HASH_SIZES),
        _components(claims),
        _certification_reference(claims, rules),
        _opt_text(claims, CLAIM_VERIFICATION_SERVICE, _WHAT, "verification service"),
        _platform(claims),
    )


_ID: Final = frozenset({IMPLEMENTATION_ID_BYTES})
_PLATFORM_KEYS: Final = frozenset(PLATFORM_CLAIMS)
_UEID: Final = frozenset({INSTANCE_ID_BYTES})


def _lifecycle(claims: dict[object, object]) -> int:
    # RFC 9783 §4.3.1: major state in bits 15:8 (0x00..0x60), any minor state in bits 7:0.
    value = _int(claims, CLAIM_LIFECYCLE, "security lifecycle", 0, 0xFFFF)
    if not _lifecycle_ok(value):
        raise MalformedMessage(f"{_WHAT}.security lifecycle: 0x{value:04x} is not a PSA state")
    return value


def _boot_seed(claims: dict[object, object], rules: _Rules) -> bytes:
    # RFC 9783 §4.3.2: optional, 8-32 bytes at 268; PSA 2.0.0: mandatory, 32 bytes at 2397.
    if rules.boot_seed_key not in claims and not rules.boot_seed_required:
        return b""
    return _bytes(claims, rules.boot_seed_key, _WHAT, "boot seed", rules.boot_seed_sizes)


def _instance_id(claims: dict[object, object]) -> bytes:
    # RFC 9783 §4.2.1: a UEID of type RAND (0x01) followed by 32 bytes.
    value = _bytes(claims, CLAIM_INSTANCE_ID, _WHAT, "instance id", _UEID)
    if value[0] != INSTANCE_ID_TYPE_RAND:
        raise MalformedMessage(
            f"{_WHAT}.instance id: expected type 0x01 (RAND), got 0x{value[0]:02x}"
        )
    return value


def _certification_reference(claims: dict[object, object], rules: _Rules) -> str | None:
    value = _opt_text(claims, CLAIM_CERTIFICATION_REFERENCE, _WHAT, "certification reference")
    if value is not None and not rules.certification_reference.fullmatch(value):
        raise MalformedMessage(
            f"{_WHAT}.certification reference: expected {rules.certification_reference.pattern},"
            f" got {value!r:.40}"
        )
    return value


def _components(claims: dict[object, object]) -> tuple[SoftwareComponent, ...]:
    # RFC 9783 §4.4.1: a non-empty array of components.
    items = claims.get(CLAIM_SOFTWARE_COMPONENTS, _MISSING)
    if type(items) is not list or not 1 <= len(items) <= MAX_COMPONENTS:
        raise _bad(_WHAT, "software components", f"1-{MAX_COMPONENTS} components", items)
    return tuple([_component(item, index) for index, item in enumerate(items)])


_COMPONENT_WHERE: Final = tuple(f"{_WHAT}.software components[{i}]" for i in range(MAX_COMPONENTS))


def _component(obj: object, index: int) -> SoftwareComponent:
    where = _COMPONENT_WHERE[index]
    component = _as_map(obj, where)
    return SoftwareComponent(
        _bytes(component, COMPONENT_VALUE, where, "measurement value", HASH_SIZES),
        _bytes(component, COMPONENT_SIGNER_ID, where, "signer id", HASH_SIZES),
        _opt_text(component, COMPONENT_TYPE, where, "measurement type"),
        _opt_text(component, COMPONENT_VERSION, where, "version"),
        _opt_text(component, COMPONENT_DESC, where, "measurement desc"),
    )


def _platform(claims: dict[object, object]) -> PlatformClaims | None:
    # All five private claims or none: a partial set is a producer bug or a forgery.
    if _PLATFORM_KEYS.isdisjoint(claims):
        return None
    return PlatformClaims(
        _fuse_counters(claims),
        _int(claims, CLAIM_BOOT_COUNT, "boot count", 0, MAX_BOOT_COUNT),
        _bool(claims, CLAIM_SECURE_BOOT, "secure boot"),
        _bool(claims, CLAIM_DEBUG_PORT_OPEN, "debug port open"),
        _bool(claims, CLAIM_SMT_ENABLED, "smt enabled"),
    )


def _fuse_counters(claims: dict[object, object]) -> tuple[tuple[str, int], ...]:
    counters = claims.get(CLAIM_FUSE_COUNTERS, _MISSING)
    if type(counters) is not dict or len(counters) > MAX_FUSE_COUNTERS:
        raise _bad(_WHAT, "fuse counters", f"a map of at most {MAX_FUSE_COUNTERS}", counters)
    for name, value in counters.items():
        if type(name) is not str or not 1 <= len(name) <= MAX_COUNTER_NAME:
            expected = f"names of 1-{MAX_COUNTER_NAME} characters"
            raise _bad(_WHAT, "fuse counters", expected, name)
        if type(value) is not int or not 0 <= value <= MAX_COUNTER:
            raise _bad(f"{_WHAT}.fuse counters", name, f"an integer in [0, {MAX_COUNTER}]", value)
    return tuple(sorted(counters.items()))


# --- typed claim getters: one look-up and one exact type test each --------------------------------


def _as_map(obj: object, where: str) -> dict[object, object]:
    if type(obj) is not dict:
        raise _bad(where, "", "a map", obj)
    return obj


def _bytes(
    claims: dict[object, object], key: int, where: str, name: str, sizes: frozenset[int] | range
) -> bytes:
    value = claims.get(key, _MISSING)
    if type(value) is not bytes or len(value) not in sizes:
        raise _bad(where, name, f"{_sizes(sizes)} bytes", value)
    return value


def _int(claims: dict[object, object], key: int, name: str, lo: int, hi: int) -> int:
    value = claims.get(key, _MISSING)
    if type(value) is not int or not lo <= value <= hi:
        raise _bad(_WHAT, name, f"an integer in [{lo}, {hi}]", value)
    return value


def _bool(claims: dict[object, object], key: int, name: str) -> bool:
    value = claims.get(key, _MISSING)
    if type(value) is not bool:
        raise _bad(_WHAT, name, "a boolean", value)
    return value


def _text(claims: dict[object, object], key: int, where: str, name: str) -> str:
    value = claims.get(key, _MISSING)
    if type(value) is not str or len(value) > MAX_TEXT:
        raise _bad(where, name, f"text of at most {MAX_TEXT} characters", value)
    return value


def _opt_text(claims: dict[object, object], key: int, where: str, name: str) -> str | None:
    value = claims.get(key, _MISSING)
    if value is _MISSING:
        return None
    if type(value) is not str or len(value) > MAX_TEXT:
        raise _bad(where, name, f"text of at most {MAX_TEXT} characters", value)
    return value


def _bad(where: str, name: str, expected: str, value: object) -> MalformedMessage:
    """The error for a claim: where, which, expected against got (kind and size, not contents)."""
    field = f"{where}.{name}" if name else where
    if value is _MISSING:
        return MalformedMessage(f"{field}: missing (expected {expected})")
    return MalformedMessage(f"{field}: expected {expected}, got {_describe(value)}")


def _sizes(sizes: frozenset[int] | range) -> str:
    if isinstance(sizes, range):
        low, high = sizes.start, sizes.stop - 1
        return str(low) if low == high else f"{low}-{high}"
    return " or ".join(str(size) for size in sorted(sizes))


def _describe(value: object) -> str:
    """A value's kind and size for an error message, never its contents."""
    if isinstance(value, bytes):
        return f"a byte string of {len(value)} bytes"
    if isinstance(value, str):
        return f"text of {len(value)} characters"
    if isinstance(value, list | dict):
        return f"{type(value).__name__} of {len(value)} elements"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return f"the integer {value}" if abs(value) < 1 << 64 else "a big integer"
    return type(value).__name__


# --- tokens --------------------------------------------------------------------------------------


def sign_token(claims: PsaClaims, iak: ec.EllipticCurvePrivateKey | cose.Es256Signer) -> bytes:
    """Sign ``claims`` as a tagged COSE_Sign1 with ES256 under the IAK (or a signer holding it).

    Raises:
        MalformedMessage: (a ``ValueError``) the claims would not decode.
        TypeError: ``iak`` is neither a P-256 private key nor a callable signer.
    """
    return cose.sign1_create(encode_claims(claims), iak)


def verify_token(
    token: bytes, iak_public: ec.EllipticCurvePublicKey, *, expected_nonce: bytes | None = None
) -> PsaClaims:
    """Verify a PSA token under ``iak_public`` and return its claims.

    The signature is checked before any claim is read; the nonce, when expected, after.

    Raises:
        MalformedMessage: not a well-formed COSE_Sign1, or its (signed) claims are ill-formed.
        InvalidToken: the signature does not verify under ``iak_public``, or the nonce differs
            from ``expected_nonce``.
    """
    parsed = _parse_sign1(token)
    try:
        cose.verify_parsed(parsed, iak_public)
    except InvalidSignature as err:
        raise InvalidToken("PSA token: signature does not verify") from err
    claims = decode_claims(parsed.payload)
    if expected_nonce is not None and not hmac.compare_digest(claims.nonce, expected_nonce):
        raise InvalidToken("PSA token: nonce does not match the challenge")
    return claims


def parse_unverified_token(token: bytes) -> PsaClaims:
    """The claims of a PSA token *without* checking its signature (offline display only).

    Raises:
        MalformedMessage: not a well-formed COSE_Sign1 over a well-formed claims map.
    """
    return decode_claims(_parse_sign1(token).payload)


#: A tuple, not ``bytes | bytearray | memoryview``: that union would be built again at every call.
_BYTES_TYPES: Final = (bytes, bytearray, memoryview)


def _parse_sign1(token: bytes) -> cose.CoseMessage:
    if isinstance(token, _BYTES_TYPES) and len(token) > MAX_TOKEN_BYTES:
        raise MalformedMessage(
            f"{_WHAT}: {len(token)} bytes exceeds the limit of {MAX_TOKEN_BYTES}"
        )
    return cose.sign1_parse_unverified(token)


def bind_nonce(challenge: bytes, enclave_public_raw: bytes) -> bytes:
    """The token nonce binding a challenge to the enclave's ephemeral X25519 key (DESIGN §6).

    nonce = SHA-256(canonical CBOR ["edgeseal/bind/v1", challenge, enclave public key]).

    Raises:
        ValueError: ``challenge`` is not 32 bytes or ``enclave_public_raw`` is not 32 bytes.
    """
    _require_size("challenge", challenge, CHALLENGE_BYTES)
    _require_size("enclave X25519 public key", enclave_public_raw, X25519_PUBLIC_BYTES)
    binding = cbor.dumps_ordered([BIND_LABEL, challenge, enclave_public_raw])  # no map to sort
    return hashlib.sha256(binding).digest()


def _require_size(name: str, value: bytes, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        got = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
        raise ValueError(f"{name}: expected {size} bytes, got {got}")


def find_component(claims: PsaClaims, measurement_type: str) -> SoftwareComponent | None:
    """The first software component of ``measurement_type`` (e.g. "BL2"), or None."""
    for component in claims.software_components:
        if component.measurement_type == measurement_type:
            return component
    return None
