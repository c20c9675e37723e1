"""Pure helpers for the wire format: topics, ids, and event arguments.

No sockets, clocks or globals here, so each function is tested on its own
(tests/python/test_codec.py). They mirror proto/codec.cpp.
"""
import json
import os
import socket

_PLACEHOLDER = "_placeholder"


def room_topic(nsp, room):
    """PUB/SUB topic of a room: ``r<nsp>\\0<room>\\0``.

    The trailing NUL keeps room ``a`` from matching room ``ab`` under
    ZeroMQ's prefix matching.
    """
    return b"r" + nsp.encode() + b"\0" + room.encode() + b"\0"


def namespace_topic(nsp):
    """PUB/SUB topic of a whole namespace: ``n<nsp>\\0``."""
    return b"n" + nsp.encode() + b"\0"


def topic_for(msg):
    """The topic an Emit, or a room-wide Control, travels under; empty for
    one addressed to a sid, and for a Control that names no namespace (as
    proto/codec.cpp's topic_for: the broker would drop it)."""
    target = msg.WhichOneof("to")
    if target in ("in_room", "in_namespace") and not msg.nsp:
        return b""
    if target in ("room", "in_room"):
        return room_topic(msg.nsp, getattr(msg, target))
    if target == "broadcast" or (target == "in_namespace" and msg.in_namespace):
        return namespace_topic(msg.nsp)
    return b""


def valid_peer_id(peer_id):
    """Peer ids are 1-64 bytes with no '.', ':' or NUL (sids and request ids use them)."""
    raw = peer_id.encode() if isinstance(peer_id, str) else peer_id
    return 0 < len(raw) <= 64 and not any(c in raw for c in b".:\0")


def sid_owner(sid):
    """The gateway id that owns a sid ("<gateway id>.<random>"), or ''."""
    head, dot, _ = sid.partition(".")
    return head if dot else ""


def default_worker_id():
    """``w-<host>-<pid>`` like the C++ SDK, cut to a valid peer id."""
    host = "".join(c for c in socket.gethostname() if c not in ".:")
    pid = str(os.getpid())
    return ("w-" + host)[: 64 - len(pid) - 1] + "-" + pid


def pack_args(args):
    """Event arguments -> (JSON array text, attachments).

    bytes-like values anywhere in the arguments become Socket.IO binary
    placeholders ``{"_placeholder": true, "num": n}`` and travel as
    attachments, in the order they are met (lists in order, dicts in key
    order), as python-socketio and the gateway do.
    """
    attachments = []

    def strip(value):
        if isinstance(value, (bytes, bytearray, memoryview)):
            attachments.append(bytes(value))
            return {_PLACEHOLDER: True, "num": len(attachments) - 1}
        if isinstance(value, (list, tuple)):
            return [strip(v) for v in value]
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        return value

    data = [strip(a) for a in args]
    return dumps(data), attachments


def unpack_args(args_json, attachments=()):
    """JSON array text (+ attachments) -> list of arguments.

    Placeholders are replaced by their attachment; text that is not a JSON
    array gives an empty list (the C++ SDK's ``request::args()`` does the same).
    """
    try:
        data = json.loads(args_json) if args_json else []
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(data, list):
        return []
    if not attachments:
        return data

    def fill(value):
        if isinstance(value, dict):
            num = value.get("num")
            if (value.get(_PLACEHOLDER) is True and isinstance(num, int)
                    and not isinstance(num, bool) and 0 <= num < len(attachments)):
                return attachments[num]
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value

    return [fill(v) for v in data]


def parse_json(text, default):
    """Parses JSON text (str or bytes); ``default`` when empty or invalid."""
    if not text:
        return default
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return default


def dumps(value):
    """Compact UTF-8 JSON, the form every other Sidecast component sends."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
