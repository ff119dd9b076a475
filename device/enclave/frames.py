"""Frames on the device's two pipes: enclave ↔ RoT and NW ↔ enclave (the door) (DESIGN §3).

A frame is a 4-byte big-endian length followed by that many bytes of one canonical CBOR map with
text keys; at most ``MAX_FRAME_BYTES``. Never pickle: a peer can only send data.

    request  {"v": 1, "op": text, "args": map}
    reply    {"v": 1, "ok": map}                      success
             {"v": 1, "err": {"kind": text, "msg": text}}   refusal or failure

Decoding rules (the door is an attack surface, DESIGN §13): a length over the limit loses the
framing, so the connection is closed (``FramingLost``); a well-delimited frame whose body is not
a request gets an error reply and the connection stays up (``FrameError``). Neither ever raises
out of ``serve``: the serving process keeps running until its peer goes away.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from typing import Final

from protocol import cbor
from protocol.errors import EdgesealError, MalformedMessage, TransportError

FRAME_VERSION: Final = 1
MAX_FRAME_BYTES: Final = 1 << 20
MAX_OP_CHARS: Final = 32
MAX_ERROR_CHARS: Final = 256
_LENGTH: Final = struct.Struct(">I")


class FrameError(MalformedMessage):
    """A frame whose body is not a well-formed request or reply; the framing is intact."""


class FramingLost(FrameError):
    """A length prefix over ``MAX_FRAME_BYTES``: the stream cannot be resynchronised; close it."""


class PeerClosed(TransportError):
    """The other end of the pipe closed or died (EOF, reset, or a half-written frame)."""


class RemoteError(EdgesealError):
    """An error reply: the peer refused or failed the request.

    ``kind`` is a short stable word chosen by the server (see each server's module docstring);
    ``message`` is its one-line explanation, never key material.
    """

    def __init__(self, kind: str, message: str) -> None:
        """Keep the ``kind`` and the ``message`` of the error reply."""
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def encode_frame(message: Mapping[str, object]) -> bytes:
    """The length-prefixed canonical CBOR of ``message``.

    Raises:
        ValueError: the encoded message exceeds ``MAX_FRAME_BYTES`` (a caller bug).
    """
    body = cbor.dumps(dict(message))
    if len(body) > MAX_FRAME_BYTES:
        raise ValueError(f"frame: {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _LENGTH.pack(len(body)) + body


def decode_body(body: bytes) -> cbor.Fields:
    """Decode a frame body: one CBOR map with text keys and ``"v": 1``.

    Raises:
        FrameError: not CBOR, not a map, or the wrong version.
    """
    try:
        fields = cbor.Fields(
            cbor.loads(body, what="frame", max_bytes=MAX_FRAME_BYTES), what="frame"
        )
        if fields.get_int("v") != FRAME_VERSION:
            raise MalformedMessage(f"frame.v: expected {FRAME_VERSION}")
    except MalformedMessage as err:
        raise FrameError(str(err)) from err
    keys = fields.keys()
    if not all(isinstance(key, str) for key in keys):
        raise FrameError("frame: expected text keys")
    return fields


class Channel:
    """One end of a pipe carrying frames. ``send`` is thread-safe; ``receive`` is not."""

    __slots__ = ("_send_lock", "sock")

    def __init__(self, sock: socket.socket) -> None:
        """Wrap a connected stream socket (one end of a ``socket.socketpair()``)."""
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, message: Mapping[str, object]) -> None:
        """Send one frame.

        Raises:
            PeerClosed: the peer is gone.
        """
        data = encode_frame(message)
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except OSError as err:
                raise PeerClosed("pipe: peer closed") from err

    def receive(self) -> cbor.Fields:
        """Receive one frame.

        Raises:
            PeerClosed: EOF or a reset, also in the middle of a frame.
            FramingLost: the length prefix exceeds the limit.
            FrameError: the body is not a frame map.
        """
        (length,) = _LENGTH.unpack(self._read_exact(_LENGTH.size))
        if length > MAX_FRAME_BYTES:
            raise FramingLost(f"frame: length {length} exceeds {MAX_FRAME_BYTES}")
        return decode_body(self._read_exact(length))

    def close(self) -> None:
        """Close the socket (idempotent)."""
        with contextlib.suppress(OSError):  # already closed or never connected
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _read_exact(self, size: int) -> bytes:
        chunks: list[bytes] = []
        remaining = size
        while remaining:
            try:
                chunk = self.sock.recv(min(remaining, 1 << 16))
            except OSError as err:
                raise PeerClosed("pipe: connection reset") from err
            if not chunk:
                raise PeerClosed("pipe: peer closed")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)


def request(op: str, args: Mapping[str, object]) -> dict[str, object]:
    """A request map."""
    return {"v": FRAME_VERSION, "op": op, "args": dict(args)}


def reply_ok(result: Mapping[str, object]) -> dict[str, object]:
    """A success reply map."""
    return {"v": FRAME_VERSION, "ok": dict(result)}


def reply_error(kind: str, message: str) -> dict[str, object]:
    """An error reply map (the message is cut to ``MAX_ERROR_CHARS``)."""
    return {"v": FRAME_VERSION, "err": {"kind": kind, "msg": message[:MAX_ERROR_CHARS]}}


class Client:
    """The calling side of a channel: one request, one reply, serialised by a lock."""

    __slots__ = ("_lock", "channel")

    def __init__(self, channel: Channel) -> None:
        """Call over ``channel``."""
        self.channel = channel
        self._lock = threading.Lock()

    def call(self, op: str, **args: object) -> cbor.Fields:
        """Send ``op`` with ``args`` and return the reply's result map.

        Raises:
            RemoteError: the peer replied with an error.
            PeerClosed: the peer is gone.
            FrameError: the reply is malformed (the channel is closed: the peer is not trusted
                to resynchronise).
        """
        with self._lock:
            self.channel.send(request(op, args))
            try:
                reply = self.channel.receive()
            except FrameError:
                self.channel.close()
                raise
        return _reply_result(reply)


def _reply_result(reply: cbor.Fields) -> cbor.Fields:
    if "ok" in reply:
        return reply.get_map("ok")
    try:
        err = reply.get_map("err")
        kind = err.get_str("kind", max_len=MAX_OP_CHARS)
        message = err.get_str("msg", max_len=MAX_ERROR_CHARS)
    except MalformedMessage as exc:
        raise FrameError(f"reply: neither ok nor a well-formed err ({exc})") from exc
    raise RemoteError(kind, message)


#: A server's dispatcher: op name and argument map in, result map out. It raises ``RemoteError``
#: (or anything ``classify`` maps) to refuse.
Handler = Callable[[str, cbor.Fields], Mapping[str, object]]
#: Maps an exception raised by a handler to the (kind, message) of the error reply.
Classifier = Callable[[Exception], tuple[str, str]]


def serve(channel: Channel, handle: Handler, classify: Classifier) -> None:
    """Answer requests on ``channel`` until the peer goes away or the framing is lost.

    Never raises for anything the peer sends: a malformed frame gets a ``malformed`` error reply,
    a handler's exception the reply ``classify`` makes of it.
    """
    while True:
        try:
            message = channel.receive()
            op, args = _parse_request(message)
        except (PeerClosed, FramingLost):
            channel.close()
            return
        except FrameError as err:
            if not _send(channel, reply_error("malformed", str(err))):
                return
            continue
        try:
            reply = reply_ok(handle(op, args))
        except Exception as err:  # the serving boundary: every failure is a reply
            reply = reply_error(*classify(err))
        if not _send(channel, reply):
            return


def _parse_request(message: cbor.Fields) -> tuple[str, cbor.Fields]:
    try:
        message.only({"v", "op", "args"})
        return message.get_str("op", max_len=MAX_OP_CHARS), message.get_map("args")
    except MalformedMessage as err:
        raise FrameError(str(err)) from err


def _send(channel: Channel, message: Mapping[str, object]) -> bool:
    try:
        try:
            channel.send(message)
        except ValueError:  # a result too large for one frame
            channel.send(reply_error("internal", "reply exceeds the frame limit"))
    except PeerClosed:
        channel.close()
        return False
    return True
