"""The gateway KMS: the KEK, the result key and the HPKE key behind one interface (DESIGN §4, §10).

Backends: ``KeyFileKms`` (``gateway.kms.keyfile``, the default) and ``Pkcs11Kms``
(``gateway.kms.pkcs11``; import it from there, it needs python-pkcs11). ``open_kms`` and
``create_kms`` take a spec string (``gateway.kms.spec``: ``file:PATH[;passphrase-env=VAR]`` or
``pkcs11:token=LABEL;pin-env=VAR[;module=PATH][;hpke-file=PATH]``).
"""

from __future__ import annotations

from gateway.kms.base import (
    HPKE_KEY_PEM,
    RESULT_KEY_PEM,
    HsmError,
    KeyFileCorrupt,
    KeyFileError,
    KeyFileExists,
    Kms,
    KmsConfigError,
    UnwrapError,
    WrongPassphrase,
    WrongPin,
    export_public_pems,
)
from gateway.kms.keyfile import KeyFileKms
from gateway.kms.spec import FileSpec, KmsSpec, Pkcs11Spec, create_kms, open_kms, parse_kms_spec

__all__ = [
    "HPKE_KEY_PEM",
    "RESULT_KEY_PEM",
    "FileSpec",
    "HsmError",
    "KeyFileCorrupt",
    "KeyFileError",
    "KeyFileExists",
    "KeyFileKms",
    "Kms",
    "KmsConfigError",
    "KmsSpec",
    "Pkcs11Spec",
    "UnwrapError",
    "WrongPassphrase",
    "WrongPin",
    "create_kms",
    "export_public_pems",
    "open_kms",
    "parse_kms_spec",
]
