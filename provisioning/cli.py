"""``edgeseal-provision``: the vendor's and the factory's command line (DESIGN §4, §7, §11).

The only module of ``provisioning`` that imports click or prints. Commands::

    vendor init DIR                      manufacturer CA, ROTPK and firmware key; vendor.toml
    manufacture --vendor DIR ...         devices through device.factory + enrollment.bundle
    firmware check APP_DIR               mpy-cross compile and enclave import rules
    firmware build APP_DIR --vendor ...  PRODUCT-VERSION.sealed + PRODUCT-VERSION.release
    image inspect FILE                   manifest fields (no decryption)
    image verify FILE --vendor DIR       exit 0 when the manifest verifies, 1 otherwise
    revoke DEVICE... --vendor DIR        a revocation bundle signed by the manufacturer CA key

A user's mistake (``UsageError``, ``MalformedMessage``, a click usage error, an OS error on a named
file) is one line ``error: …`` on stderr and exit status 2, never a traceback (docs/errors.md).
``image verify`` is the one exception: an image that does not verify, malformed ones included, is
exit status 1 with ``FAILED: …`` on stdout; only a missing file or workspace is 2. Outputs are
written atomically and never replaced without ``--force``.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Final

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from protocol import bundles, errors, image, keys
from protocol.ids import DeviceId, device_id, product
from protocol.stage import TrustAnchors
from provisioning import build, files, firmware, manufacture, vendor
from provisioning.vendor import Role, Vendor

PROG: Final = "edgeseal-provision"
#: Exit status of a user's mistake (docs/errors.md, "CLIs").
EXIT_USAGE: Final = 2
#: Exit status of a failed verification (``image verify``).
EXIT_FAILED: Final = 1

_BOARDS: Final = click.Choice([b.value for b in firmware.Board])
_PATH_DIR = click.Path(path_type=Path, file_okay=False)
_PATH_FILE = click.Path(path_type=Path, dir_okay=False)


class _OneLineError(click.ClickException):
    """A user's mistake, shown as one line ``error: …`` with exit status 2."""

    exit_code = EXIT_USAGE

    def show(self, file: IO[Any] | None = None) -> None:
        """Print ``error: message`` on stderr."""
        click.echo(f"error: {self.format_message()}", err=True)


class _Cli(click.Group):
    """The root group: turns a user's mistake anywhere below into :class:`_OneLineError`."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; translate errors (docs/errors.md, "CLIs")."""
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except _OneLineError:
            raise
        except click.UsageError as err:
            raise _OneLineError(err.format_message()) from err
        except (errors.UsageError, errors.MalformedMessage) as err:
            raise _OneLineError(str(err)) from err
        except OSError as err:
            raise _OneLineError(_os_message(err)) from err


def _os_message(err: OSError) -> str:
    where = f"{err.filename}: " if err.filename is not None else ""
    return f"{where}{err.strerror or err}"


def _devices(count: int) -> str:
    return f"{count} device{'' if count == 1 else 's'}"


def _emit_json(document: object) -> None:
    click.echo(json.dumps(document, indent=2, sort_keys=True))


def _now_s() -> int:
    return int(time.time())


def _env_passphrase(variable: str) -> bytes:
    value = os.environ.get(variable)
    if not value:
        raise errors.UsageError(
            f"environment variable {variable} is not set: it must hold the keys' passphrase"
        )
    return value.encode("utf-8")


def _passphrase(workspace: Vendor, variable: str | None) -> bytes | None:
    """The passphrase of an encrypted workspace: ``--passphrase-env`` or the one it records."""
    if not workspace.encrypted:
        return None
    name = variable or workspace.passphrase_env
    if name is None:
        raise errors.UsageError(
            f"the keys in {workspace.directory} are encrypted: give --passphrase-env VAR"
        )
    return _env_passphrase(name)


