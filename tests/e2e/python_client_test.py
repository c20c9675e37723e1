#!/usr/bin/python3
"""The app contract (docs/services.md, "demo") with Debian's python3-socketio (5.7).

Run against any server that implements it (Sidecast or the reference peer in
bench/peers/node):

    SIDECAST_URL=http://127.0.0.1:8080 SIDECAST_TRANSPORTS=polling|websocket \\
        /usr/bin/python3 tests/e2e/python_client_test.py

python-socketio 5.7 predates connection-state recovery and takes any extra
trailing argument for a real one, so every check here compares the whole
answer exactly. Every wait is bounded by WAIT seconds.
"""
import os
import queue
import sys
import unittest
import uuid
import warnings

import socketio

URL = os.environ.get("SIDECAST_URL", "http://127.0.0.1:8080").rstrip("/")
MODE = os.environ.get("SIDECAST_TRANSPORTS", "default")
TRANSPORTS = {"polling": ["polling"], "websocket": ["websocket"], "default": None}
if MODE not in TRANSPORTS:
    sys.exit(f"SIDECAST_TRANSPORTS must be polling, websocket or default, not {MODE}")
WAIT = 5


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Recorder:
    """Queues every call of an event handler; next() waits for one."""

    def __init__(self):
        self.calls = queue.Queue()

    def __call__(self, *args):
        self.calls.put(args)

    def next(self, what):
        try:
            return self.calls.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"no {what} within {WAIT} s") from None

    def pending(self):
        return list(self.calls.queue)


