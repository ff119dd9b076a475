"""``edgeseal-gateway``: the operator's command line (DESIGN §7, §9, §10).

The only gateway module that imports click or prints. Every command runs against a workspace
(``--home``, default ``$EDGESEAL_GATEWAY_HOME`` or ``./.edgeseal/gateway``; see ``gateway.state``)
and a registry database (``--db``, default the SQLite file in the workspace).

Exit codes: 0 success; 1 a check failed (``ledger verify``, ``token verify``, a refused bundle,
a database or broker failure); 2 a usage error — a bad argument, a missing file, something the
registry does not hold — reported in one line without a traceback.

Bundle signers by bundle type (``trust add``): an enrollment bundle must be signed by a
``manufacturer-ca`` or ``bundle-signer`` key, a release bundle by a ``vendor`` or
``bundle-signer`` key, a revocation bundle by any of the three (provisioning signs it with the
manufacturer CA key). A release's manifest must be signed by a trusted ``vendor`` key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Final, NoReturn

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway import db
from gateway.commands import CommandIssuer
from gateway.explain import parse_explanation_json
from gateway.kms import KmsConfigError
from gateway.ledger import Ledger, LedgerKind
from gateway.mqtt import MqttClient, parse_broker_url
from gateway.policy import Policy, load_policy, store_policy
from gateway.registry import (
    DeviceRecord,
    ReferenceValue,
    Registry,
    TrustAnchor,
    TrustAnchorKind,
)
from gateway.service import FLEET_STATE_REFRESH_S, RunOptions, build_runner
from gateway.state import Workspace, default_home, init_workspace, open_workspace
from protocol import bundles, cbor, cose, ids, image, keys, psa
from protocol.bundles import ComponentType
from protocol.errors import (
    InvalidSignature,
    MalformedMessage,
    TransportError,
    UsageError,
    VerificationError,
)
from protocol.ids import DeviceId, Product, ReleaseId
from protocol.results import CommandKind

EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
MAX_INPUT_BYTES: Final = 64 << 20
REFVAL_FORMAT_VERSION: Final = 1

_KINDS: Final = {
    "manufacturer-ca": TrustAnchorKind.MANUFACTURER_CA,
    "vendor": TrustAnchorKind.VENDOR,
    "bundle-signer": TrustAnchorKind.BUNDLE_SIGNER,
}
_BUNDLE_SIGNERS: Final = {
    bundles.BundleType.ENROLLMENT: (TrustAnchorKind.MANUFACTURER_CA, TrustAnchorKind.BUNDLE_SIGNER),
    bundles.BundleType.RELEASE: (TrustAnchorKind.VENDOR, TrustAnchorKind.BUNDLE_SIGNER),
    bundles.BundleType.REVOCATION: (
        TrustAnchorKind.MANUFACTURER_CA,
        TrustAnchorKind.BUNDLE_SIGNER,
        TrustAnchorKind.VENDOR,
    ),
}


class CheckFailed(Exception):
    """A check the user asked for failed (exit 1, one line)."""


# --- context ------------------------------------------------------------------------------------


@dataclass
class _Env:
    """What every command shares: the workspace home, the database URL, lazily opened stores."""

    home: Path
    db_url: str | None
    _registry: Registry | None = None
    _ledger: Ledger | None = None

    def workspace(self) -> Workspace:
        return open_workspace(self.home)

    def url(self) -> str:
        return self.db_url or self.workspace().default_db_url

    def registry(self) -> Registry:
        if self._registry is None:
            engine = db.open_engine(self.url())
            self._registry = Registry.open(engine)
            self._ledger = Ledger.open(engine)
        return self._registry

    def ledger(self) -> Ledger:
        self.registry()
        assert self._ledger is not None
        return self._ledger

    def checkpoint(self) -> None:
        """Sign a ledger checkpoint after a change (skipped when the KMS needs a secret)."""
        try:
            with self.workspace().open_kms() as kms:
                self.ledger().checkpoint(kms.result_signer(), now_s=_now_s())
        except KmsConfigError as err:
            click.echo(f"note: no ledger checkpoint signed ({err})", err=True)


def _now_s() -> int:
    return int(time.time())


def _env(ctx: click.Context) -> _Env:
    obj = ctx.find_object(_Env)
    assert obj is not None
    return obj


class _Group(click.Group):
    """Turns edgeseal's errors into one line and an exit code (STYLE.md, "Errors")."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except click.UsageError as err:
            _fail(EXIT_USAGE, err.format_message())
        except (UsageError, MalformedMessage) as err:
            _fail(EXIT_USAGE, str(err))
        except (CheckFailed, VerificationError, TransportError) as err:
            _fail(EXIT_FAILED, str(err))