_passphrase_option = click.option(
    "--passphrase-env",
    "passphrase_env",
    metavar="VAR",
    help="Environment variable holding the vendor keys' passphrase.",
)
_vendor_option = click.option(
    "--vendor", "vendor_dir", type=_PATH_DIR, required=True, help="The vendor workspace."
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
_force_option = click.option("--force", is_flag=True, help="Replace existing outputs.")


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """edgeseal provisioning: vendor keys, manufacturing, firmware builds, revocation."""


def main() -> None:
    """The console script ``edgeseal-provision``."""
    cli.main(prog_name=PROG)


# --- vendor --------------------------------------------------------------------------------------


@cli.group("vendor")
def vendor_group() -> None:
    """The vendor workspace: manufacturer CA, ROTPK, firmware signing key."""


@vendor_group.command("init")
@click.argument("directory", type=_PATH_DIR)
@click.option("--passphrase-env", metavar="VAR", help="Encrypt the private keys with $VAR.")
@click.option("--name", help="The CA's organization name (default: the directory's name).")
@_force_option
@_json_option
def vendor_init(
    directory: Path, passphrase_env: str | None, name: str | None, force: bool, as_json: bool
) -> None:
    """Create a vendor workspace in DIRECTORY and print its signer ids."""
    passphrase = None if passphrase_env is None else _env_passphrase(passphrase_env)
    workspace = vendor.init_vendor(
        directory,
        now=datetime.datetime.now(datetime.UTC),
        name=name,
        passphrase=passphrase,
        passphrase_env=passphrase_env,
        force=force,
    )
    ids = {str(role): workspace.entry(role).signer_id.hex() for role in Role}
    if as_json:
        _emit_json({"directory": str(directory), "encrypted": workspace.encrypted, "signers": ids})
        return
    click.echo(f"vendor workspace {directory} ({'encrypted' if workspace.encrypted else 'plain'})")
    for role, signer in ids.items():
        click.echo(f"  {role:<9} signer id {signer}")


# --- manufacture ---------------------------------------------------------------------------------


@cli.command("manufacture")
@_vendor_option
@click.option("--product", "product_name", required=True, help="The product (class id).")
@click.option("--count", type=click.IntRange(1, bundles.MAX_DEVICES), required=True)
@click.option("--out", "out_dir", type=_PATH_DIR, required=True, help="Output directory.")
@click.option(
    "--gateway-result-key",
    type=_PATH_FILE,
    required=True,
    help="The gateway's result key (PEM, P-256; edgeseal-gateway init exports it).",
)
@click.option("--prefix", help="Device id prefix (default: the product).")
@click.option("--secure-boot", type=click.Choice(["on", "off"]), default="on", show_default=True)
@click.option("--runtime-version", default="1.0.0", show_default=True)
@click.option("--runtime-counter", type=click.IntRange(0), default=1, show_default=True)
@click.option("--bl2-version", default="1.0.0", show_default=True)
@click.option("--bl2-counter", type=click.IntRange(0), default=1, show_default=True)
@click.option(
    "--flash",
    type=click.Choice([f.value for f in manufacture.FlashSize]),
    default=manufacture.FlashSize.STANDARD.value,
    show_default=True,
    help="Flash layout: standard (two 16 MiB slots) or small (two 1 MiB slots).",
)
@_passphrase_option
@_force_option
@_json_option
def manufacture_command(
    vendor_dir: Path,
    product_name: str,
    count: int,
    out_dir: Path,
    gateway_result_key: Path,
    prefix: str | None,
    secure_boot: str,
    runtime_version: str,
    runtime_counter: int,
    bl2_version: str,
    bl2_counter: int,
    flash: str,
    passphrase_env: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Manufacture COUNT devices into OUT and write OUT/enrollment.bundle."""
    prod = product(product_name)
    spec = manufacture.BatchSpec(
        product=prod,
        count=count,
        prefix=prefix or prod,
        secure_boot=secure_boot == "on",
        stages=manufacture.StageVersions(
            bl2_version, bl2_counter, runtime_version, runtime_counter
        ),
        flash=manufacture.FlashSize(flash),
    )
    files.check_output_directory(out_dir, force=force)
    workspace = vendor.open_vendor(vendor_dir)
    factory_keys, anchors = _factory_inputs(workspace, gateway_result_key, passphrase_env)
    with _progress(count, enabled=not as_json) as advance:
        batch = manufacture.manufacture_batch(
            out_dir,
            spec,
            keys=factory_keys,
            anchors=anchors,
            created_s=_now_s(),
            random=os.urandom,
            force=force,
            on_device=advance,
        )
    if as_json:
        _emit_json(_batch_summary(batch, workspace))
        return
    click.echo(f"manufactured {_devices(count)} of {prod} in {out_dir}")
    click.echo(f"enrollment bundle {batch.enrollment_path} (signer {workspace.ca.signer_id.hex()})")


def _factory_inputs(
    workspace: Vendor, result_key_pem: Path, passphrase_env: str | None
) -> tuple[manufacture.FactoryKeys, TrustAnchors]:
    """The CA and ROTPK keys, and the trust anchors: firmware signer id + gateway result key."""
    result_key = vendor.load_p256_public(result_key_pem)
    secret = _passphrase(workspace, passphrase_env)
    factory_keys = manufacture.FactoryKeys(
        ca_key=workspace.private_key(Role.CA, secret),
        ca_cert=workspace.ca_certificate(),
        rotpk=workspace.private_key(Role.ROTPK, secret),
        now=datetime.datetime.now(datetime.UTC),
    )
    anchors = TrustAnchors(
        vendor_signer_ids=(workspace.firmware.signer_id,),
        gateway_result_key=keys.p256_point(result_key),
    )
    return factory_keys, anchors


def _batch_summary(batch: manufacture.Batch, workspace: Vendor) -> dict[str, object]:
    enrollment = batch.enrollment
    return {
        "out": str(batch.out_dir),
        "enrollment": str(batch.enrollment_path),
        "product": enrollment.product,
        "devices": [d.device_id for d in enrollment.devices],
        "signer_id": workspace.ca.signer_id.hex(),
        "reference_values": [
            {
                "component": str(rv.component),
                "measurement": rv.measurement.hex(),
                "version": rv.version,
                "security_counter": rv.security_counter,
            }
            for rv in enrollment.reference_values
        ],
    }


@contextmanager
def _progress(total: int, *, enabled: bool) -> Iterator[Callable[[DeviceId], None]]:
    """A rich progress bar on stderr when it is a terminal; yields the per-device callback."""
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]manufacturing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[device]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
    )
    with progress:
        task = progress.add_task("manufacture", total=total, device="")

        def advance(dev: DeviceId) -> None:
            progress.update(task, advance=1, device=dev)

        yield advance


# --- firmware ------------------------------------------------------------------------------------


@cli.group("firmware")
def firmware_group() -> None:
    """MicroPython applications: check and build."""


@firmware_group.command("check")
@click.argument("app_dir", type=_PATH_DIR)
@click.option("--board", type=_BOARDS, default="esp32", show_default=True)
@click.option("--typecheck", is_flag=True, help="Also type-check with pyright and board stubs.")
@_json_option
def firmware_check(app_dir: Path, board: str, typecheck: bool, as_json: bool) -> None:
    """Compile every file of APP_DIR with mpy-cross and check its imports."""
    try:
        report = firmware.check_app(app_dir, board=firmware.Board(board), typecheck=typecheck)
    except firmware.FirmwareCheckError as err:
        if as_json:
            _emit_json({"ok": False, "diagnostics": [_diagnostic(d) for d in err.diagnostics]})
        raise
    listing = [
        {"path": f.path, "source_bytes": len(f.source), "mpy_bytes": len(f.mpy)}
        for f in report.files
    ]
    if as_json:
        _emit_json(
            {"ok": True, "board": board, "typechecked": report.typechecked, "files": listing}
        )
        return
    checked = " and type-check" if report.typechecked else ""
    click.echo(f"ok: {len(listing)} files compile{checked} for {board}")
    for entry in listing:
        click.echo(f"  {entry['path']}  {entry['source_bytes']} B -> {entry['mpy_bytes']} B .mpy")


def _diagnostic(diagnostic: firmware.Diagnostic) -> dict[str, object]:
    return {
        "file": diagnostic.file,
        "line": diagnostic.line,
        "message": diagnostic.message,
        "kind": diagnostic.kind.value,
    }


@firmware_group.command("build")
@click.argument("app_dir", type=_PATH_DIR)
@_vendor_option
@click.option("--product", "product_name", required=True)
@click.option("--version", "version", required=True)
@click.option("--security-counter", type=click.IntRange(0, image.MAX_COUNTER), required=True)
@click.option(
    "--gateway-hpke-key",
    type=_PATH_FILE,
    required=True,
    help="The gateway's HPKE key (PEM, X25519; edgeseal-gateway init exports it).",
)
@click.option("--out", "out_dir", type=_PATH_DIR, default=Path(), help="Output directory.")
@click.option("--min-runtime", default=build.DEFAULT_MIN_RUNTIME, show_default=True)
@click.option("--board", type=_BOARDS, default="esp32", show_default=True)
@_passphrase_option
@_force_option
@_json_option
def firmware_build(
    app_dir: Path,
    vendor_dir: Path,
    product_name: str,
    version: str,
    security_counter: int,
    gateway_hpke_key: Path,
    out_dir: Path,
    min_runtime: str,
    board: str,
    passphrase_env: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Check APP_DIR, seal it, and write PRODUCT-VERSION.sealed and PRODUCT-VERSION.release."""
    spec = build.ReleaseSpec(product(product_name), version, security_counter, min_runtime)
    workspace = vendor.open_vendor(vendor_dir)
    hpke_key = vendor.load_x25519_public(gateway_hpke_key)
    firmware_key = workspace.private_key(Role.FIRMWARE, _passphrase(workspace, passphrase_env))
    result = build.build_firmware(
        app_dir,
        spec,
        board=firmware.Board(board),
        firmware_key=firmware_key,
        gateway_hpke_key=hpke_key,
        out_dir=out_dir,
        created_s=_now_s(),
        random=os.urandom,
        force=force,
    )
    release_id = result.release.manifest_digest.hex()
    if as_json:
        _emit_json(
            {
                "sealed": str(result.sealed_path),
                "release": str(result.release_path),
                "release_id": release_id,
                "signer_id": workspace.firmware.signer_id.hex(),
                "files": list(result.files),
                "image_bytes": len(result.release.image),
            }
        )
        return
    click.echo(f"sealed image   {result.sealed_path} ({len(result.release.image)} bytes)")
    click.echo(f"release bundle {result.release_path}")
    click.echo(f"release id     {release_id}")


# --- image ---------------------------------------------------------------------------------------


@cli.group("image")
def image_group() -> None:
    """Sealed images: inspect and verify (never decrypt)."""


def _read_image(path: Path) -> bytes:
    if not path.is_file():
        raise errors.UsageError(f"{path}: no such file")
    if path.stat().st_size > image.MAX_IMAGE_BYTES:
        raise errors.UsageError(f"{path}: larger than any sealed image ({image.MAX_IMAGE_BYTES} B)")
    return path.read_bytes()


def _signature_status(sealed: image.SealedImage, workspace: Vendor) -> str:
    try:
        image.verify_manifest(sealed, workspace.trusted_firmware_signers())
    except errors.InvalidImage as err:
        return f"invalid: {err}"
    return "valid"


def _manifest_fields(sealed: image.SealedImage, size: int) -> dict[str, object]:
    m = sealed.manifest
    created = datetime.datetime.fromtimestamp(m.created_s, datetime.UTC)
    return {
        "format_version": m.format_version,
        "signer_id": m.vendor_id.hex(),
        "class_id": m.class_id.hex(),
        "component": m.component,
        "version": m.version,
        "security_counter": m.security_counter,
        "payload_size": m.payload_size,
        "ciphertext_sha256": m.ciphertext_sha256.hex(),
        "plaintext_sha256": m.plaintext_sha256.hex(),
        "enc_alg": "A256GCM" if m.enc_alg == image.ENC_ALG_A256GCM else m.enc_alg,
        "iv": m.iv.hex(),
        "key_id": m.key_id.hex(),
        "min_runtime_version": m.min_runtime_version,
        "created_s": m.created_s,
        "created": created.isoformat(),
        "entry_point": m.entry_point,
        "release_id": image.manifest_digest(sealed).hex(),
        "image_bytes": size,
    }


@image_group.command("inspect")
@click.argument("file", type=_PATH_FILE)
@click.option("--vendor", "vendor_dir", type=_PATH_DIR, help="Check the signature with it.")
@_json_option
def image_inspect(file: Path, vendor_dir: Path | None, as_json: bool) -> None:
    """Print the manifest of the sealed image FILE (unverified unless --vendor is given)."""
    data = _read_image(file)
    sealed = image.parse_unverified_image(data)
    fields = _manifest_fields(sealed, len(data))
    workspace = None if vendor_dir is None else vendor.open_vendor(vendor_dir)
    fields["signature"] = (
        "not checked" if workspace is None else _signature_status(sealed, workspace)
    )
    if as_json:
        _emit_json(fields)
        return
    for name, value in fields.items():
        click.echo(f"{name:<20} {value}")


@image_group.command("verify")
@click.argument("file", type=_PATH_FILE)
@_vendor_option
def image_verify(file: Path, vendor_dir: Path) -> None:
    """Exit 0 when FILE's manifest verifies under the vendor's firmware key, 1 otherwise."""
    workspace = vendor.open_vendor(vendor_dir)
    trusted = workspace.trusted_firmware_signers()
    data = _read_image(file)
    try:
        manifest = image.verify_manifest(image.parse_unverified_image(data), trusted)
    except (errors.InvalidImage, errors.MalformedMessage) as err:
        click.echo(f"FAILED: {file}: {err}")
        raise click.exceptions.Exit(EXIT_FAILED) from err
    click.echo(
        f"ok: {file}: {manifest.version} (counter {manifest.security_counter}) "
        f"signed by {manifest.vendor_id.hex()}"
    )


# --- revoke --------------------------------------------------------------------------------------


@cli.command("revoke")
@click.argument("devices", nargs=-1, required=True)
@_vendor_option
@click.option("--out", "out_file", type=_PATH_FILE, required=True)
@click.option("--reason", default="", help="Why (at most 256 characters).")
@_passphrase_option
@_force_option
def revoke(
    devices: tuple[str, ...],
    vendor_dir: Path,
    out_file: Path,
    reason: str,
    passphrase_env: str | None,
    force: bool,
) -> None:
    """Write a revocation bundle for DEVICES, signed by the manufacturer CA key."""
    ids = tuple(dict.fromkeys(device_id(d) for d in devices))
    files.check_output_file(out_file, force=force)
    workspace = vendor.open_vendor(vendor_dir)
    ca_key = workspace.private_key(Role.CA, _passphrase(workspace, passphrase_env))
    bundle = bundles.RevocationBundle(device_ids=ids, reason=reason, created_s=_now_s())
    files.write_file(out_file, bundles.sign_bundle(bundle, ca_key), force=force)
    click.echo(
        f"revocation bundle {out_file}: {_devices(len(ids))}, signer {workspace.ca.signer_id.hex()}"
    )