class ContractTest(unittest.TestCase):
    def setUp(self):
        # python-engineio 4.3 leaves its polling requests.Session to the
        # garbage collector: noise, not a finding.
        warnings.simplefilter("ignore", ResourceWarning)
        self.clients = []

    def tearDown(self):
        for sio in self.clients:
            sio.disconnect()

    def client(self):
        sio = socketio.Client(reconnection=False)
        self.clients.append(sio)
        return sio

    def connect(self, sio, namespaces=("/",), auth=None):
        sio.connect(URL, namespaces=list(namespaces), transports=TRANSPORTS[MODE],
                    auth=auth, wait_timeout=WAIT)
        return sio

    def call(self, sio, event, data=None, namespace="/"):
        return sio.call(event, data, namespace=namespace, timeout=WAIT)

    def said_recorder(self, sio, namespace="/"):
        said = Recorder()
        sio.on("said", said, namespace=namespace)
        return said

    def refused(self, namespace):
        """Connects to `namespace` only; returns the connect_error payloads."""
        sio = self.client()
        errors = Recorder()
        sio.on("connect_error", errors, namespace=namespace)
        with self.assertRaises(socketio.exceptions.ConnectionError):
            sio.connect(URL, namespaces=[namespace], transports=TRANSPORTS[MODE], wait_timeout=1)
        return errors.next("connect_error")

    # ------------------------------------------------------------------ tests

    def test_connect_root_and_custom(self):
        sio = self.connect(self.client(), ("/", "/custom"))
        root, custom = sio.get_sid("/"), sio.get_sid("/custom")
        self.assertTrue(root)
        self.assertTrue(custom)
        self.assertNotEqual(root, custom)
        # The Socket.IO sid of each namespace is not the Engine.IO sid.
        self.assertNotEqual(root, sio.sid)
        self.assertNotEqual(custom, sio.sid)
        expected = {"polling": "polling", "websocket": "websocket", "default": "websocket"}[MODE]
        self.assertEqual(sio.transport(), expected)

    def test_whoami(self):
        auth = {"token": "t0k\u00e9n \U0001F511", "n": 1}
        sio = self.connect(self.client(), ("/", "/custom"), auth=auth)
        self.assertEqual(self.call(sio, "whoami"), {"sid": sio.get_sid("/"), "nsp": "/", "auth": auth})
        self.assertEqual(self.call(sio, "whoami", namespace="/custom"),
                         {"sid": sio.get_sid("/custom"), "nsp": "/custom", "auth": auth})

    def test_whoami_without_auth(self):
        sio = self.connect(self.client())
        self.assertEqual(self.call(sio, "whoami"), {"sid": sio.get_sid("/"), "nsp": "/", "auth": {}})

    def test_echo(self):
        sio = self.connect(self.client(), ("/", "/custom"))
        for namespace in ("/", "/custom"):
            with self.subTest(namespace=namespace):
                # One argument comes back as itself, several as a tuple, none as None.
                self.assertEqual(self.call(sio, "echo", "hello", namespace), "hello")
                self.assertEqual(self.call(sio, "echo", ("a", 1, 2.5, True, None), namespace),
                                 ("a", 1, 2.5, True, None))
                nested = {"a": {"b": [1, {"c": "\U0001F600 \u2028 \u2029 \U0010FFFF"}]}, "e": []}
                self.assertEqual(self.call(sio, "echo", (nested, "\u00e9\u00e8"), namespace),
                                 (nested, "\u00e9\u00e8"))
                self.assertIsNone(self.call(sio, "echo", None, namespace))

    def test_echo_bin(self):
        sio = self.connect(self.client())
        blob = bytes(range(256))
        self.assertEqual(self.call(sio, "echo-bin", (blob, "json", {"inner": b"\x00\x01", "n": 3}, b"")),
                         (blob, "json", {"inner": b"\x00\x01", "n": 3}, b""))
        self.assertEqual(self.call(sio, "echo-bin", b"\xff" * 1000), b"\xff" * 1000)

    def test_call_me_back(self):
        sio = self.connect(self.client())
        asked = Recorder()

        def on_callback(*args):
            asked(*args)
            return ("reply", b"\x01\x02\x03", {"k": "v"})

        sio.on("callback", on_callback)
        self.assertEqual(self.call(sio, "call-me-back", ("question", 42)),
                         ("reply", b"\x01\x02\x03", {"k": "v"}))
        self.assertEqual(asked.next("callback"), ("question", 42))

    def test_room_said(self):
        room = unique("py-room")
        a, b = self.client(), self.client()
        said_a, said_b = self.said_recorder(a), self.said_recorder(b)
        self.connect(a)
        self.connect(b)
        self.assertEqual(self.call(a, "join", room), room)
        self.assertEqual(self.call(b, "join", room), room)
        self.assertIs(self.call(a, "say", {"room": room, "text": "hi \U0001F44B"}), True)
        expected = ({"room": room, "text": "hi \U0001F44B", "from": a.get_sid("/")},)
        self.assertEqual(said_a.next("said on a"), expected)
        self.assertEqual(said_b.next("said on b"), expected)

    def test_room_said_custom_namespace(self):
        room = unique("py-room")
        sentinel = unique("py-sentinel")
        a, b = self.client(), self.client()
        said_a = self.said_recorder(a, "/custom")
        said_b_custom = self.said_recorder(b, "/custom")
        said_b_root = self.said_recorder(b, "/")
        self.connect(a, ("/", "/custom"))
        self.connect(b, ("/", "/custom"))
        self.assertEqual(self.call(a, "join", room, "/custom"), room)
        self.assertEqual(self.call(b, "join", room, "/custom"), room)
        # b is in a room of the same name on "/" too, and in `sentinel`.
        self.assertEqual(self.call(b, "join", room, "/"), room)
        self.assertEqual(self.call(b, "join", sentinel, "/"), sentinel)
        self.assertIs(self.call(a, "say", {"room": room, "text": "custom only"}, "/custom"), True)
        expected = ({"room": room, "text": "custom only", "from": a.get_sid("/custom")},)
        self.assertEqual(said_a.next("said on a"), expected)
        self.assertEqual(said_b_custom.next("said on b /custom"), expected)
        # a's next say is on the same connection, after: b's first said on "/"
        # must be that one, not a leak of the /custom room.
        self.assertIs(self.call(a, "say", {"room": sentinel, "text": "sentinel"}, "/"), True)
        self.assertEqual(said_b_root.next("said on b /"),
                         ({"room": sentinel, "text": "sentinel", "from": a.get_sid("/")},))

    def test_leave(self):
        room = unique("py-room")
        a, b = self.client(), self.client()
        said_b = self.said_recorder(b)
        self.connect(a)
        self.connect(b)
        self.assertEqual(self.call(a, "join", room), room)
        self.assertEqual(self.call(b, "join", room), room)
        self.assertEqual(self.call(b, "leave", room), room)
        self.assertIs(self.call(a, "say", {"room": room, "text": "gone"}), True)
        self.assertEqual(self.call(b, "echo", "flush"), "flush")
        self.assertEqual(self.call(b, "join", room), room)
        self.assertIs(self.call(a, "say", {"room": room, "text": "back"}), True)
        self.assertEqual(said_b.next("said on b"), ({"room": room, "text": "back", "from": a.get_sid("/")},))

    def test_bye_disconnects_one_namespace(self):
        sio = self.client()
        gone = Recorder()
        sio.on("disconnect", gone, namespace="/custom")
        self.connect(sio, ("/", "/custom"))
        sio.emit("bye", namespace="/custom")
        gone.next("disconnect of /custom")
        self.assertTrue(sio.connected)
        self.assertEqual(self.call(sio, "echo", "still here"), "still here")

    def test_forbidden(self):
        self.assertEqual(self.refused("/forbidden"), ({"message": "forbidden"},))

    def test_invalid_namespace(self):
        self.assertEqual(self.refused("/nope"), ({"message": "Invalid namespace"},))


if __name__ == "__main__":
    unittest.main(verbosity=2)