def _fail(code: int, message: str) -> NoReturn:
    first = (message.strip().splitlines() or ["failed"])[0]
    click.echo(f"error: {first}", err=True)
    raise click.exceptions.Exit(code)


def _emit(data: object, as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(data, sort_keys=True, separators=(",", ":")))
    else:
        click.echo(text)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_INPUT_BYTES + 1)
    except OSError as err:
        raise UsageError(f"{what} {path}: {err.strerror}") from err
    if len(data) > MAX_INPUT_BYTES:
        raise UsageError(f"{what} {path}: larger than {MAX_INPUT_BYTES} bytes")
    return data


@click.group(cls=_Group)
@click.option("--home", type=click.Path(path_type=Path), default=None, help="Workspace directory.")
@click.option("--db", "db_url", default=None, help="Registry database URL (default: in --home).")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, db_url: str | None) -> None:
    """Attestation-gated firmware delivery: the gateway."""
    ctx.obj = _Env(home or default_home(), db_url)


# --- init and serve -------------------------------------------------------------------------------


@cli.command()
@click.option("--home", type=click.Path(path_type=Path), default=None, help="Workspace directory.")
@click.option("--kms", "kms_spec", default=None, help="KMS spec (default: a key file in --home).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def init(ctx: click.Context, home: Path | None, kms_spec: str | None, as_json: bool) -> None:
    """Create the workspace: KMS keys, challenge secret, default policy, public key PEMs."""
    env = _env(ctx)
    if home is not None:
        env.home = home
    workspace = init_workspace(env.home, kms_spec=kms_spec)
    policy = Policy.parse(workspace.policy_path.read_bytes())
    if env.registry().latest_policy() is None:
        store_policy(env.registry(), policy, now_s=_now_s(), ledger=env.ledger())
        env.checkpoint()
    data = {
        "home": str(workspace.home),
        "kms": workspace.kms_spec,
        "result_key": str(workspace.result_key_pem),
        "hpke_key": str(workspace.hpke_key_pem),
        "db": env.url(),
    }
    text = "\n".join(f"{name}: {value}" for name, value in data.items())
    _emit(data, as_json, f"gateway workspace created\n{text}")


@cli.command()
@click.option("--broker", "broker_url", required=True, help="mqtt://HOST[:PORT]")
@click.option("--kms", "kms_spec", default=None, help="KMS spec (default: the workspace's).")
@click.option("--share-group", default=None, help="Share the device topics with other gateways.")
@click.option(
    "--state-refresh",
    "state_refresh_s",
    type=click.IntRange(min=0),
    default=FLEET_STATE_REFRESH_S,
    show_default=True,
    help="Seconds before an unchanged retained fleet state is published again (0: every time).",
)
@click.pass_context
def serve(
    ctx: click.Context,
    broker_url: str,
    kms_spec: str | None,
    share_group: str | None,
    state_refresh_s: int,
) -> None:
    """Serve attestation, image chunks and status on the broker until SIGTERM or SIGINT."""
    env = _env(ctx)
    workspace = env.workspace()
    options = RunOptions(
        broker=parse_broker_url(broker_url),
        share_group=share_group,
        fleet_state_refresh_s=state_refresh_s,
    )
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    with workspace.open_kms(kms_spec) as kms:
        runner = build_runner(workspace, env.url(), options, kms=kms)

        def _stop(_signum: int, _frame: FrameType | None) -> None:
            runner.stop()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        runner.start(wait=False)
        if runner.client.wait_ready(options.connect_timeout_s):
            click.echo(f"serving on {options.broker.url}", nl=True)
        else:
            click.echo(f"waiting for the broker at {options.broker.url}", err=True)
        sys.stdout.flush()
        runner.run()
    counters = runner.service.counters
    click.echo("stopped; " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))


# --- bundles -------------------------------------------------------------------------------------


