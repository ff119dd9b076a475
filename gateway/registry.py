"""The gateway's registry: devices, trust anchors, reference values, releases (DESIGN §10).

SQLAlchemy Core over SQLite or PostgreSQL (``gateway.db``). Rules:

- Every mutating method is one write transaction (``BEGIN IMMEDIATE`` on SQLite), so two gateway
  processes sharing one database never interleave inside a method. On PostgreSQL, methods that
  read, check and then write (epochs, assignments, policies) also take an advisory lock; the
  others are single statements or rest on a unique key.
- Time is a parameter (``now_s``); nothing here reads a clock.
- Rows leave as frozen dataclasses (``DeviceRecord``, ``ReleaseRecord``, ...); no ``dict`` crosses
  this module's boundary.
- Single use of challenges (DESIGN §9) rests on a primary key: ``consume_challenge`` inserts, and
  the database refuses a second insert of the same id, whichever process tries it.
- The schema is versioned (``schema_version`` row ``registry``); ``Registry.open`` creates it or
  checks it and refuses a newer one.

Who raises what: ``UnknownDevice``, ``UnknownRelease``, ``UnknownTrustAnchor`` and
``RegistryConflict`` are ``UsageError`` (an operator or caller asked for something the registry
does not hold or would not allow); ``ChallengeReplayed`` and ``ChallengeExpired`` are
``InvalidChallenge`` (untrusted input failed a check); a database failure is ``TransportError``.
Programming errors (a wrong size, a negative counter) are ``ValueError``.

Reference values use ``protocol.bundles.ComponentType``; verdicts use the EAR status
``protocol.reasons.Status``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, RowMapping

from gateway import db
from protocol.bundles import ComponentType
from protocol.errors import InvalidChallenge, UsageError
from protocol.ids import ClassId, DeviceId, Product, ReleaseId, SessionId, class_id
from protocol.keys import p256_from_point, p256_point, signer_id
from protocol.reasons import Status

#: The registry schema this code reads and writes.
SCHEMA_VERSION: Final = 1
#: Expired challenges are kept this long past expiry before a purge, so gateway instances whose
#: clocks differ by less than this can never see a purged challenge as unused (DESIGN §9).
CHALLENGE_PURGE_GRACE_S: Final = 600
#: Advisory lock key that serializes read-check-write changes (epochs, assignments, policies) on
#: PostgreSQL, as ``BEGIN IMMEDIATE`` does on SQLite (an arbitrary 63-bit constant).
REGISTRY_LOCK_KEY: Final = 0x6564_6765_7365_0003

_RELEASE_ID = re.compile(r"[0-9a-f]{64}")
_P256_POINT_BYTES: Final = 65

metadata: Final = sa.MetaData()

devices_table: Final = sa.Table(
    "devices",
    metadata,
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("product", sa.String(64), nullable=False, index=True),
    sa.Column("class_id", sa.LargeBinary(16), nullable=False),
    sa.Column("cert_secured_der", sa.LargeBinary, nullable=False),
    sa.Column("cert_debug_der", sa.LargeBinary, nullable=False),
    sa.Column("iak_secured_point", sa.LargeBinary(65), nullable=False),
    sa.Column("iak_debug_point", sa.LargeBinary(65), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("enrolled_at_s", sa.BigInteger, nullable=False),
    sa.Column("revoked_at_s", sa.BigInteger),
    sa.Column("revoke_reason", sa.Text),
    sa.Column("counters_json", sa.Text, nullable=False),
)

trust_anchors_table: Final = sa.Table(
    "trust_anchors",
    metadata,
    sa.Column("kind", sa.String(32), primary_key=True),
    sa.Column("signer_id", sa.LargeBinary(32), primary_key=True),
    sa.Column("public_point", sa.LargeBinary(65), nullable=False),
    sa.Column("cert_der", sa.LargeBinary),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("added_at_s", sa.BigInteger, nullable=False),
)

reference_values_table: Final = sa.Table(
    "reference_values",
    metadata,
    sa.Column("product", sa.String(64), primary_key=True),
    sa.Column("component", sa.String(16), primary_key=True),
    sa.Column("measurement", sa.LargeBinary(64), primary_key=True),
    sa.Column("version", sa.Text, nullable=False),
    sa.Column("signer_id", sa.LargeBinary(32), nullable=False),
    sa.Column("security_counter", sa.BigInteger, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("added_at_s", sa.BigInteger, nullable=False),
)

releases_table: Final = sa.Table(
    "releases",
    metadata,
    sa.Column("release_id", sa.String(64), primary_key=True),
    sa.Column("product", sa.String(64), nullable=False, index=True),
    sa.Column("version", sa.Text, nullable=False),
    sa.Column("security_counter", sa.BigInteger, nullable=False),
    sa.Column("sealed_image", sa.LargeBinary, nullable=False),
    sa.Column("wrapped_cek", sa.LargeBinary, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("created_s", sa.BigInteger, nullable=False),
    sa.Column("added_at_s", sa.BigInteger, nullable=False),
)

epochs_table: Final = sa.Table(
    "epochs",
    metadata,
    sa.Column("product", sa.String(64), primary_key=True),
    sa.Column("epoch", sa.BigInteger, nullable=False),
    sa.Column("set_at_s", sa.BigInteger, nullable=False),
)

assignments_table: Final = sa.Table(
    "assignments",
    metadata,
    sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.device_id"), primary_key=True),
    sa.Column("release_id", sa.String(64), sa.ForeignKey("releases.release_id"), nullable=False),
    sa.Column("assigned_at_s", sa.BigInteger, nullable=False),
)

used_challenges_table: Final = sa.Table(
    "used_challenges",
    metadata,
    sa.Column("challenge_id", sa.LargeBinary(64), primary_key=True),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("expires_s", sa.BigInteger, nullable=False, index=True),
    sa.Column("used_at_s", sa.BigInteger, nullable=False),
)

verdicts_table: Final = sa.Table(
    "verdicts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String(64), nullable=False, index=True),
    sa.Column("session_id", sa.LargeBinary(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reasons_json", sa.Text, nullable=False),
    sa.Column("policy_version", sa.BigInteger, nullable=False),
    sa.Column("explanation_json", sa.Text, nullable=False),
    sa.Column("at_s", sa.BigInteger, nullable=False),
)

receipts_table: Final = sa.Table(
    "receipts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String(64), nullable=False, index=True),
    sa.Column("session_id", sa.LargeBinary(16), nullable=False),
    sa.Column("release_id", sa.String(64), nullable=False),
    sa.Column("receipt", sa.LargeBinary, nullable=False),
    sa.Column("at_s", sa.BigInteger, nullable=False),
)

command_seq_table: Final = sa.Table(
    "command_seq",
    metadata,
    sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.device_id"), primary_key=True),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
)

policies_table: Final = sa.Table(
    "policies",
    metadata,
    sa.Column("version", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("document", sa.Text, nullable=False),
    sa.Column("at_s", sa.BigInteger, nullable=False),
)


# --- errors -----------------------------------------------------------------------------------


class UnknownDevice(UsageError):
    """The registry holds no device with this id (raised by ``get_device`` and device updates)."""


class UnknownRelease(UsageError):
    """The registry holds no release with this id (``get_release``, ``assign``)."""


class UnknownTrustAnchor(UsageError):
    """No trust anchor of this kind and signer id (``remove_trust_anchor``)."""


class RegistryConflict(UsageError):
    """The change contradicts what the registry holds: a duplicate, a lowered epoch, a release
    assigned across products or below the epoch, a policy version that is not newer."""


class ChallengeReplayed(InvalidChallenge):
    """A challenge was presented a second time (``consume_challenge``); refuse the session."""


class ChallengeExpired(InvalidChallenge):
    """A challenge was presented after its expiry (``consume_challenge``); refuse the session."""


# --- enums and records ------------------------------------------------------------------------


class DeviceStatus(StrEnum):
    """Whether a device may be appraised as genuine."""

    ACTIVE = "active"
    REVOKED = "revoked"


class TrustAnchorKind(StrEnum):
    """What an operator trusts a key for (``trust add``)."""

    MANUFACTURER_CA = "manufacturer_ca"
    VENDOR = "vendor"
    BUNDLE_SIGNER = "bundle_signer"


def _frozen_counters(counters: Mapping[str, int]) -> Mapping[str, int]:
    for name, value in counters.items():
        if not isinstance(name, str) or not name:
            raise ValueError("counters: names must be non-empty strings")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"counters: {name!r} must be a non-negative integer")
    return MappingProxyType(dict(sorted(counters.items())))


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """An enrolled device: identity, certificates, IAK public points per lifecycle class."""

    device_id: DeviceId
    product: Product
    class_id: ClassId
    cert_secured_der: bytes
    cert_debug_der: bytes
    iak_secured_point: bytes
    iak_debug_point: bytes
    status: DeviceStatus
    enrolled_at_s: int
    revoked_at_s: int | None = None
    revoke_reason: str | None = None
    counters: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def revoked(self) -> bool:
        """Whether the device is revoked."""
        return self.status is DeviceStatus.REVOKED


@dataclass(frozen=True, slots=True)
class TrustAnchor:
    """A key the operator trusts for one purpose; ``signer_id`` = SHA-256(SEC1 point)."""

    kind: TrustAnchorKind
    signer_id: bytes
    public_point: bytes
    name: str
    added_at_s: int
    cert_der: bytes | None = None

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The anchor's P-256 public key."""
        return p256_from_point(self.public_point)


