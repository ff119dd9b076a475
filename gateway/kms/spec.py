"""KMS specs: one string that says which backend holds the gateway's keys, and how to open it.

Syntax (no secrets inside a spec: PINs and passphrases come from named environment variables)::

    file:PATH[;passphrase-env=VAR]
    pkcs11:token=LABEL;pin-env=VAR[;module=PATH][;hpke-file=PATH]

- ``file:`` the key file backend (``KeyFileKms``). ``passphrase-env`` names the variable holding
  the passphrase (UTF-8); without it the key file has none.
- ``pkcs11:`` the token backend (``Pkcs11Kms``). ``module`` defaults to SoftHSM2's
  ``/usr/lib/softhsm/libsofthsm2.so``; ``hpke-file`` keeps the wrapped HPKE key in that file
  instead of a token data object.

Parameters are ``;``-separated ``name=value`` pairs, each at most once; paths may not contain
``;``. Examples: ``file:/var/lib/edgeseal/gateway.key``,
``pkcs11:module=/usr/lib/softhsm/libsofthsm2.so;token=edgeseal;pin-env=EDGESEAL_PIN``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gateway.kms.base import Kms, KmsConfigError
from gateway.kms.keyfile import KeyFileKms

DEFAULT_PKCS11_MODULE: Final = "/usr/lib/softhsm/libsofthsm2.so"


@dataclass(frozen=True, slots=True)
class FileSpec:
    """A parsed ``file:`` spec."""

    path: Path
    passphrase_env: str | None = None


@dataclass(frozen=True, slots=True)
class Pkcs11Spec:
    """A parsed ``pkcs11:`` spec."""

    token: str
    pin_env: str
    module: str = DEFAULT_PKCS11_MODULE
    hpke_file: Path | None = None


KmsSpec = FileSpec | Pkcs11Spec


def parse_kms_spec(spec: str) -> KmsSpec:
    """Parse a KMS spec (syntax in the module docstring).

    Raises:
        KmsConfigError: unknown scheme or parameter, a repeated, empty or missing parameter.
    """
    scheme, sep, body = spec.partition(":")
    if not sep or scheme not in ("file", "pkcs11"):
        raise KmsConfigError("KMS spec: expected 'file:PATH' or 'pkcs11:token=...;pin-env=...'")
    if scheme == "file":
        path, *rest = body.split(";")
        if not path:
            raise KmsConfigError("KMS spec file: the key file path is empty")
        params = _params(scheme, rest, {"passphrase-env"})
        return FileSpec(Path(path), params.get("passphrase-env"))
    params = _params(scheme, body.split(";"), {"token", "pin-env", "module", "hpke-file"})
    for required in ("token", "pin-env"):
        if required not in params:
            raise KmsConfigError(f"KMS spec pkcs11: missing {required}=")
    hpke_file = params.get("hpke-file")
    return Pkcs11Spec(
        token=params["token"],
        pin_env=params["pin-env"],
        module=params.get("module", DEFAULT_PKCS11_MODULE),
        hpke_file=None if hpke_file is None else Path(hpke_file),
    )


def open_kms(spec: str, *, env: Mapping[str, str] | None = None) -> Kms:
    """Open the KMS a spec names, reading PINs and passphrases from ``env`` (default os.environ).

    Raises:
        KmsConfigError: a bad spec, an unset variable, or any failure to open (its subclasses
            ``KeyFileError``, ``WrongPassphrase``, ``WrongPin`` say which).
        HsmError: the token failed underneath.
    """
    parsed = parse_kms_spec(spec)
    env = os.environ if env is None else env
    if isinstance(parsed, FileSpec):
        return KeyFileKms.open(parsed.path, _passphrase(parsed, env))
    from gateway.kms.pkcs11 import Pkcs11Kms  # python-pkcs11 is needed only for this backend

    pin = _secret(env, parsed.pin_env, "pin-env")
    return Pkcs11Kms.open(parsed.module, parsed.token, pin, parsed.hpke_file)


def create_kms(spec: str, *, force: bool = False, env: Mapping[str, str] | None = None) -> Kms:
    """Create the keys of a new KMS where a spec says and return it open.

    Raises:
        KmsConfigError: as ``open_kms``; ``KeyFileExists`` (or, for a token already holding
            edgeseal keys, ``KmsConfigError``) when something would be overwritten without
            ``force``.
    """
    parsed = parse_kms_spec(spec)
    env = os.environ if env is None else env
    if isinstance(parsed, FileSpec):
        return KeyFileKms.create(parsed.path, _passphrase(parsed, env), force=force)
    from gateway.kms.pkcs11 import Pkcs11Kms

    pin = _secret(env, parsed.pin_env, "pin-env")
    return Pkcs11Kms.create(parsed.module, parsed.token, pin, parsed.hpke_file, force=force)


def _params(scheme: str, items: list[str], allowed: set[str]) -> dict[str, str]:
    """Parse ``name=value`` items; messages name parameters, never echo values (a mistyped
    PIN must not end up in a log)."""
    where = f"KMS spec {scheme}"
    params: dict[str, str] = {}
    for index, item in enumerate(items, start=1):
        name, sep, value = item.partition("=")
        if not sep:
            raise KmsConfigError(f"{where}: parameter {index} is not name=value")
        if name not in allowed:
            expected = ", ".join(sorted(allowed))
            raise KmsConfigError(f"{where}: unknown parameter {name!r} (expected {expected})")
        if name in params:
            raise KmsConfigError(f"{where}: {name}= given twice")
        if not value:
            raise KmsConfigError(f"{where}: {name}= is empty")
        params[name] = value
    return params


def _passphrase(parsed: FileSpec, env: Mapping[str, str]) -> bytes | None:
    if parsed.passphrase_env is None:
        return None
    return _secret(env, parsed.passphrase_env, "passphrase-env").encode()


def _secret(env: Mapping[str, str], name: str, param: str) -> str:
    value = env.get(name)
    if not value:
        raise KmsConfigError(f"environment variable {name} (named by {param}=) is unset or empty")
    return value