@cli.command("import")
@click.argument("bundle_path", metavar="BUNDLE")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def import_bundle(ctx: click.Context, bundle_path: str, as_json: bool) -> None:
    """Verify a signed bundle against the trusted signers and apply it."""
    env = _env(ctx)
    data = _read(bundle_path, "bundle")
    _, unverified = bundles.parse_unverified_bundle(data)
    kind = _bundle_type(unverified)
    registry = env.registry()
    signers = {
        anchor.signer_id: anchor.public_key()
        for anchor_kind in _BUNDLE_SIGNERS[kind]
        for anchor in registry.list_trust_anchors(anchor_kind)
    }
    bundle = bundles.verify_bundle(data, signers)
    if isinstance(bundle, bundles.EnrollmentBundle):
        summary = _import_enrollment(env, bundle)
    elif isinstance(bundle, bundles.ReleaseBundle):
        summary = _import_release(env, bundle)
    else:
        summary = _import_revocation(env, bundle)
    env.checkpoint()
    _emit(summary, as_json, "imported " + ", ".join(f"{k}: {v}" for k, v in summary.items()))


def _bundle_type(bundle: bundles.Bundle) -> bundles.BundleType:
    if isinstance(bundle, bundles.EnrollmentBundle):
        return bundles.BundleType.ENROLLMENT
    if isinstance(bundle, bundles.ReleaseBundle):
        return bundles.BundleType.RELEASE
    return bundles.BundleType.REVOCATION


def _iak_point(cert_der: bytes, what: str) -> bytes:
    try:
        key = x509.load_der_x509_certificate(cert_der).public_key()
    except ValueError as err:
        raise MalformedMessage(f"{what}: not a DER X.509 certificate") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise MalformedMessage(f"{what}: not a P-256 key")
    return keys.p256_point(key)


def _import_enrollment(env: _Env, bundle: bundles.EnrollmentBundle) -> dict[str, object]:
    registry, ledger, now_s = env.registry(), env.ledger(), _now_s()
    enrolled = 0
    for device in bundle.devices:
        if registry.find_device(device.device_id) is not None:
            continue
        registry.enroll_device(
            device.device_id,
            product=bundle.product,
            cert_secured_der=device.cert_secured_der,
            cert_debug_der=device.cert_debug_der,
            iak_secured_point=_iak_point(device.cert_secured_der, f"{device.device_id} secured"),
            iak_debug_point=_iak_point(device.cert_debug_der, f"{device.device_id} debug"),
            counters=dict(device.counters),
            now_s=now_s,
        )
        body = {"v": 1, "product": bundle.product, "counters": dict(device.counters)}
        ledger.append(LedgerKind.ENROLLMENT, cbor.dumps(body), device=device.device_id, now_s=now_s)
        enrolled += 1
    for value in bundle.reference_values:
        _add_reference_value(registry, bundle.product, value, "enrollment bundle", now_s)
    return {
        "type": "enrollment",
        "product": bundle.product,
        "devices": enrolled,
        "already_enrolled": len(bundle.devices) - enrolled,
        "reference_values": len(bundle.reference_values),
    }


def _add_reference_value(
    registry: Registry, product: Product, value: bundles.ReferenceValue, source: str, now_s: int
) -> None:
    registry.add_reference_value(
        ReferenceValue(
            product=product,
            component=value.component,
            measurement=value.measurement,
            version=value.version,
            signer_id=value.signer_id,
            security_counter=value.security_counter,
            source=source,
        ),
        now_s=now_s,
    )


def _import_release(env: _Env, bundle: bundles.ReleaseBundle) -> dict[str, object]:
    registry, ledger, now_s = env.registry(), env.ledger(), _now_s()
    sealed = image.parse_unverified_image(bundle.image)
    vendors = {
        a.signer_id: a.public_key() for a in registry.list_trust_anchors(TrustAnchorKind.VENDOR)
    }
    manifest = image.verify_manifest(sealed, vendors)
    digest = image.manifest_digest(sealed)
    with env.workspace().open_kms() as kms:
        bundles.unwrap_release_cek(bundle.wrapped_cek, kms.hpke_private_key(), digest)
    release = ids.release_id(digest)
    registry.add_release(
        release,
        product=bundle.product,
        version=manifest.version,
        security_counter=manifest.security_counter,
        sealed_image=bundle.image,
        wrapped_cek=bundle.wrapped_cek,
        created_s=bundle.created_s,
        now_s=now_s,
    )
    _add_reference_value(registry, bundle.product, bundle.reference_value, "release bundle", now_s)
    body = {
        "v": 1,
        "event": "published",
        "release": release,
        "product": bundle.product,
        "version": manifest.version,
        "security_counter": manifest.security_counter,
    }
    ledger.append(LedgerKind.RELEASE, cbor.dumps(body), now_s=now_s)
    return {
        "type": "release",
        "release": release,
        "product": bundle.product,
        "version": manifest.version,
    }


