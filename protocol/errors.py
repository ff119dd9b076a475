"""The one error tree of edgeseal (STYLE.md, "Errors").

Who raises what:

- ``MalformedMessage``: a decoder, for bytes that are not a well-formed message of the expected kind
  (bad CBOR, a missing or mistyped field, a wrong size, trailing bytes). Also a ``ValueError``.
- ``ProtocolViolation``: a state machine, for a step that is not legal in its current state. The
  session moves to ERROR and stays there.
- ``VerificationError`` and its children: a check on untrusted input failed. The children are opaque
  on purpose: like Fernet's ``InvalidToken`` they tell an attacker which check failed, never why in
  detail, and never any key or plaintext bytes.
- ``TransportError``: an adapter, for a broker, a pipe or a database that failed underneath.
- ``UsageError``: a caller or a user asked for something impossible (a missing file, a wrong flag).
  A CLI turns it into exit 2 and one line.
"""

from __future__ import annotations


class EdgesealError(Exception):
    """Base of every error edgeseal raises on purpose."""


class MalformedMessage(EdgesealError, ValueError):
    """Bytes that do not decode to the expected message; the message names the field."""


class ProtocolViolation(EdgesealError):
    """A step not legal in the session's current state; the session is closed (state ERROR)."""


class LocalProtocolError(ProtocolViolation):
    """Our own side asked a session for an illegal step: a bug in the caller."""


class RemoteProtocolError(ProtocolViolation):
    """The peer sent a message that is illegal in the session's current state."""


class VerificationError(EdgesealError):
    """A cryptographic or policy check on untrusted input failed."""


class InvalidSignature(VerificationError):
    """A COSE signature or MAC did not verify under the given key."""


class InvalidToken(VerificationError):
    """An attestation token failed a check (signature, claims, binding, freshness)."""


class InvalidImage(VerificationError):
    """A sealed image failed a check (manifest signature, digest, decryption, rollback)."""


class InvalidGrant(VerificationError):
    """A key grant did not open for this enclave key and context."""


class InvalidChallenge(VerificationError):
    """A challenge was forged, expired, replayed or issued for another device or session."""


class InvalidSignedMessage(VerificationError):
    """A signed result, command or bundle failed its signature, expiry or sequence check."""


class TransportError(EdgesealError):
    """The layer underneath (broker, pipe, database) failed; retrying may help."""


class UsageError(EdgesealError):
    """A caller or user asked for something impossible; the message says what and how to fix it."""