@dataclass(frozen=True, slots=True)
class ReferenceValue:
    """An expected measurement of one component of a product, and where it came from."""

    product: Product
    component: ComponentType
    measurement: bytes
    version: str
    signer_id: bytes
    security_counter: int
    source: str


@dataclass(frozen=True, slots=True)
class ReleaseRecord:
    """A release: a sealed image (fetched separately) and its CEK as received, wrapped."""

    release_id: ReleaseId
    product: Product
    version: str
    security_counter: int
    wrapped_cek: bytes
    size_bytes: int
    created_s: int
    added_at_s: int


@dataclass(frozen=True, slots=True)
class VerdictRecord:
    """One appraisal result as recorded: EAR status, reason codes, explanation (JSON text)."""

    device_id: DeviceId
    session_id: SessionId
    status: Status
    reasons: tuple[str, ...]
    policy_version: int
    explanation_json: str
    at_s: int


@dataclass(frozen=True, slots=True)
class ReceiptRecord:
    """A signed key-release receipt (DESIGN §10), as sent."""

    device_id: DeviceId
    session_id: SessionId
    release_id: ReleaseId
    receipt: bytes
    at_s: int


@dataclass(frozen=True, slots=True)
class PolicyRecord:
    """One version of the appraisal policy document."""

    version: int
    document: str
    at_s: int


@dataclass(frozen=True, slots=True)
class AppraisalSnapshot:
    """What the appraisal of one device reads, from one read transaction
    (``Registry.appraisal_snapshot``)."""

    device: DeviceRecord
    anchors: tuple[TrustAnchor, ...]
    reference_values: tuple[ReferenceValue, ...]
    epoch: int
    assigned: ReleaseId | None
    #: The assigned release when it is in the registry (None when absent or unassigned).
    assigned_release: ReleaseRecord | None
    #: The newest stored policy (None when none is stored: the built-in default applies).
    policy: PolicyRecord | None


# --- the registry -----------------------------------------------------------------------------