def _import_revocation(env: _Env, bundle: bundles.RevocationBundle) -> dict[str, object]:
    for device in bundle.device_ids:
        _revoke(env, device, bundle.reason or "revocation bundle")
    return {"type": "revocation", "devices": len(bundle.device_ids)}


def _revoke(env: _Env, device: DeviceId, reason: str) -> DeviceRecord:
    now_s = _now_s()
    record = env.registry().revoke_device(device, reason=reason, now_s=now_s)
    body = {"v": 1, "reason": reason}
    env.ledger().append(LedgerKind.REVOCATION, cbor.dumps(body), device=device, now_s=now_s)
    return record


# --- trust ---------------------------------------------------------------------------------------


@cli.group(cls=_Group)
def trust() -> None:
    """Trust anchors: manufacturer CAs, vendors, bundle signers."""


def _load_anchor_pem(
    kind: TrustAnchorKind, data: bytes
) -> tuple[ec.EllipticCurvePublicKey, bytes | None]:
    if kind is TrustAnchorKind.MANUFACTURER_CA:
        try:
            cert = x509.load_pem_x509_certificate(data)
        except ValueError as err:
            raise UsageError("manufacturer-ca: expected an X.509 certificate PEM") from err
        key: object = cert.public_key()
        cert_der: bytes | None = cert.public_bytes(serialization.Encoding.DER)
    else:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as err:
            raise UsageError(f"{kind.value}: expected a public key PEM") from err
        cert_der = None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise UsageError(f"{kind.value}: expected a P-256 key")
    return key, cert_der


def _anchor_json(anchor: TrustAnchor) -> dict[str, object]:
    kind = next(name for name, value in _KINDS.items() if value is anchor.kind)
    return {
        "kind": kind,
        "id": anchor.signer_id.hex(),
        "name": anchor.name,
        "added_at_s": anchor.added_at_s,
    }


