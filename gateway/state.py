"""The gateway workspace: one directory holding what a gateway instance needs to start (DESIGN §4).

Layout (``edgeseal-gateway init`` writes it; every file but the PEMs is mode 0600)::

    HOME/
      workspace.json     {"v": 1, "kms": SPEC}: which KMS holds the keys
      gateway.key        the KMS key file (default ``file:`` backend)
      challenge.secret   32 random bytes: the challenge MAC secret (DESIGN §9)
      policy.json        the default appraisal policy (version 1), stored in the registry by
                         ``init``
      result-key.pem     the result key, public (for the factory's trust anchors)
      hpke-key.pem       the gateway HPKE key, public (vendors wrap release CEKs to it)
      registry.db        the default SQLite registry and ledger

Instances that serve one fleet share the challenge secret: point them at the same workspace, or
give the secret as hex in ``EDGESEAL_GATEWAY_SECRET`` (which then wins over the file).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.kms import (
    HPKE_KEY_PEM,
    RESULT_KEY_PEM,
    Kms,
    create_kms,
    export_public_pems,
    open_kms,
)
from gateway.kms.base import write_atomic
from gateway.policy import Policy
from protocol.errors import UsageError

WORKSPACE_VERSION: Final = 1
WORKSPACE_FILE: Final = "workspace.json"
KEY_FILE: Final = "gateway.key"
SECRET_FILE: Final = "challenge.secret"  # noqa: S105 - a file name
POLICY_FILE: Final = "policy.json"
REGISTRY_FILE: Final = "registry.db"
SECRET_BYTES: Final = 32
DEFAULT_HOME: Final = Path(".edgeseal") / "gateway"
ENV_HOME: Final = "EDGESEAL_GATEWAY_HOME"
ENV_SECRET: Final = "EDGESEAL_GATEWAY_SECRET"  # noqa: S105 - a variable name


class WorkspaceError(UsageError):
    """The workspace is missing, incomplete or unreadable; the message names the file and fix."""


def default_home(env: Mapping[str, str] | None = None) -> Path:
    """``$EDGESEAL_GATEWAY_HOME``, else ``./.edgeseal/gateway``."""
    env = os.environ if env is None else env
    value = env.get(ENV_HOME)
    return Path(value) if value else DEFAULT_HOME


@dataclass(frozen=True, slots=True)
class Workspace:
    """An initialized gateway workspace directory."""

    home: Path
    kms_spec: str

    @property
    def default_db_url(self) -> str:
        """The SQLite registry in the workspace."""
        return f"sqlite:///{(self.home / REGISTRY_FILE).resolve()}"

    @property
    def result_key_pem(self) -> Path:
        """The exported result public key."""
        return self.home / RESULT_KEY_PEM

    @property
    def hpke_key_pem(self) -> Path:
        """The exported HPKE public key."""
        return self.home / HPKE_KEY_PEM

    @property
    def policy_path(self) -> Path:
        """The default policy file written by ``init``."""
        return self.home / POLICY_FILE

    def open_kms(self, spec: str | None = None, env: Mapping[str, str] | None = None) -> Kms:
        """Open the workspace's KMS (or the one ``spec`` names)."""
        return open_kms(spec or self.kms_spec, env=env)

    def challenge_secret(self, env: Mapping[str, str] | None = None) -> bytes:
        """The shared challenge secret: ``$EDGESEAL_GATEWAY_SECRET`` (hex), else the file.

        Raises:
            WorkspaceError: the variable is not 32+ bytes of hex, or the file is missing or short.
        """
        env = os.environ if env is None else env
        text = env.get(ENV_SECRET)
        if text:
            try:
                secret = bytes.fromhex(text)
            except ValueError as err:
                raise WorkspaceError(f"{ENV_SECRET}: expected hex") from err
        else:
            try:
                secret = (self.home / SECRET_FILE).read_bytes()
            except OSError as err:
                raise WorkspaceError(f"{self.home / SECRET_FILE}: {err.strerror}") from err
        if len(secret) < SECRET_BYTES:
            raise WorkspaceError(f"challenge secret: expected at least {SECRET_BYTES} bytes")
        return secret

    def result_public_key(self) -> ec.EllipticCurvePublicKey:
        """The result public key from ``result-key.pem`` (no KMS needed).

        Raises:
            WorkspaceError: the PEM is missing or not a P-256 public key.
        """
        try:
            key = serialization.load_pem_public_key(self.result_key_pem.read_bytes())
        except (OSError, ValueError) as err:
            raise WorkspaceError(f"{self.result_key_pem}: not a readable public key PEM") from err
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise WorkspaceError(f"{self.result_key_pem}: not an EC public key")
        return key


def open_workspace(home: Path) -> Workspace:
    """Open a workspace made by ``init_workspace``.

    Raises:
        WorkspaceError: there is none at ``home`` (run ``edgeseal-gateway init``).
    """
    path = home / WORKSPACE_FILE
    try:
        document = json.loads(path.read_text())
    except OSError as err:
        raise WorkspaceError(
            f"no gateway workspace at {home} (run 'edgeseal-gateway init --home {home}')"
        ) from err
    except ValueError as err:
        raise WorkspaceError(f"{path}: not JSON") from err
    if not isinstance(document, dict) or document.get("v") != WORKSPACE_VERSION:
        raise WorkspaceError(f"{path}: expected a version {WORKSPACE_VERSION} workspace")
    spec = document.get("kms")
    if not isinstance(spec, str) or not spec:
        raise WorkspaceError(f"{path}: no KMS spec")
    return Workspace(home, spec)


def init_workspace(
    home: Path,
    *,
    kms_spec: str | None = None,
    env: Mapping[str, str] | None = None,
    randomness: Callable[[int], bytes] = os.urandom,
) -> Workspace:
    """Create a workspace: the KMS keys, the challenge secret, the default policy, the PEMs.

    Raises:
        WorkspaceError: a workspace exists at ``home`` already.
        KmsConfigError: the KMS could not be created (e.g. its key file exists).
    """
    if (home / WORKSPACE_FILE).exists():
        raise WorkspaceError(f"a gateway workspace exists at {home} already")
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    spec = kms_spec or f"file:{(home / KEY_FILE).resolve()}"
    with create_kms(spec, env=env) as kms:
        export_public_pems(kms, home)
    write_atomic(home / SECRET_FILE, randomness(SECRET_BYTES), mode=0o600, replace=False)
    policy = dataclasses.replace(Policy.default(), version=1).to_json().encode()
    write_atomic(home / POLICY_FILE, policy, mode=0o600, replace=True)
    document = json.dumps({"v": WORKSPACE_VERSION, "kms": spec}, sort_keys=True).encode()
    write_atomic(home / WORKSPACE_FILE, document + b"\n", mode=0o600, replace=False)
    return Workspace(home, spec)