class Registry:
    """The gateway's registry over one database; open it with ``Registry.open(engine)``."""

    __slots__ = ("_engine",)

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @classmethod
    def open(cls, engine: Engine) -> Registry:
        """Create the registry schema in ``engine``'s database, or check the one there.

        Raises:
            SchemaVersionError: the database holds a schema of another version.
            TransportError: the database failed underneath.
        """
        db.ensure_schema(engine, "registry", SCHEMA_VERSION, metadata)
        return cls(engine)

    @property
    def engine(self) -> Engine:
        """The engine this registry writes to."""
        return self._engine

    # --- devices

    def enroll_device(
        self,
        device: DeviceId,
        *,
        product: Product,
        cert_secured_der: bytes,
        cert_debug_der: bytes,
        iak_secured_point: bytes,
        iak_debug_point: bytes,
        counters: Mapping[str, int] | None = None,
        now_s: int,
    ) -> DeviceRecord:
        """Enroll a device as active (from an enrollment bundle, DESIGN §7).

        Raises:
            RegistryConflict: a device with this id is already enrolled (even revoked).
            ValueError: an IAK point is not 65 bytes or a counter is negative.
        """
        for point in (iak_secured_point, iak_debug_point):
            if len(point) != _P256_POINT_BYTES or point[0] != 0x04:
                raise ValueError("IAK point: expected a 65-byte SEC1 uncompressed point")
        record = DeviceRecord(
            device_id=device,
            product=product,
            class_id=class_id(product),
            cert_secured_der=cert_secured_der,
            cert_debug_der=cert_debug_der,
            iak_secured_point=iak_secured_point,
            iak_debug_point=iak_debug_point,
            status=DeviceStatus.ACTIVE,
            enrolled_at_s=now_s,
            counters=_frozen_counters(counters or {}),
        )
        values = {
            "device_id": record.device_id,
            "product": record.product,
            "class_id": record.class_id,
            "cert_secured_der": record.cert_secured_der,
            "cert_debug_der": record.cert_debug_der,
            "iak_secured_point": record.iak_secured_point,
            "iak_debug_point": record.iak_debug_point,
            "status": record.status.value,
            "enrolled_at_s": now_s,
            "counters_json": json.dumps(dict(record.counters), sort_keys=True),
        }
        self._insert_unique(devices_table, values, f"device {device!r} is already enrolled")
        return record

    def find_device(self, device: DeviceId) -> DeviceRecord | None:
        """The device ``device``, or None when it is not enrolled."""
        with db.read_transaction(self._engine) as conn:
            row = _SELECT_DEVICE.first(conn, {"device_id": device})
        return None if row is None else _device(row)

    @staticmethod
    def find_device_in(conn: Connection, device: DeviceId) -> DeviceRecord | None:
        """``find_device`` inside the caller's transaction ``conn``."""
        row = _SELECT_DEVICE.first(conn, {"device_id": device})
        return None if row is None else _device(row)

    def iak_points(self, device: DeviceId) -> tuple[bytes, bytes] | None:
        """The enrolled IAK points of ``device`` (SECURED class, debug class), or None when it
        is not enrolled: what a verifier needs of a device, without the rest of its row."""
        with db.read_transaction(self._engine) as conn:
            row = _SELECT_IAK_POINTS.first(conn, {"device_id": device})
        if row is None:
            return None
        return bytes(row["iak_secured_point"]), bytes(row["iak_debug_point"])

    def get_device(self, device: DeviceId) -> DeviceRecord:
        """The device ``device``.

        Raises:
            UnknownDevice: it is not enrolled.
        """
        record = self.find_device(device)
        if record is None:
            raise UnknownDevice(f"device {device!r} is not enrolled")
        return record

    def list_devices(self, product: Product | None = None) -> tuple[DeviceRecord, ...]:
        """Every enrolled device (of ``product`` when given), ordered by id."""
        query = sa.select(devices_table).order_by(devices_table.c.device_id)
        if product is not None:
            query = query.where(devices_table.c.product == product)
        with db.read_transaction(self._engine) as conn:
            return tuple(_device(row._mapping) for row in conn.execute(query))

    def revoke_device(self, device: DeviceId, *, reason: str, now_s: int) -> DeviceRecord:
        """Mark ``device`` revoked; revoking a revoked device keeps the first revocation.

        Raises:
            UnknownDevice: it is not enrolled.
        """
        with db.write_transaction(self._engine) as conn:
            self._require_device(conn, device)
            conn.execute(
                sa.update(devices_table)
                .where(devices_table.c.device_id == device)
                .where(devices_table.c.status == DeviceStatus.ACTIVE.value)
                .values(status=DeviceStatus.REVOKED.value, revoked_at_s=now_s, revoke_reason=reason)
            )
        return self.get_device(device)

    def set_counters(self, device: DeviceId, counters: Mapping[str, int]) -> DeviceRecord:
        """Replace the device's last known counters (fuse counters, boot count).

        Raises:
            UnknownDevice: it is not enrolled.
            ValueError: a counter is negative or not an integer.
        """
        frozen = _frozen_counters(counters)
        with db.write_transaction(self._engine) as conn:
            self._require_device(conn, device)
            conn.execute(
                sa.update(devices_table)
                .where(devices_table.c.device_id == device)
                .values(counters_json=json.dumps(dict(frozen), sort_keys=True))
            )
        return self.get_device(device)

    # --- trust anchors

    def add_trust_anchor(
        self,
        kind: TrustAnchorKind,
        *,
        public_key: ec.EllipticCurvePublicKey,
        name: str,
        now_s: int,
        cert_der: bytes | None = None,
    ) -> TrustAnchor:
        """Trust ``public_key`` for ``kind`` (``trust add``); ``cert_der`` must carry that key.

        Raises:
            RegistryConflict: this key is already trusted for ``kind``.
            ValueError: the key is not P-256, or ``cert_der`` is not a certificate of that key.
        """
        point = p256_point(public_key)
        if cert_der is not None:
            _check_certificate_key(cert_der, point)
        anchor = TrustAnchor(
            kind=TrustAnchorKind(kind),
            signer_id=signer_id(public_key),
            public_point=point,
            name=name,
            added_at_s=now_s,
            cert_der=cert_der,
        )
        values = {
            "kind": anchor.kind.value,
            "signer_id": anchor.signer_id,
            "public_point": point,
            "cert_der": cert_der,
            "name": name,
            "added_at_s": now_s,
        }
        self._insert_unique(
            trust_anchors_table, values, f"{anchor.kind} {anchor.signer_id.hex()} already trusted"
        )
        return anchor

    def list_trust_anchors(self, kind: TrustAnchorKind | None = None) -> tuple[TrustAnchor, ...]:
        """The trust anchors (of ``kind`` when given), ordered by kind and signer id."""
        table = trust_anchors_table
        query = sa.select(table).order_by(table.c.kind, table.c.signer_id)
        if kind is not None:
            query = query.where(table.c.kind == TrustAnchorKind(kind).value)
        with db.read_transaction(self._engine) as conn:
            return tuple(_trust_anchor(row._mapping) for row in conn.execute(query))

    def find_trust_anchor(self, kind: TrustAnchorKind, signer: bytes) -> TrustAnchor | None:
        """The anchor of ``kind`` with signer id ``signer``, or None."""
        table = trust_anchors_table
        with db.read_transaction(self._engine) as conn:
            row = conn.execute(
                sa.select(table)
                .where(table.c.kind == TrustAnchorKind(kind).value)
                .where(table.c.signer_id == signer)
            ).one_or_none()
        return None if row is None else _trust_anchor(row._mapping)

    def remove_trust_anchor(self, kind: TrustAnchorKind, signer: bytes) -> None:
        """Stop trusting the key ``signer`` for ``kind`` (``trust remove``).

        Raises:
            UnknownTrustAnchor: no such anchor.
        """
        table = trust_anchors_table
        with db.write_transaction(self._engine) as conn:
            deleted = conn.execute(
                sa.delete(table)
                .where(table.c.kind == TrustAnchorKind(kind).value)
                .where(table.c.signer_id == signer)
            ).rowcount
        if deleted != 1:
            raise UnknownTrustAnchor(f"no {kind} trust anchor with signer id {signer.hex()}")

    # --- reference values

    def add_reference_value(self, value: ReferenceValue, *, now_s: int) -> None:
        """Record an expected measurement; adding the same value again changes nothing.

        Raises:
            RegistryConflict: the same (product, component, measurement) is recorded with another
                version, signer or counter.
        """
        values = {
            "product": value.product,
            "component": ComponentType(value.component).value,
            "measurement": value.measurement,
            "version": value.version,
            "signer_id": value.signer_id,
            "security_counter": value.security_counter,
            "source": value.source,
            "added_at_s": now_s,
        }
        try:
            with db.write_transaction(self._engine) as conn:
                conn.execute(sa.insert(reference_values_table).values(values))
        except exc.IntegrityError as err:
            existing = self._find_reference_value(value)
            if existing is None or not _same_reference(existing, value):
                raise RegistryConflict(
                    f"reference value {value.component} {value.measurement.hex()} of "
                    f"{value.product!r} is already recorded differently"
                ) from err

    def reference_values(
        self, product: Product, component: ComponentType | None = None
    ) -> tuple[ReferenceValue, ...]:
        """The reference values of ``product`` (of one ``component`` when given)."""
        table = reference_values_table
        query = (
            sa.select(table)
            .where(table.c.product == product)
            .order_by(table.c.component, table.c.security_counter, table.c.measurement)
        )
        if component is not None:
            query = query.where(table.c.component == ComponentType(component).value)
        with db.read_transaction(self._engine) as conn:
            return tuple(_reference_value(row._mapping) for row in conn.execute(query))

    def _find_reference_value(self, value: ReferenceValue) -> ReferenceValue | None:
        table = reference_values_table
        with db.read_transaction(self._engine) as conn:
            row = conn.execute(
                sa.select(table)
                .where(table.c.product == value.product)
                .where(table.c.component == ComponentType(value.component).value)
                .where(table.c.measurement == value.measurement)
            ).one_or_none()
        return None if row is None else _reference_value(row._mapping)

    # --- releases and epochs

    def add_release(
        self,
        release: ReleaseId,
        *,
        product: Product,
        version: str,
        security_counter: int,
        sealed_image: bytes,
        wrapped_cek: bytes,
        created_s: int,
        now_s: int,
    ) -> ReleaseRecord:
        """Store a release: its sealed image and its CEK exactly as received (wrapped).

        Raises:
            RegistryConflict: a release with this id exists.
            ValueError: ``release`` is not 64 lowercase hex digits, or the counter is negative.
        """
        if not _RELEASE_ID.fullmatch(release):
            raise ValueError("release id: expected 64 lowercase hex digits (a manifest digest)")
        if security_counter < 0:
            raise ValueError("security counter: expected a non-negative integer")
        record = ReleaseRecord(
            release_id=release,
            product=product,
            version=version,
            security_counter=security_counter,
            wrapped_cek=wrapped_cek,
            size_bytes=len(sealed_image),
            created_s=created_s,
            added_at_s=now_s,
        )
        values = {
            "release_id": release,
            "product": product,
            "version": version,
            "security_counter": security_counter,
            "sealed_image": sealed_image,
            "wrapped_cek": wrapped_cek,
            "size_bytes": record.size_bytes,
            "created_s": created_s,
            "added_at_s": now_s,
        }
        self._insert_unique(releases_table, values, f"release {release} already exists")
        return record

    def find_release(self, release: ReleaseId) -> ReleaseRecord | None:
        """The release ``release`` (without its image), or None."""
        with db.read_transaction(self._engine) as conn:
            return _find_release(conn, release)

    def get_release(self, release: ReleaseId) -> ReleaseRecord:
        """The release ``release`` (without its image).

        Raises:
            UnknownRelease: no such release.
        """
        record = self.find_release(release)
        if record is None:
            raise UnknownRelease(f"release {release} is not in the registry")
        return record

    def list_releases(self, product: Product | None = None) -> tuple[ReleaseRecord, ...]:
        """The releases (of ``product`` when given), ordered by product and security counter."""
        table = releases_table
        query = sa.select(*_RELEASE_COLUMNS).order_by(
            table.c.product, table.c.security_counter, table.c.release_id
        )
        if product is not None:
            query = query.where(table.c.product == product)
        with db.read_transaction(self._engine) as conn:
            return tuple(_release(row._mapping) for row in conn.execute(query))

    def release_image(self, release: ReleaseId) -> bytes:
        """The whole sealed image of ``release``.

        Raises:
            UnknownRelease: no such release.
        """
        table = releases_table
        with db.read_transaction(self._engine) as conn:
            image = conn.execute(
                sa.select(table.c.sealed_image).where(table.c.release_id == release)
            ).scalar_one_or_none()
        if image is None:
            raise UnknownRelease(f"release {release} is not in the registry")
        return bytes(image)

    def release_chunk(self, release: ReleaseId, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` of the sealed image (short or empty at the end).

        Raises:
            UnknownRelease: no such release.
            ValueError: ``offset`` is negative or ``length`` is not positive.
        """
        if offset < 0 or length <= 0:
            raise ValueError(f"chunk: offset {offset} and length {length} out of range")
        table = releases_table
        chunk = sa.func.substr(table.c.sealed_image, offset + 1, length, type_=sa.LargeBinary)
        with db.read_transaction(self._engine) as conn:
            found = conn.execute(
                sa.select(chunk).where(table.c.release_id == release)
            ).one_or_none()
        if found is None:
            raise UnknownRelease(f"release {release} is not in the registry")
        return bytes(found[0] or b"")

    def set_epoch(self, product: Product, epoch: int, *, now_s: int) -> None:
        """Raise the security epoch of ``product``: no release below it is ever released.

        Raises:
            RegistryConflict: ``epoch`` is below the current epoch (an epoch never goes down).
            ValueError: ``epoch`` is negative.
        """
        if epoch < 0:
            raise ValueError("epoch: expected a non-negative integer")
        with db.write_transaction(self._engine, lock_key=REGISTRY_LOCK_KEY) as conn:
            current = _epoch(conn, product)
            if epoch < current:
                raise RegistryConflict(
                    f"epoch of {product!r}: {epoch} is below the current {current}"
                )
            _upsert(
                conn,
                epochs_table,
                {"product": product, "epoch": epoch, "set_at_s": now_s},
                key="product",
            )

    def epoch(self, product: Product) -> int:
        """The security epoch of ``product`` (0 when never set)."""
        with db.read_transaction(self._engine) as conn:
            return _epoch(conn, product)

    # --- assignments

    def assign(self, device: DeviceId, release: ReleaseId, *, now_s: int) -> None:
        """Assign ``release`` to ``device`` (replacing any earlier assignment).

        Raises:
            UnknownDevice: the device is not enrolled.
            UnknownRelease: the release is not in the registry.
            RegistryConflict: the release is for another product, or below the product's epoch.
        """
        with db.write_transaction(self._engine, lock_key=REGISTRY_LOCK_KEY) as conn:
            record = self._require_device(conn, device)
            found = _find_release(conn, release)
            if found is None:
                raise UnknownRelease(f"release {release} is not in the registry")
            _check_assignable(record, found, _epoch(conn, record.product))
            _upsert(
                conn,
                assignments_table,
                {"device_id": device, "release_id": release, "assigned_at_s": now_s},
                key="device_id",
            )

    def assignment(self, device: DeviceId) -> ReleaseId | None:
        """The release assigned to ``device``, or None."""
        with db.read_transaction(self._engine) as conn:
            found = _SELECT_ASSIGNMENT.first(conn, {"device_id": device})
        return None if found is None else ReleaseId(found["release_id"])

    # --- challenges and command sequence numbers

    def consume_challenge(
        self, challenge: bytes, *, device: DeviceId, expires_s: int, now_s: int
    ) -> None:
        """Mark ``challenge`` used, once, across every gateway process (DESIGN §9).

        ``challenge`` is the challenge's id (its 32 random bytes, or a digest of it).

        Raises:
            ChallengeExpired: ``now_s`` is past ``expires_s`` (a purged challenge is never
                accepted again this way).
            ChallengeReplayed: the challenge was consumed before, by any process.
            ValueError: ``challenge`` is not 16 to 64 bytes.
        """
        with db.write_transaction(self._engine) as conn:
            self.consume_challenge_in(
                conn, challenge, device=device, expires_s=expires_s, now_s=now_s
            )

    @staticmethod
    def consume_challenge_in(
        conn: Connection, challenge: bytes, *, device: DeviceId, expires_s: int, now_s: int
    ) -> None:
        """``consume_challenge`` inside the caller's write transaction ``conn``: the challenge is
        used once the caller commits. On an exception the caller must roll back (on PostgreSQL
        the refused insert has aborted the transaction).

        Raises:
            ChallengeExpired: ``now_s`` is past ``expires_s``.
            ChallengeReplayed: the challenge was consumed before, by any process.
            ValueError: ``challenge`` is not 16 to 64 bytes.
        """
        if not 16 <= len(challenge) <= 64:
            raise ValueError(f"challenge id: expected 16 to 64 bytes, got {len(challenge)}")
        if now_s > expires_s:
            raise ChallengeExpired("challenge expired")
        values = {
            "challenge_id": challenge,
            "device_id": device,
            "expires_s": expires_s,
            "used_at_s": now_s,
        }
        try:
            _INSERT_CHALLENGE.rows(conn, values)
        except exc.IntegrityError as err:
            raise ChallengeReplayed("challenge already used") from err

    def purge_expired_challenges(self, now_s: int) -> int:
        """Forget challenges expired more than ``CHALLENGE_PURGE_GRACE_S`` ago; return how many."""
        table = used_challenges_table
        with db.write_transaction(self._engine) as conn:
            result = conn.execute(
                sa.delete(table).where(table.c.expires_s < now_s - CHALLENGE_PURGE_GRACE_S)
            )
            return int(result.rowcount)

    def next_command_seq(self, device: DeviceId) -> int:
        """The next command sequence number for ``device`` (1, 2, ...), atomically (DESIGN §8).

        Raises:
            UnknownDevice: the device is not enrolled.
        """
        table = command_seq_table
        with db.write_transaction(self._engine) as conn:
            self._require_device(conn, device)
            insert = _dialect_insert(conn, table).values(device_id=device, last_seq=1)
            statement = insert.on_conflict_do_update(
                index_elements=[table.c.device_id], set_={"last_seq": table.c.last_seq + 1}
            ).returning(table.c.last_seq)
            return int(conn.execute(statement).scalar_one())

    # --- verdicts, receipts, policies

    def record_verdict(
        self,
        device: DeviceId,
        *,
        session_id: SessionId,
        status: Status,
        reasons: Sequence[str],
        policy_version: int,
        explanation_json: str,
        now_s: int,
    ) -> VerdictRecord:
        """Record an appraisal result (the device need not be enrolled: refusals are kept too).

        Raises:
            ValueError: ``explanation_json`` is not JSON.
        """
        json.loads(explanation_json)
        record = VerdictRecord(
            device_id=device,
            session_id=session_id,
            status=Status(status),
            reasons=tuple(reasons),
            policy_version=policy_version,
            explanation_json=explanation_json,
            at_s=now_s,
        )
        values = {
            "device_id": device,
            "session_id": session_id,
            "status": record.status.value,
            "reasons_json": json.dumps(list(record.reasons)),
            "policy_version": policy_version,
            "explanation_json": explanation_json,
            "at_s": now_s,
        }
        with db.write_transaction(self._engine) as conn:
            _INSERT_VERDICT.rows(conn, values)
        return record

    def verdicts(self, device: DeviceId, *, limit: int | None = None) -> tuple[VerdictRecord, ...]:
        """The verdicts of ``device``, oldest first (the latest ``limit`` when given)."""
        table = verdicts_table
        rows = _history(self._engine, table, table.c.device_id == device, limit)
        return tuple(_verdict(row) for row in rows)

    def record_receipt(
        self,
        device: DeviceId,
        *,
        session_id: SessionId,
        release_id: ReleaseId,
        receipt: bytes,
        now_s: int,
    ) -> ReceiptRecord:
        """Record a signed key-release receipt."""
        record = ReceiptRecord(device, session_id, release_id, receipt, now_s)
        values = {
            "device_id": device,
            "session_id": session_id,
            "release_id": release_id,
            "receipt": receipt,
            "at_s": now_s,
        }
        with db.write_transaction(self._engine) as conn:
            _INSERT_RECEIPT.rows(conn, values)
        return record

    def receipts(self, device: DeviceId, *, limit: int | None = None) -> tuple[ReceiptRecord, ...]:
        """The receipts of ``device``, oldest first (the latest ``limit`` when given)."""
        table = receipts_table
        rows = _history(self._engine, table, table.c.device_id == device, limit)
        return tuple(_receipt(row) for row in rows)

    def add_policy(self, version: int, document: str, *, now_s: int) -> PolicyRecord:
        """Store a new policy version; it must be newer than every stored one.

        Raises:
            RegistryConflict: ``version`` is not above the latest stored version.
        """
        table = policies_table
        with db.write_transaction(self._engine, lock_key=REGISTRY_LOCK_KEY) as conn:
            latest = conn.execute(sa.select(sa.func.max(table.c.version))).scalar_one()
            if latest is not None and version <= latest:
                raise RegistryConflict(f"policy version {version} is not above {latest}")
            conn.execute(sa.insert(table).values(version=version, document=document, at_s=now_s))
        return PolicyRecord(version, document, now_s)

    def latest_policy(self) -> PolicyRecord | None:
        """The newest policy, or None when none was stored."""
        with db.read_transaction(self._engine) as conn:
            return _policy(_SELECT_LATEST_POLICY.first(conn))

    # --- the attestation hot path: one read snapshot, writes inside a caller's transaction

    def appraisal_snapshot(self, device: DeviceId) -> AppraisalSnapshot | None:
        """Everything an appraisal of ``device`` reads, in one read transaction: the device,
        the manufacturer CAs, the product's reference values and epoch, the assignment, the
        assigned release and the newest stored policy. None when the device is not enrolled."""
        with db.read_transaction(self._engine) as conn:
            return self.appraisal_snapshot_in(conn, device)

    def appraisal_snapshot_in(self, conn: Connection, device: DeviceId) -> AppraisalSnapshot | None:
        """``appraisal_snapshot`` inside the caller's transaction ``conn``."""
        mapping = _SELECT_DEVICE_SNAPSHOT.first(conn, {"device_id": device})
        if mapping is None:
            return None
        record = _device(mapping)
        epoch = 0 if mapping["s_epoch"] is None else int(mapping["s_epoch"])
        assigned = mapping["s_assigned"]
        release = None
        if mapping["s_release_id"] is not None:
            release = _release(
                {column.name: mapping[f"s_{column.name}"] for column in _RELEASE_COLUMNS}
            )
        anchors = tuple(
            _trust_anchor(found)
            for found in _SELECT_ANCHORS_OF_KIND.rows(
                conn, {"kind": TrustAnchorKind.MANUFACTURER_CA.value}
            )
        )
        references = tuple(
            _reference_value(found)
            for found in _SELECT_REFERENCES.rows(conn, {"product": record.product})
        )
        policy = _policy(_SELECT_LATEST_POLICY.first(conn))
        return AppraisalSnapshot(
            device=record,
            anchors=anchors,
            reference_values=references,
            epoch=epoch,
            assigned=None if assigned is None else ReleaseId(assigned),
            assigned_release=release,
            policy=policy,
        )

    @staticmethod
    def find_release_in(conn: Connection, release: ReleaseId) -> ReleaseRecord | None:
        """``find_release`` inside the caller's transaction ``conn``."""
        return _find_release(conn, release)

    @staticmethod
    def epoch_in(conn: Connection, product: Product) -> int:
        """``epoch`` inside the caller's transaction ``conn``."""
        return _epoch(conn, product)

    @staticmethod
    def record_verdict_in(conn: Connection, record: VerdictRecord) -> None:
        """Insert ``record`` (as ``record_verdict`` would) inside the caller's write transaction.

        Raises:
            ValueError: ``record.explanation_json`` is not JSON.
        """
        json.loads(record.explanation_json)
        _INSERT_VERDICT.rows(
            conn,
            {
                "device_id": record.device_id,
                "session_id": record.session_id,
                "status": Status(record.status).value,
                "reasons_json": json.dumps(list(record.reasons)),
                "policy_version": record.policy_version,
                "explanation_json": record.explanation_json,
                "at_s": record.at_s,
            },
        )

    @staticmethod
    def record_receipt_in(conn: Connection, record: ReceiptRecord) -> None:
        """Insert ``record`` (as ``record_receipt`` would) inside the caller's write transaction."""
        _INSERT_RECEIPT.rows(
            conn,
            {
                "device_id": record.device_id,
                "session_id": record.session_id,
                "release_id": record.release_id,
                "receipt": record.receipt,
                "at_s": record.at_s,
            },
        )

    @staticmethod
    def raise_counters_in(
        conn: Connection, device: DeviceId, seen: Mapping[str, int]
    ) -> Mapping[str, int] | None:
        """Raise the device's counters to at least ``seen`` (never lower one) inside the
        caller's write transaction; the new counters, or None when nothing changed or the
        device is not enrolled.

        Raises:
            ValueError: a counter is negative or not an integer.
        """
        found = _SELECT_COUNTERS.first(conn, {"device_id": device})
        if found is None:
            return None
        current = _frozen_counters(json.loads(found["counters_json"]))
        merged = dict(current)
        for name, value in seen.items():
            merged[name] = max(merged.get(name, 0), value)
        if merged == dict(current):
            return None
        frozen = _frozen_counters(merged)
        _UPDATE_COUNTERS.rows(
            conn,
            {"b_device_id": device, "b_counters_json": json.dumps(dict(frozen), sort_keys=True)},
        )
        return frozen

    # --- helpers

    def _insert_unique(self, table: sa.Table, values: Mapping[str, object], conflict: str) -> None:
        try:
            with db.write_transaction(self._engine) as conn:
                conn.execute(sa.insert(table).values(dict(values)))
        except exc.IntegrityError as err:
            raise RegistryConflict(conflict) from err

    @staticmethod
    def _require_device(conn: Connection, device: DeviceId) -> DeviceRecord:
        row = conn.execute(
            sa.select(devices_table).where(devices_table.c.device_id == device)
        ).one_or_none()
        if row is None:
            raise UnknownDevice(f"device {device!r} is not enrolled")
        return _device(row._mapping)


# --- row conversion and SQL helpers -----------------------------------------------------------

_RELEASE_COLUMNS: Final = tuple(c for c in releases_table.c if c.name != "sealed_image")

# Statements of the attestation hot path, built once and run as ``db.HotStatement`` (on SQLite
# straight on the driver: SQLAlchemy's per-statement work costs more than the statement itself).
_SELECT_DEVICE: Final = db.HotStatement(
    sa.select(devices_table).where(devices_table.c.device_id == sa.bindparam("device_id"))
)
_SELECT_IAK_POINTS: Final = db.HotStatement(
    sa.select(devices_table.c.iak_secured_point, devices_table.c.iak_debug_point).where(
        devices_table.c.device_id == sa.bindparam("device_id")
    )
)
# The device, its product's epoch, its assignment and the assigned release in one statement.
_SELECT_DEVICE_SNAPSHOT: Final = db.HotStatement(
    sa.select(
        devices_table,
        epochs_table.c.epoch.label("s_epoch"),
        assignments_table.c.release_id.label("s_assigned"),
        *(column.label(f"s_{column.name}") for column in _RELEASE_COLUMNS),
    )
    .select_from(
        devices_table.outerjoin(epochs_table, epochs_table.c.product == devices_table.c.product)
        .outerjoin(assignments_table, assignments_table.c.device_id == devices_table.c.device_id)
        .outerjoin(releases_table, releases_table.c.release_id == assignments_table.c.release_id)
    )
    .where(devices_table.c.device_id == sa.bindparam("device_id"))
)
_SELECT_COUNTERS: Final = db.HotStatement(
    sa.select(devices_table.c.counters_json).where(
        devices_table.c.device_id == sa.bindparam("device_id")
    )
)
_UPDATE_COUNTERS: Final = db.HotStatement(
    sa.update(devices_table)
    .where(devices_table.c.device_id == sa.bindparam("b_device_id"))
    .values(counters_json=sa.bindparam("b_counters_json"))
)
_SELECT_ANCHORS_OF_KIND: Final = db.HotStatement(
    sa.select(trust_anchors_table)
    .where(trust_anchors_table.c.kind == sa.bindparam("kind"))
    .order_by(trust_anchors_table.c.kind, trust_anchors_table.c.signer_id)
)
_SELECT_REFERENCES: Final = db.HotStatement(
    sa.select(reference_values_table)
    .where(reference_values_table.c.product == sa.bindparam("product"))
    .order_by(
        reference_values_table.c.component,
        reference_values_table.c.security_counter,
        reference_values_table.c.measurement,
    )
)
_SELECT_ASSIGNMENT: Final = db.HotStatement(
    sa.select(assignments_table.c.release_id).where(
        assignments_table.c.device_id == sa.bindparam("device_id")
    )
)
_SELECT_RELEASE: Final = db.HotStatement(
    sa.select(*_RELEASE_COLUMNS).where(releases_table.c.release_id == sa.bindparam("release_id"))
)
_SELECT_EPOCH: Final = db.HotStatement(
    sa.select(epochs_table.c.epoch).where(epochs_table.c.product == sa.bindparam("product"))
)
_INSERT_VERDICT: Final = db.HotStatement(sa.insert(verdicts_table))
_INSERT_RECEIPT: Final = db.HotStatement(sa.insert(receipts_table))
_INSERT_CHALLENGE: Final = db.HotStatement(sa.insert(used_challenges_table))
_SELECT_LATEST_POLICY: Final = db.HotStatement(
    sa.select(policies_table).order_by(policies_table.c.version.desc()).limit(1)
)


def _device(row: Mapping[Any, Any]) -> DeviceRecord:
    counters = json.loads(row["counters_json"])
    return DeviceRecord(
        device_id=DeviceId(row["device_id"]),
        product=Product(row["product"]),
        class_id=ClassId(bytes(row["class_id"])),
        cert_secured_der=bytes(row["cert_secured_der"]),
        cert_debug_der=bytes(row["cert_debug_der"]),
        iak_secured_point=bytes(row["iak_secured_point"]),
        iak_debug_point=bytes(row["iak_debug_point"]),
        status=DeviceStatus(row["status"]),
        enrolled_at_s=int(row["enrolled_at_s"]),
        revoked_at_s=row["revoked_at_s"],
        revoke_reason=row["revoke_reason"],
        counters=_frozen_counters(counters),
    )


def _policy(row: Mapping[Any, Any] | None) -> PolicyRecord | None:
    if row is None:
        return None
    return PolicyRecord(int(row["version"]), str(row["document"]), int(row["at_s"]))


def _trust_anchor(row: Mapping[Any, Any]) -> TrustAnchor:
    cert = row["cert_der"]
    return TrustAnchor(
        kind=TrustAnchorKind(row["kind"]),
        signer_id=bytes(row["signer_id"]),
        public_point=bytes(row["public_point"]),
        name=str(row["name"]),
        added_at_s=int(row["added_at_s"]),
        cert_der=None if cert is None else bytes(cert),
    )


def _reference_value(row: Mapping[Any, Any]) -> ReferenceValue:
    return ReferenceValue(
        product=Product(row["product"]),
        component=ComponentType(row["component"]),
        measurement=bytes(row["measurement"]),
        version=str(row["version"]),
        signer_id=bytes(row["signer_id"]),
        security_counter=int(row["security_counter"]),
        source=str(row["source"]),
    )


def _same_reference(a: ReferenceValue, b: ReferenceValue) -> bool:
    return (a.version, a.signer_id, a.security_counter) == (
        b.version,
        b.signer_id,
        b.security_counter,
    )


def _release(row: Mapping[Any, Any]) -> ReleaseRecord:
    return ReleaseRecord(
        release_id=ReleaseId(row["release_id"]),
        product=Product(row["product"]),
        version=str(row["version"]),
        security_counter=int(row["security_counter"]),
        wrapped_cek=bytes(row["wrapped_cek"]),
        size_bytes=int(row["size_bytes"]),
        created_s=int(row["created_s"]),
        added_at_s=int(row["added_at_s"]),
    )


def _verdict(row: RowMapping) -> VerdictRecord:
    return VerdictRecord(
        device_id=DeviceId(row["device_id"]),
        session_id=SessionId(bytes(row["session_id"])),
        status=Status(row["status"]),
        reasons=tuple(str(reason) for reason in json.loads(row["reasons_json"])),
        policy_version=int(row["policy_version"]),
        explanation_json=str(row["explanation_json"]),
        at_s=int(row["at_s"]),
    )


def _receipt(row: RowMapping) -> ReceiptRecord:
    return ReceiptRecord(
        device_id=DeviceId(row["device_id"]),
        session_id=SessionId(bytes(row["session_id"])),
        release_id=ReleaseId(row["release_id"]),
        receipt=bytes(row["receipt"]),
        at_s=int(row["at_s"]),
    )


def _find_release(conn: Connection, release: ReleaseId) -> ReleaseRecord | None:
    row = _SELECT_RELEASE.first(conn, {"release_id": release})
    return None if row is None else _release(row)


def _check_assignable(device: DeviceRecord, release: ReleaseRecord, epoch: int) -> None:
    if release.product != device.product:
        raise RegistryConflict(
            f"release {release.release_id} is for {release.product!r}, "
            f"device {device.device_id!r} is a {device.product!r}"
        )
    if release.security_counter < epoch:
        raise RegistryConflict(
            f"release {release.release_id} has security counter {release.security_counter}, "
            f"below the epoch {epoch} of {device.product!r}"
        )


def _check_certificate_key(cert_der: bytes, point: bytes) -> None:
    try:
        cert_key = x509.load_der_x509_certificate(cert_der).public_key()
    except ValueError as err:
        raise ValueError("trust anchor certificate: not a DER X.509 certificate") from err
    if not isinstance(cert_key, ec.EllipticCurvePublicKey) or p256_point(cert_key) != point:
        raise ValueError("trust anchor certificate: it does not carry the given public key")


def _epoch(conn: Connection, product: Product) -> int:
    found = _SELECT_EPOCH.first(conn, {"product": product})
    return 0 if found is None else int(found["epoch"])


def _dialect_insert(conn: Connection, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT with ON CONFLICT support in ``conn``'s dialect."""
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    return postgresql.insert(table)


def _upsert(conn: Connection, table: sa.Table, values: Mapping[str, object], *, key: str) -> None:
    """Insert ``values`` or, when the ``key`` column exists already, overwrite the rest."""
    insert = _dialect_insert(conn, table).values(dict(values))
    updates = {name: value for name, value in values.items() if name != key}
    conn.execute(insert.on_conflict_do_update(index_elements=[table.c[key]], set_=updates))


def _history(
    engine: Engine, table: sa.Table, where: sa.ColumnElement[bool], limit: int | None
) -> list[RowMapping]:
    """Rows of an append-only history table, oldest first; the newest ``limit`` when given."""
    query = sa.select(table).where(where).order_by(table.c.id.desc())
    if limit is not None:
        query = query.limit(limit)
    with db.read_transaction(engine) as conn:
        rows = [row._mapping for row in conn.execute(query)]
    return rows[::-1]