@trust.command("add")
@click.argument("kind", type=click.Choice(sorted(_KINDS)))
@click.argument("pem_path", metavar="PEM")
@click.option("--name", default="", help="A label for people.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def trust_add(ctx: click.Context, kind: str, pem_path: str, name: str, as_json: bool) -> None:
    """Trust the key in PEM for KIND."""
    env = _env(ctx)
    anchor_kind = _KINDS[kind]
    key, cert_der = _load_anchor_pem(anchor_kind, _read(pem_path, "PEM"))
    anchor = env.registry().add_trust_anchor(
        anchor_kind,
        public_key=key,
        name=name or Path(pem_path).name,
        now_s=_now_s(),
        cert_der=cert_der,
    )
    body = {"v": 1, "action": "add", "kind": anchor_kind.value, "signer_id": anchor.signer_id}
    env.ledger().append(LedgerKind.TRUST_CHANGE, cbor.dumps(body), now_s=_now_s())
    env.checkpoint()
    _emit(_anchor_json(anchor), as_json, f"trusted {kind} {anchor.signer_id.hex()}")


@trust.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def trust_list(ctx: click.Context, as_json: bool) -> None:
    """List the trust anchors."""
    anchors = [_anchor_json(a) for a in _env(ctx).registry().list_trust_anchors()]
    lines = [f"{a['kind']:<16} {a['id']}  {a['name']}" for a in anchors]
    _emit(anchors, as_json, "\n".join(lines) or "no trust anchors")


@trust.command("remove")
@click.argument("anchor_id", metavar="ID")
@click.pass_context
def trust_remove(ctx: click.Context, anchor_id: str) -> None:
    """Stop trusting the anchor whose id (hex, or a unique prefix) is ID."""
    env = _env(ctx)
    wanted = anchor_id.lower()
    matches = [
        a for a in env.registry().list_trust_anchors() if a.signer_id.hex().startswith(wanted)
    ]
    if len(wanted) < 4 or len(matches) != 1:
        raise UsageError(f"trust anchor {anchor_id!r}: {len(matches)} match; give more digits")
    anchor = matches[0]
    env.registry().remove_trust_anchor(anchor.kind, anchor.signer_id)
    body = {"v": 1, "action": "remove", "kind": anchor.kind.value, "signer_id": anchor.signer_id}
    env.ledger().append(LedgerKind.TRUST_CHANGE, cbor.dumps(body), now_s=_now_s())
    env.checkpoint()
    click.echo(f"removed {anchor.signer_id.hex()}")


# --- reference values, assignment, epochs --------------------------------------------------------


@cli.group(cls=_Group)
def refval() -> None:
    """Reference values for boot stages (docs/refval.md)."""


def _parse_refvals(data: bytes) -> tuple[Product, list[bundles.ReferenceValue]]:
    """Read the reference value file format of docs/refval.md."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"reference values: not JSON ({err})") from err
    if not isinstance(document, dict) or document.get("v") != REFVAL_FORMAT_VERSION:
        raise UsageError(f'reference values: expected an object with "v": {REFVAL_FORMAT_VERSION}')
    if set(document) != {"v", "product", "components"}:
        raise UsageError('reference values: expected exactly "v", "product", "components"')
    product = ids.product(document["product"])
    items = document["components"]
    if not isinstance(items, list) or not 0 < len(items) <= bundles.MAX_REFERENCE_VALUES:
        raise UsageError(f"reference values: 1-{bundles.MAX_REFERENCE_VALUES} components")
    return product, [_refval(item, index) for index, item in enumerate(items)]


def _refval(item: object, index: int) -> bundles.ReferenceValue:
    what = f"components[{index}]"
    names = {"component", "measurement", "version", "signer_id", "security_counter"}
    if not isinstance(item, dict) or set(item) != names:
        raise UsageError(f"reference values {what}: expected exactly {', '.join(sorted(names))}")
    try:
        return bundles.ReferenceValue(
            component=ComponentType(item["component"]),
            measurement=bytes.fromhex(item["measurement"]),
            version=item["version"],
            signer_id=bytes.fromhex(item["signer_id"]),
            security_counter=item["security_counter"],
        )
    except (ValueError, TypeError) as err:
        raise UsageError(f"reference values {what}: {err}") from err


@refval.command("add")
@click.argument("file_path", metavar="FILE")
@click.pass_context
def refval_add(ctx: click.Context, file_path: str) -> None:
    """Add the reference values in FILE (JSON, docs/refval.md)."""
    env = _env(ctx)
    product, values = _parse_refvals(_read(file_path, "reference values"))
    now_s = _now_s()
    for value in values:
        _add_reference_value(
            env.registry(), product, value, f"refval file {Path(file_path).name}", now_s
        )
    body = {"v": 1, "event": "reference_values", "product": product, "count": len(values)}
    env.ledger().append(LedgerKind.IMPORT, cbor.dumps(body), now_s=now_s)
    env.checkpoint()
    click.echo(f"added {len(values)} reference values for {product}")


def _resolve_release(registry: Registry, text: str) -> ReleaseId:
    wanted = text.lower()
    matches = [r.release_id for r in registry.list_releases() if r.release_id.startswith(wanted)]
    if not wanted or len(matches) != 1:
        raise UsageError(f"release {text!r}: {len(matches)} releases match; give more digits")
    return matches[0]


@cli.command()
@click.argument("device")
@click.argument("release")
@click.option(
    "--broker",
    "broker_url",
    default=None,
    help="Also publish a signed update command, so a running device fetches it now.",
)
@click.pass_context
def assign(ctx: click.Context, device: str, release: str, broker_url: str | None) -> None:
    """Assign RELEASE (an id or a unique prefix) to DEVICE."""
    env = _env(ctx)
    device_id = ids.device_id(device)
    release_id = _resolve_release(env.registry(), release)
    now_s = _now_s()
    env.registry().assign(device_id, release_id, now_s=now_s)
    body = {"v": 1, "event": "assigned", "release": release_id}
    env.ledger().append(LedgerKind.RELEASE, cbor.dumps(body), device=device_id, now_s=now_s)
    click.echo(f"assigned {release_id} to {device_id}")
    if broker_url is not None:
        _publish_command(env, broker_url, device_id, CommandKind.UPDATE, release_id)
    env.checkpoint()


@cli.group(cls=_Group)
def epoch() -> None:
    """Security epochs per product."""


@epoch.command("set")
@click.argument("product")
@click.argument("value", type=click.IntRange(0, 0xFFFF_FFFF))
@click.pass_context
def epoch_set(ctx: click.Context, product: str, value: int) -> None:
    """Raise PRODUCT's security epoch to N: no image below it is released again."""
    env = _env(ctx)
    name = ids.product(product)
    now_s = _now_s()
    env.registry().set_epoch(name, value, now_s=now_s)
    body = {"v": 1, "product": name, "epoch": value}
    env.ledger().append(LedgerKind.EPOCH_CHANGE, cbor.dumps(body), now_s=now_s)
    env.checkpoint()
    click.echo(f"epoch of {name} is {value}")


# --- devices -------------------------------------------------------------------------------------


def _device_json(registry: Registry, device: DeviceRecord) -> dict[str, object]:
    last = registry.verdicts(device.device_id, limit=1)
    return {
        "device": device.device_id,
        "product": device.product,
        "status": device.status.value,
        "enrolled_at_s": device.enrolled_at_s,
        "revoked_at_s": device.revoked_at_s,
        "assigned": registry.assignment(device.device_id),
        "last_verdict": last[0].status.value if last else None,
        "counters": dict(device.counters),
    }


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def devices(ctx: click.Context, as_json: bool) -> None:
    """List the enrolled devices."""
    registry = _env(ctx).registry()
    rows = [_device_json(registry, d) for d in registry.list_devices()]
    lines = [
        f"{r['device']:<24} {r['product']:<16} {r['status']:<8} {r['last_verdict'] or '-'}"
        for r in rows
    ]
    _emit(rows, as_json, "\n".join(lines) or "no devices")


@cli.command()
@click.argument("device")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def device(ctx: click.Context, device: str, as_json: bool) -> None:
    """One device and its timeline: verdicts (with explanations) and released keys."""
    registry = _env(ctx).registry()
    record = registry.get_device(ids.device_id(device))
    timeline: list[dict[str, object]] = []
    for verdict in registry.verdicts(record.device_id):
        findings = [
            {"code": e.code, "expected": e.expected, "got": e.got, "cause": e.cause, "fix": e.fix}
            for e in parse_explanation_json(verdict.explanation_json)
        ]
        timeline.append(
            {
                "at_s": verdict.at_s,
                "event": "verdict",
                "status": verdict.status.value,
                "reasons": list(verdict.reasons),
                "session": verdict.session_id.hex(),
                "explanation": findings,
            }
        )
    for receipt in registry.receipts(record.device_id):
        timeline.append(
            {
                "at_s": receipt.at_s,
                "event": "key_released",
                "release": receipt.release_id,
                "session": receipt.session_id.hex(),
            }
        )
    timeline.sort(key=lambda item: int(str(item["at_s"])))
    data = {**_device_json(registry, record), "timeline": timeline}
    _emit(data, as_json, _device_text(data, timeline))


def _device_text(data: dict[str, object], timeline: list[dict[str, object]]) -> str:
    lines = [f"{key}: {value}" for key, value in data.items() if key != "timeline"]
    for item in timeline:
        if item["event"] == "verdict":
            reasons = ", ".join(str(r) for r in item["reasons"]) or "no findings"  # type: ignore[attr-defined]
            lines.append(f"{item['at_s']}  verdict {item['status']}: {reasons}")
            for finding in item["explanation"]:  # type: ignore[attr-defined]
                lines.append(
                    f"    {finding['code']}: expected {finding['expected']}; "
                    f"got {finding['got']}; fix: {finding['fix']}"
                )
        else:
            lines.append(f"{item['at_s']}  key released for {item['release']}")
    return "\n".join(lines)


@cli.command()
@click.argument("device")
@click.option("--reason", default="revoked by the operator")
@click.option("--broker", "broker_url", default=None, help="Also publish a signed revoke command.")
@click.pass_context
def revoke(ctx: click.Context, device: str, reason: str, broker_url: str | None) -> None:
    """Revoke DEVICE in the registry (and tell it, with --broker)."""
    env = _env(ctx)
    device_id = ids.device_id(device)
    _revoke(env, device_id, reason)
    if broker_url is not None:
        _publish_command(env, broker_url, device_id, CommandKind.REVOKE)
    env.checkpoint()
    click.echo(f"revoked {device_id}")


@cli.command()
@click.argument("device")
@click.option("--broker", "broker_url", required=True, help="The broker the device listens on.")
@click.pass_context
def reattest(ctx: click.Context, device: str, broker_url: str) -> None:
    """Ask DEVICE to attest again now (a signed re-attest command), e.g. after a policy change."""
    env = _env(ctx)
    device_id = ids.device_id(device)
    _publish_command(env, broker_url, device_id, CommandKind.REATTEST)
    env.checkpoint()


def _publish_command(
    env: _Env,
    broker_url: str,
    device: DeviceId,
    kind: CommandKind,
    release: ReleaseId | None = None,
) -> None:
    """Sign, record (ledger) and publish one command to ``device``; wait for the broker's ack.

    Raises:
        UsageError: the broker URL is not mqtt://HOST[:PORT].
        UnknownDevice: the device is not enrolled.
    """
    address = parse_broker_url(broker_url)
    with env.workspace().open_kms() as kms:
        issuer = CommandIssuer(env.registry(), env.ledger(), kms.result_signer(), clock=time.time)
        outgoing = issuer.issue(device, kind, release)
    client = MqttClient(address, client_id=f"edgeseal-gateway-cli-{device}")
    client.start()
    try:
        client.publish_and_wait(outgoing.topic, outgoing.payload)
    finally:
        client.stop()
    click.echo(f"published {kind.value} command {outgoing.command.seq} to {device}")


# --- policy and ledger ---------------------------------------------------------------------------


@cli.group(cls=_Group)
def policy() -> None:
    """The appraisal policy (docs/policy.md)."""


@policy.command("show")
@click.pass_context
def policy_show(ctx: click.Context) -> None:
    """Print the policy in force."""
    click.echo(load_policy(_env(ctx).registry()).to_json(), nl=False)


@policy.command("set")
@click.argument("file_path", metavar="FILE")
@click.pass_context
def policy_set(ctx: click.Context, file_path: str) -> None:
    """Store the policy in FILE as a new version."""
    env = _env(ctx)
    new = Policy.parse(_read(file_path, "policy"))
    store_policy(env.registry(), new, now_s=_now_s(), ledger=env.ledger())
    env.checkpoint()
    click.echo(f"policy version {new.version} in force")


@cli.group(cls=_Group)
def ledger() -> None:
    """The hash-chained ledger."""


@ledger.command("show")
@click.option("--device", default=None)
@click.option("--limit", type=click.IntRange(1), default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ledger_show(ctx: click.Context, device: str | None, limit: int | None, as_json: bool) -> None:
    """Print ledger entries, oldest first."""
    device_id = None if device is None else ids.device_id(device)
    entries = _env(ctx).ledger().entries(device_id, limit)
    rows = [
        {
            "seq": e.seq,
            "kind": e.kind.value,
            "device": e.device,
            "at_s": e.at_s,
            "hash": e.entry_hash.hex(),
            "body": _body_json(e.body),
        }
        for e in entries
    ]
    lines = [
        f"{r['seq']:>6} {r['at_s']} {r['kind']:<14} {r['device'] or '-':<20} {r['hash']}"
        for r in rows
    ]
    _emit(rows, as_json, "\n".join(lines) or "the ledger is empty")


def _body_json(body: bytes) -> object:
    def plain(value: object) -> object:
        if isinstance(value, bytes):
            return value.hex()
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    try:
        return plain(cbor.loads(body, what="ledger body", max_bytes=len(body)))
    except MalformedMessage:
        return body.hex()


@ledger.command("verify")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ledger_verify(ctx: click.Context, as_json: bool) -> None:
    """Walk the chain and the signed checkpoints; exit 1 naming the first problem."""
    env = _env(ctx)
    report = env.ledger().verify(env.workspace().result_public_key())
    data = {
        "ok": report.ok,
        "entries": report.entries,
        "head": {"seq": report.head.seq, "hash": report.head.entry_hash.hex()},
        "checkpoint": report.checkpoint.value,
        "checkpoint_seq": report.checkpoint_seq,
        "problems": [
            {"seq": p.seq, "kind": p.kind.value, "detail": p.detail} for p in report.problems
        ],
    }
    if report.ok:
        _emit(data, as_json, f"ledger ok: {report.entries} entries, checkpoint {report.checkpoint}")
        return
    first = report.problems[0]
    _emit(
        data, as_json, "\n".join(f"{p.kind.value} at {p.seq}: {p.detail}" for p in report.problems)
    )
    if not as_json:
        click.echo(f"error: ledger problem {first.kind.value} at entry {first.seq}", err=True)
    raise click.exceptions.Exit(EXIT_FAILED)


# --- token verify --------------------------------------------------------------------------------


@cli.group(cls=_Group)
def token() -> None:
    """PSA attestation tokens (RFC 9783)."""


def _load_key(data: bytes) -> ec.EllipticCurvePublicKey:
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        private = None
    if isinstance(private, ec.EllipticCurvePrivateKey):
        return private.public_key()
    try:
        public = serialization.load_pem_public_key(data)
    except ValueError as err:
        raise UsageError("--key: expected an EC public or private key PEM") from err
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise UsageError("--key: expected an EC key")
    return public


@dataclass
class _TokenReport:
    signature: str = "not checked"
    claims: dict[str, object] | None = None
    findings: list[str] = dataclasses.field(default_factory=list)
    info: list[str] = dataclasses.field(default_factory=list)
    valid: bool = False


def _claims_json(claims: psa.PsaClaims) -> dict[str, object]:
    def component(c: psa.SoftwareComponent) -> dict[str, object]:
        return {
            "type": c.measurement_type,
            "measurement": c.measurement_value.hex(),
            "version": c.version,
            "signer_id": c.signer_id.hex(),
            "desc": c.measurement_desc,
        }

    data: dict[str, object] = {
        "profile": claims.profile,
        "nonce": claims.nonce.hex(),
        "instance_id": claims.instance_id.hex(),
        "implementation_id": claims.implementation_id.hex(),
        "client_id": claims.client_id,
        "lifecycle": f"0x{claims.lifecycle:04x}",
        "boot_seed": claims.boot_seed.hex(),
        "software_components": [component(c) for c in claims.software_components],
        "certification_reference": claims.certification_reference,
        "verification_service": claims.verification_service,
    }
    if claims.platform is not None:
        p = claims.platform
        data["platform"] = {
            "fuse_counters": dict(p.fuse_counters),
            "boot_count": p.boot_count,
            "secure_boot": p.secure_boot,
            "debug_port_open": p.debug_port_open,
            "smt_enabled": p.smt_enabled,
        }
    return data


def _check_token(data: bytes, key: ec.EllipticCurvePublicKey, nonce: bytes | None) -> _TokenReport:
    report = _TokenReport()
    try:
        parsed = cose.sign1_parse_unverified(data)
    except MalformedMessage as err:
        report.findings.append(f"structure: {err}")
        return report
    try:
        cose.verify_parsed(parsed, key)
        report.signature = "valid"
    except InvalidSignature:
        report.signature = "invalid"
        report.findings.append("signature: does not verify under the given key")
    try:
        claims = psa.decode_claims(parsed.payload)
    except MalformedMessage as err:
        report.findings.append(f"claims: {err}")
        return report
    report.claims = _claims_json(claims)
    if nonce is not None and claims.nonce != nonce:
        report.findings.append("nonce: does not match --nonce")
    if claims.instance_id != keys.instance_id(key):
        report.info.append("instance id: does not match the key (0x01 ‖ SHA-256 of its point)")
    report.valid = not report.findings
    return report


@token.command("verify")
@click.argument("file_path", metavar="FILE")
@click.option("--key", "key_path", required=True, help="IAK PEM (public or private).")
@click.option("--nonce", default=None, help="The expected nonce, hex.")
@click.option("--json", "as_json", is_flag=True)
def token_verify(file_path: str, key_path: str, nonce: str | None, as_json: bool) -> None:
    """Verify a PSA token offline: signature and claims; exit 0 only when both are valid."""
    data = _read(file_path, "token")
    key = _load_key(_read(key_path, "key"))
    try:
        expected = None if nonce is None else bytes.fromhex(nonce)
    except ValueError as err:
        raise UsageError("--nonce: expected hex") from err
    report = _check_token(data, key, expected)
    result = {
        "valid": report.valid,
        "signature": report.signature,
        "claims": report.claims,
        "findings": report.findings,
        "info": report.info,
    }
    lines = [f"signature: {report.signature}"]
    if report.claims is not None:
        lines += [f"  {name}: {value}" for name, value in report.claims.items()]
    lines += [f"finding: {f}" for f in report.findings] + [f"info: {i}" for i in report.info]
    lines.append("token valid" if report.valid else "token INVALID")
    _emit(result, as_json, "\n".join(lines))
    if not report.valid:
        raise click.exceptions.Exit(EXIT_FAILED)


def main() -> None:
    """The console script ``edgeseal-gateway``."""
    cli(prog_name="edgeseal-gateway")
