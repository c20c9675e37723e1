#!/usr/bin/python3
"""End to end: sidecast-broker + sidecast-gateway + the Python vm worker example
(workers/python/examples/vm_worker.py, a child process), driven by Debian's
python3-socketio client over the real Socket.IO protocol. Also the Django
publish example against the same gateway, room and namespace emits with
``except_sids`` from an in-process Python worker, and bad JSON from a fake
worker. Every wait is bounded.

    PYTHONPATH=<build>/python:workers/python SIDECAST_BIN=<build>/bin \\
        /usr/bin/python3 tests/python/test_vm_e2e.py -v
"""
import collections
import http.client
import importlib.util
import json
import os
import queue
import signal
import socket
import struct
import subprocess
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request
import warnings

import engineio.packet
import socketio
import zmq

from harness import (BIN, EXAMPLES, PYTHON, WAIT, Broker, Peer, Process, eventually, free_port, free_ports,
                     http_get, main, metric, pair_args, pb, python_env)

API_KEY = "e2e-key"
LAUNCH_MS = 1000
STATE_ORDER = ["queued", "provisioning", "booting", "running"]


def dropped(http_port, reason):
    """sidecast_gateway_dropped_total{reason=...} of the gateway on `http_port`."""
    return metric(http_get(http_port, "/metrics")[1], "sidecast_gateway_dropped_total", reason=reason) or 0


def queued_client(test, nsp, event):
    """A python-socketio client of ``nsp`` on ``test``'s gateway (WebSocket),
    disconnected at the test's end, and the queue its ``event`` fills."""
    sio = socketio.Client(reconnection=False)
    got = queue.Queue()
    sio.on(event, got.put, namespace=nsp)
    sio.connect(f"http://127.0.0.1:{test.http_port}", namespaces=[nsp], transports=["websocket"],
                wait_timeout=WAIT)
    test.addCleanup(sio.disconnect)
    return sio, got


def record_disconnects(cls, svc):
    """Collects in ``cls.left`` the sids whose DISCONNECT reached ``svc``,
    and in ``cls.left_users`` the user each named."""
    cls.left, cls.left_users = set(), {}

    @svc.on_disconnect
    def left(req):
        cls.left_users[req.sid] = req.user
        cls.left.add(req.sid)


class Events:
    """Every event of the namespace, as (offset, event, data).

    /vm has connection-state recovery on, so every event carries an offset
    (a growing number, as text) as an extra last argument, which
    python-socketio 5.7 (it predates recovery) passes on as a real argument.
    That is useful here: python-engineio runs each message's handler on a
    thread of its own, so arrival order proves nothing; the offset gives the
    order the gateway sent them in.
    """

    def __init__(self):
        self.q = queue.Queue()
        self.seen = []

    def handler(self, event):
        def record(*args):
            offset = int(args[-1]) if len(args) >= 2 and str(args[-1]).isdigit() else None
            self.q.put((offset, event, args[0] if args else None))
        return record

    def wait(self, predicate, what, timeout=WAIT):
        """Every event so far, in offset order, once ``predicate`` holds for them."""
        until = time.monotonic() + timeout
        while not predicate(self.seen):
            try:
                self.seen.append(self.q.get(timeout=max(0.0, until - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"no {what} within {timeout} s; got {self.seen}") from None
            self.seen.sort(key=lambda e: (e[0] is None, e[0]))
        return list(self.seen)

    @staticmethod
    def count(events, name):
        return sum(1 for e in events if e[1] == name)


class VmStack(unittest.TestCase):
    """The vm worker example as a process, behind a broker and a gateway; a
    python-socketio client in /vm for each test."""
    gateway_id = "gwE"

    @classmethod
    def setUpClass(cls):
        cls.processes = []
        try:
            cls.broker = Broker(heartbeat_interval_ms=500)
            cls.processes.append(cls.broker.process)
            cls.http_port = free_port()
            cls.url = f"http://127.0.0.1:{cls.http_port}"
            cls.gateway = Process([os.path.join(BIN, "sidecast-gateway"),
                                   "--http", f"127.0.0.1:{cls.http_port}", "--broker", cls.broker.router,
                                   "--events", cls.broker.xpub, "--gateway-id", cls.gateway_id,
                                   "--api-key", API_KEY, "--threads", "1", "--log-level", "warn"],
                                  "gateway")
            cls.processes.append(cls.gateway)
            cls.worker = Process([PYTHON, os.path.join(EXAMPLES, "vm_worker.py"),
                                  "--broker", cls.broker.router, "--publish", cls.broker.xsub,
                                  "--id", "pyvm", "--launch-ms", str(LAUNCH_MS), "--failure-rate", "0",
                                  "--log-level", "warning"], "vm-worker", env=python_env())
            cls.processes.append(cls.worker)
            if not eventually(lambda: http_get(cls.http_port, "/healthz")[0] == 200, 10):
                raise RuntimeError("the gateway did not connect to the broker")
            if not eventually(lambda: cls.broker.workers("vm") == 1, 10):
                raise RuntimeError("the vm worker did not register")
        except Exception:
            cls.dump_and_stop()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.dump_and_stop(show=False)

    @classmethod
    def dump_and_stop(cls, show=True):
        for p in cls.processes:
            if show or not p.running():
                print(f"--- {p.name} output:\n{p.output()}")
        for p in reversed(cls.processes):
            p.stop()
            p.cleanup()

    def setUp(self):
        warnings.simplefilter("ignore", ResourceWarning)  # python-engineio's requests.Session
        self.assertTrue(self.worker.running(), "the vm worker died:\n" + self.worker.output())
        self.sio = socketio.Client(reconnection=False)
        self.events = Events()
        for name in ("vm_progress", "vm_response", "report_ready"):
            self.sio.on(name, self.events.handler(name), namespace="/vm")
        self.sio.connect(self.url, namespaces=["/vm"], transports=["websocket"], wait_timeout=WAIT)
        self.addCleanup(self.sio.disconnect)

    def call(self, event, data):
        return self.sio.call(event, data, namespace="/vm", timeout=WAIT)


class VmEndToEndTest(VmStack):
    def test_open_vm_reports_progress_and_result(self):
        ack = self.call("open_vm", {"count": 2, "name": "e2e"})
        self.assertIsInstance(ack, dict, ack)
        task_id = ack["task_id"]
        self.assertTrue(task_id.startswith("t-"))
        # queued + 10 steps of 10% per VM, then the result.
        events = self.events.wait(lambda ev: Events.count(ev, "vm_progress") == 22
                                  and Events.count(ev, "vm_response") == 1,
                                  "22 vm_progress and a vm_response", LAUNCH_MS / 1000 + WAIT)
        self.assertNotIn(None, [offset for offset, _, _ in events], "events without an offset")
        self.assertEqual(events[-1][1], "vm_response", "the result came before the last progress")
        seen = {}
        for _, _, p in events[:-1]:
            self.assertEqual(p["task_id"], task_id)
            seen.setdefault(p["vm"], []).append((p["state"], p["percent"]))
        self.assertEqual(sorted(seen), ["e2e-1", "e2e-2"])
        for vm, steps in seen.items():
            states = [s for s, _ in steps]
            percents = [p for _, p in steps]
            self.assertEqual(steps[0], ("queued", 0), vm)
            self.assertEqual(steps[-1], ("running", 100), vm)
            self.assertEqual(percents, sorted(percents), f"{vm}: percent went down: {percents}")
            ranks = [STATE_ORDER.index(s) for s in states]
            self.assertEqual(ranks, sorted(ranks), f"{vm}: states out of order: {states}")
        response = events[-1][2]
        self.assertEqual(response["task_id"], task_id)
        self.assertEqual((response["failed"], response["cancelled"], response["worker"]), (0, False, "pyvm"))
        self.assertEqual([(d["vm"], d["state"]) for d in response["data"]],
                         [("e2e-1", "running"), ("e2e-2", "running")])
        for d in response["data"]:
            self.assertRegex(d["ip"], r"^10\.0\.\d+\.\d+$")

    def test_cancel_vm(self):
        task_id = self.call("open_vm", {"count": 1, "name": "c"})["task_id"]
        self.events.wait(lambda ev: Events.count(ev, "vm_progress") >= 1, "a first vm_progress")
        self.assertEqual(self.call("cancel_vm", {"task_id": "t-unknown"}),
                         {"task_id": "t-unknown", "cancelled": False})
        self.assertEqual(self.call("cancel_vm", {"task_id": task_id}),
                         {"task_id": task_id, "cancelled": True})
        events = self.events.wait(lambda ev: Events.count(ev, "vm_response") == 1, "a vm_response")
        # Whatever was sent before the result has arrived too: from the first
        # event ("queued") to the result, with no offset missing.
        def complete(ev):
            offsets = [o for o, _, _ in ev]
            return (any(name == "vm_progress" and p["state"] == "queued" for _, name, p in ev)
                    and len(offsets) == 1 + max(offsets) - min(offsets))

        events = self.events.wait(complete, "every event up to the vm_response")
        self.assertEqual(events[-1][1], "vm_response")
        response = events[-1][2]
        self.assertEqual((response["task_id"], response["cancelled"]), (task_id, True))
        self.assertEqual(response["data"], [{"vm": "c-1", "state": "cancelled"}])
        states = [p["state"] for _, name, p in events if name == "vm_progress"]
        self.assertEqual(states[0], "queued")
        self.assertEqual(states[-1], "cancelled")
        self.assertLess(len(states), 11, "the launch was not cut short")

    def test_bad_count_is_an_error_ack(self):
        ack = self.call("open_vm", {"count": 0})
        self.assertEqual(ack, {"error": "bad_request", "message": "count must be 1..20"})

    def test_a_name_that_is_no_string_is_an_error_ack(self):
        # It was replaced by "vm" and launched, as workers/vm/vm.cpp did.
        ack = self.call("open_vm", {"count": 1, "name": 7})
        self.assertEqual(ack, {"error": "bad_request", "message": "name must be a string of at most 64 characters"})

    def django_example(self):
        """examples/django_publish.py, set to this stack's gateway and key."""
        os.environ["SIDECAST_GATEWAY"] = self.url
        os.environ["SIDECAST_API_KEY"] = API_KEY
        spec = importlib.util.spec_from_file_location("django_publish",
                                                      os.path.join(EXAMPLES, "django_publish.py"))
        example = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)
        return example

    def test_django_publish_example_reaches_the_sid(self):
        example = self.django_example()
        sid = self.sio.get_sid(namespace="/vm")
        self.assertTrue(sid.startswith("gwE."), sid)
        status = example.publish({"sid": sid, "nsp": "/vm", "event": "report_ready",
                                  "data": {"url": "/reports/7"}})
        self.assertEqual(status, 202)
        events = self.events.wait(lambda ev: Events.count(ev, "report_ready") == 1, "report_ready")
        self.assertEqual([data for _, name, data in events if name == "report_ready"],
                         [{"url": "/reports/7"}])

    def test_django_example_puts_a_sid_in_a_room(self):
        # A publish to the room right after the join's answer reaches it.
        example = self.django_example()
        sid = self.sio.get_sid(namespace="/vm")
        self.assertEqual(example.sockets(sid, "join", {"room": "user:7"}), 200)
        self.assertEqual(example.publish({"room": "user:7", "nsp": "/vm", "event": "report_ready",
                                          "data": {"url": "/r/9"}}), 202)
        events = self.events.wait(lambda ev: Events.count(ev, "report_ready") == 1, "report_ready")
        self.assertEqual([data for _, name, data in events if name == "report_ready"], [{"url": "/r/9"}])
        with self.assertRaises(urllib.error.HTTPError) as gone:
            example.sockets(sid.split(".")[0] + ".nosuchsocket", "join", {"room": "user:7"})
        self.assertEqual(gone.exception.code, 404)
        # Closing the room (the rooms API): the socket leaves it, and stays.
        self.assertEqual(example.rooms("leave", {"room": "user:7", "nsp": "/vm"}), 202)

        def rooms_of_sid():
            req = urllib.request.Request(f"{self.url}/api/v1/sockets/{sid}",
                                         headers={"Authorization": f"Bearer {API_KEY}"})
            with urllib.request.urlopen(req, timeout=WAIT) as resp:
                return json.loads(resp.read())["rooms"]
        self.assertTrue(eventually(lambda: rooms_of_sid() == []), rooms_of_sid())

    def test_a_publish_to_a_sid_needs_no_namespace(self):
        # The sid's gateway knows its namespace ("/vm" here); before, the
        # publish defaulted to "/" and the event was dropped after its 202.
        example = self.django_example()
        sid = self.sio.get_sid(namespace="/vm")
        self.assertEqual(example.publish({"sid": sid, "event": "report_ready", "data": {"url": "/r/8"}}), 202)
        events = self.events.wait(lambda ev: Events.count(ev, "report_ready") == 1, "report_ready")
        self.assertEqual([data for _, name, data in events if name == "report_ready"], [{"url": "/r/8"}])


class VmWorkerDrainTest(VmStack):
    """SIGTERM drains the vm worker: a launch under way runs to its end (every
    progress event and the result reach the client), the broker gives the
    worker nothing new meanwhile, and the process exits 0 once it is done."""
    gateway_id = "gwV"

    def test_a_launch_under_way_finishes_before_the_worker_exits(self):
        task_id = self.call("open_vm", {"count": 1, "name": "d"})["task_id"]
        self.events.wait(lambda ev: Events.count(ev, "vm_progress") >= 2, "a second vm_progress")
        self.worker.signal(signal.SIGTERM)
        self.assertTrue(eventually(lambda: self.broker.metric("sidecast_broker_draining_workers", service="vm") == 1,
                                   WAIT), "the broker never counted the worker as draining")
        self.assertTrue(self.worker.running(), "the worker exited before its launch finished")
        events = self.events.wait(lambda ev: Events.count(ev, "vm_response") == 1, "the vm_response",
                                  LAUNCH_MS / 1000 + WAIT)
        response = events[-1][2]
        self.assertEqual((response["task_id"], response["cancelled"], response["data"][0]["state"]),
                         (task_id, False, "running"))
        self.assertEqual(Events.count(events, "vm_progress"), 11)
        self.worker.proc.wait(WAIT)
        self.assertEqual(self.worker.proc.returncode, 0, self.worker.output())
        # Gone: a new launch has no worker (answered at the request's deadline).
        self.assertTrue(eventually(lambda: self.broker.workers("vm") == 0, WAIT))


class InProcessWorkerTest(unittest.TestCase):
    """A broker and a gateway (child processes) and one Python worker in this
    process, serving the service ``cls.service()`` builds under the
    namespace "/<its name>"; ``cls.gateway_args`` are more gateway flags."""

    gateway_id = "gwP"
    gateway_threads = 1
    gateway_args = ()
    broker_args = ()
    worker_count = 1  # more: cls.workers, each serving a service of its own call of service()

    @classmethod
    def service(cls):
        raise NotImplementedError

    @classmethod
    def setUpClass(cls):
        from sidecast_worker import Worker
        cls.broker = Broker(heartbeat_interval_ms=500, extra=cls.broker_args)
        cls.http_port = free_port()
        svc = cls.service()
        cls.gateway = Process([os.path.join(BIN, "sidecast-gateway"),
                               "--http", f"127.0.0.1:{cls.http_port}", "--broker", cls.broker.router,
                               "--events", cls.broker.xpub, "--gateway-id", cls.gateway_id,
                               "--route", f"/{svc.name}={svc.name}", "--threads", str(cls.gateway_threads),
                               "--log-level", "warn", *cls.gateway_args], "gateway")
        cls.workers = []
        for i in range(cls.worker_count):
            w = Worker(broker=cls.broker.router, publish=cls.broker.xsub,
                       worker_id=f"py{svc.name}" + (str(i + 1) if i else ""), heartbeat_interval=0.5)
            w.add(svc if i == 0 else cls.service())
            w.start()
            cls.workers.append(w)
        cls.worker = cls.workers[0]
        if not (eventually(lambda: http_get(cls.http_port, "/healthz")[0] == 200, 10)
                and eventually(lambda: cls.broker.workers(svc.name) == cls.worker_count, 10)):
            print(f"--- gateway output:\n{cls.gateway.output()}")
            cls.tearDownClass()
            raise RuntimeError("the gateway or the worker did not connect to the broker")

    @classmethod
    def tearDownClass(cls):
        for w in cls.workers:
            w.stop()
        for p in (cls.gateway, cls.broker.process):
            p.stop()
            p.cleanup()

    def gateway_metric(self, name, **labels):
        """The gateway's sample of ``name`` (with ``labels``), 0 while it has none."""
        return metric(http_get(self.http_port, "/metrics")[1], name, **labels) or 0

    def api(self, method, path, body=None, key=API_KEY):
        """(status, the JSON answer or None) of the gateway's /api/v1``path``."""
        c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=WAIT)
        self.addCleanup(c.close)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        c.request(method, f"/api/v1{path}", body=data, headers=headers)
        res = c.getresponse()
        text = res.read()
        return res.status, json.loads(text) if text else None


class ExceptSidsEndToEndTest(InProcessWorkerTest):
    """Room and namespace emits that leave some sockets out (``except_sids``):
    a Python worker (the SDK, in this process) publishes them, the broker
    passes them on over PUB/SUB, and the gateway skips the excluded sockets,
    as Socket.IO's ``socket.to(room).emit()`` leaves the sender out. Three
    python-socketio clients on one gateway: a and b in room "r", c not. The
    same gateway (--max-pending-acks 2, --max-awaited-acks 2) serves the
    tests of acks awaited on either side."""

    gateway_id = "gwX"
    gateway_args = ("--max-pending-acks", "2", "--max-awaited-acks", "2")

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("ex", capacity=8)

        @svc.on("enter")
        def enter(req):
            req.join("r")  # reaches the gateway before the ack (one ordered link)
            req.reply(True)

        @svc.on("shout")
        def shout(req):
            req.emit_to_room("r", "heard", req.args[0], except_sids=[req.sid])
            req.reply(True)

        @svc.on("shout_all")
        def shout_all(req):
            req.broadcast("all", req.args[0], except_sids=[req.sid])
            req.reply(True)

        cls.asked = queue.Queue()

        @svc.on("ask")
        def ask(req):
            future = req.emit_with_ack("question", timeout=30)
            req.reply(True)
            cls.asked.put(future.result(WAIT * 2).code.name if future else "refused")

        @svc.on("slow")
        def slow(req):
            req.sleep(1.0)
            req.reply("done")

        @svc.on("end")
        def end(req):
            req.broadcast("end", req.args[0])
            req.reply(True)

        return svc

    def client(self):
        sio = socketio.Client(reconnection=False)
        got = collections.defaultdict(list)
        for name in ("heard", "all", "end"):
            sio.on(name, lambda data, name=name: got[name].append(data), namespace="/ex")
        sio.connect(f"http://127.0.0.1:{self.http_port}", namespaces=["/ex"], transports=["websocket"],
                    wait_timeout=WAIT)
        self.addCleanup(sio.disconnect)
        return sio, got

    def test_events_past_the_pending_acks_limit_are_answered_busy(self):
        # This gateway runs with --max-pending-acks 2.
        warnings.simplefilter("ignore", ResourceWarning)
        sio, _ = self.client()
        answers = queue.Queue()
        for i in range(3):
            sio.emit("slow", i, namespace="/ex", callback=lambda *a, i=i: answers.put((i, a)))
        # The refusal keeps its place among the acks (in the order the
        # events came), so it comes after the two that were served.
        got = [answers.get(timeout=WAIT) for _ in range(3)]
        self.assertEqual(got, [(0, ("done",)), (1, ("done",)),
                               (2, ({"error": "busy", "message": "too many events waiting for their ack"},))])
        self.assertEqual(dropped(self.http_port, "ack_limit"), 1)

    def test_an_ack_awaited_from_a_client_that_leaves_is_answered_at_once(self):
        warnings.simplefilter("ignore", ResourceWarning)
        sio = socketio.Client(reconnection=False)
        asked = threading.Event()

        def question():  # answers only after the client has gone
            asked.set()
            time.sleep(2)

        sio.on("question", question, namespace="/ex")
        sio.connect(f"http://127.0.0.1:{self.http_port}", namespaces=["/ex"], transports=["websocket"],
                    wait_timeout=WAIT)
        self.assertTrue(sio.call("ask", None, namespace="/ex", timeout=WAIT))
        self.assertTrue(asked.wait(WAIT))
        left = time.monotonic()
        sio.disconnect()
        # The worker's emit_with_ack has a 30 s timeout; the gateway answers
        # for the client that left as soon as its socket ends.
        self.assertEqual(self.asked.get(timeout=WAIT), "UNAVAILABLE")
        self.assertLess(time.monotonic() - left, WAIT)

    def test_past_max_awaited_acks_the_oldest_is_answered_timeout(self):
        # --max-awaited-acks 2: a client that never acks holds two of the
        # worker's emits; a third makes the oldest give way, answered at once.
        # Raw frames: python-socketio acks every event, handled or not.
        import websocket  # python3-websocket
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.http_port}/socket.io/?EIO=4&transport=websocket",
                                         timeout=WAIT)
        self.assertTrue(ws.recv().startswith("0"))
        ws.send("40/ex,")
        self.assertTrue(ws.recv().startswith("40/ex,"))
        before = dropped(self.http_port, "undelivered")
        for i in range(3):
            ws.send(f'42/ex,{i}["ask"]')
            frames = [ws.recv(), ws.recv()]  # the question (with an ack id) and the ask's ack, in either order
            self.assertIn(f"43/ex,{i}[true]", frames)
        self.assertEqual(self.asked.get(timeout=WAIT), "TIMEOUT")
        self.assertEqual(dropped(self.http_port, "undelivered"), before + 1)
        ws.close()
        self.assertEqual([self.asked.get(timeout=WAIT) for _ in range(2)], ["UNAVAILABLE"] * 2)

    def test_flooding_with_events_awaiting_acks_cuts_the_client_off(self):
        # --max-pending-acks 2: two wait for the worker, the next two are
        # refused in their places, and the fifth (twice the cap waiting) ends
        # the connection.
        warnings.simplefilter("ignore", ResourceWarning)
        sio, _ = self.client()
        gone = threading.Event()
        sio.on("disconnect", gone.set, namespace="/ex")
        before = dropped(self.http_port, "ack_limit")
        for i in range(5):
            sio.emit("slow", i, namespace="/ex", callback=lambda *a: None)
        self.assertTrue(gone.wait(WAIT), "the client was not cut off")
        self.assertEqual(dropped(self.http_port, "ack_limit"), before + 3)

    def test_an_api_session_cannot_ack_and_its_worker_hears_so_at_once(self):
        import urllib.request

        def post(path, body):
            req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=json.dumps(body).encode(),
                                         method="POST")
            with urllib.request.urlopen(req, timeout=WAIT) as res:
                return res.status, json.loads(res.read() or b"null")

        status, created = post("/api/v1/sessions", {"nsp": "/ex"})
        self.assertEqual(status, 201, created)
        status, _ = post(f"/api/v1/sessions/{created['session']}/emit", {"event": "ask", "ack": True})
        self.assertEqual(status, 200)
        # The worker's emit_with_ack has a 30 s timeout; the answer is at once.
        self.assertEqual(self.asked.get(timeout=WAIT), "BAD_REQUEST")

    def test_the_excluded_sockets_get_nothing(self):
        warnings.simplefilter("ignore", ResourceWarning)
        (a, at_a), (b, at_b), (c, at_c) = self.client(), self.client(), self.client()
        for sio in (a, b):
            self.assertTrue(sio.call("enter", None, namespace="/ex", timeout=WAIT))
        # Said again until heard (bounded): the gateway asked for every room
        # of /ex when a came, so the first should do.
        n = 0

        def said(event, to, heard_by):
            nonlocal n
            n += 1
            a.call(event, f"{event}-{n}", namespace="/ex", timeout=WAIT)
            return heard_by[to]

        self.assertTrue(eventually(lambda: said("shout", "heard", at_b), WAIT, 0.1), "b never heard a")
        self.assertTrue(eventually(lambda: said("shout_all", "all", at_c), WAIT, 0.1), "c never got a's broadcast")
        self.assertTrue(eventually(lambda: said("shout_all", "all", at_b), WAIT, 0.1), "b never got a's broadcast")
        # What the gateway sends a socket it sends in order: once a has the
        # last broadcast, and a little later, anything meant for it is in.
        a.call("end", "last", namespace="/ex", timeout=WAIT)
        self.assertTrue(eventually(lambda: at_a["end"] and at_c["end"], WAIT), "the last broadcast never came")
        time.sleep(0.2)
        self.assertEqual(at_a["heard"], [], "the sender got its own room emit")
        self.assertEqual(at_a["all"], [], "the sender got its own broadcast")
        self.assertEqual(at_c["heard"], [], "a socket outside the room got the room's emit")
        self.assertTrue(all(t.startswith("shout-") for t in at_b["heard"]), at_b["heard"])


class ThreadBacklogTest(InProcessWorkerTest):
    """With several I/O threads the bridge posts its deliveries to each
    socket's thread, at most --max-thread-backlog of them waiting for one
    thread (1 here). A room broadcast reaching two sockets of one thread is
    past it, so it is dropped there and counted (thread_backlog); one event
    to one socket, and the replies to requests, still go."""

    gateway_id = "gwT"
    gateway_threads = 2
    gateway_args = ("--max-thread-backlog", "1")

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("tb", capacity=8)

        @svc.on("enter")
        def enter(req):
            req.join("r")
            req.reply(True)

        @svc.on("shout")
        def shout(req):
            req.emit_to_room("r", "heard", req.args[0])
            req.reply(True)

        @svc.on("me")
        def me(req):
            req.emit("to_me", req.args[0])
            req.reply("sent")

        return svc

    def test_a_broadcast_past_a_threads_backlog_is_dropped_and_counted(self):
        warnings.simplefilter("ignore", ResourceWarning)
        # Four connections in a row: the gateway hands them to its two
        # threads in turn, so each thread has two of them.
        clients = []
        for _ in range(4):
            sio = socketio.Client(reconnection=False)
            got = collections.defaultdict(list)
            for name in ("heard", "to_me"):
                sio.on(name, lambda data, name=name, got=got: got[name].append(data), namespace="/tb")
            sio.connect(f"http://127.0.0.1:{self.http_port}", namespaces=["/tb"], transports=["websocket"],
                        wait_timeout=WAIT)
            self.addCleanup(sio.disconnect)
            clients.append((sio, got))
        for sio, _ in clients:
            self.assertTrue(sio.call("enter", namespace="/tb", timeout=WAIT))
        before = dropped(self.http_port, "thread_backlog")
        self.assertTrue(clients[0][0].call("shout", "one", namespace="/tb", timeout=WAIT))
        self.assertTrue(eventually(lambda: dropped(self.http_port, "thread_backlog") == before + 4, WAIT),
                        dropped(self.http_port, "thread_backlog") - before)
        # An event to one socket is one delivery: it goes, and so does the
        # reply. (It finds the thread's count back at 0: the replies to the
        # four "enter"s were counted too, and left it as they ran.)
        self.assertEqual(clients[1][0].call("me", "hi", namespace="/tb", timeout=WAIT), "sent")
        self.assertTrue(eventually(lambda: clients[1][1]["to_me"] == ["hi"], WAIT), clients[1][1])
        time.sleep(0.2)
        self.assertEqual([got["heard"] for _, got in clients], [[], [], [], []])
        self.assertEqual(dropped(self.http_port, "thread_backlog"), before + 4)


class PeerGatewayAnswerTest(unittest.TestCase):
    """A long-poll for another gateway's sid is forwarded to that gateway
    through the broker, and its HttpAnswer becomes this gateway's response.
    The peer here is a fake registered gateway (gwF): an answer whose status
    is not a final HTTP status, or whose content type could add a header,
    becomes a 502 (counted bad_answer) rather than a botched response."""

    @classmethod
    def setUpClass(cls):
        cls.broker = Broker(heartbeat_interval_ms=500)
        cls.http_port = free_port()
        cls.gateway = Process([os.path.join(BIN, "sidecast-gateway"),
                               "--http", f"127.0.0.1:{cls.http_port}", "--broker", cls.broker.router,
                               "--events", cls.broker.xpub, "--gateway-id", "gwR", "--threads", "1",
                               "--log-level", "error"], "gateway")
        cls.context = zmq.Context()
        cls.peer = Peer(cls.context, cls.broker.router, "gwF", role=pb.ROLE_GATEWAY)
        if not (eventually(lambda: http_get(cls.http_port, "/healthz")[0] == 200, 10) and cls.peer.hello()):
            cls.tearDownClass()
            raise RuntimeError("the gateway or the fake peer did not come up")

    @classmethod
    def tearDownClass(cls):
        cls.peer.close()
        cls.context.term()
        for p in (cls.gateway, cls.broker.process):
            p.stop()
            p.cleanup()

    def poll_answered(self, status, content_type, body=b"2"):
        """(status, headers, body) of a long-poll for sid gwF.x, answered so by the peer."""
        result = queue.Queue()

        def get():
            conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=WAIT)
            conn.request("GET", "/socket.io/?EIO=4&transport=polling&sid=gwF.x")
            res = conn.getresponse()
            result.put((res.status, res.getheaders(), res.read()))
            conn.close()

        threading.Thread(target=get, daemon=True).start()
        forward = self.peer.next("forward")
        self.assertIsNotNone(forward, "the gateway did not forward the poll to the sid's owner")
        self.assertEqual((forward.forward.sid, forward.forward.method), ("gwF.x", "GET"))
        env = pb.Envelope()
        env.answer.id = forward.forward.id
        env.answer.status = status
        env.answer.content_type = content_type
        env.answer.body = body
        self.peer.send(env)
        return result.get(timeout=WAIT)

    def test_a_peers_answer_is_relayed(self):
        status, headers, body = self.poll_answered(200, "text/plain; charset=UTF-8", b"6")
        self.assertEqual((status, body), (200, b"6"))
        self.assertIn(("Content-Type", "text/plain; charset=UTF-8"), headers)

    def test_a_relayed_poll_whose_client_left_is_reported_gone(self):
        gone = socket.create_connection(("127.0.0.1", self.http_port), timeout=WAIT)
        gone.sendall(b"GET /socket.io/?EIO=4&transport=polling&sid=gwF.y HTTP/1.1\r\nHost: x\r\n\r\n")
        forward = self.peer.next("forward", where=lambda env: env.forward.sid == "gwF.y")
        self.assertEqual(forward.forward.method, "GET")
        gone.close()
        told = self.peer.next("forward", where=lambda env: env.forward.sid == "gwF.y")
        self.assertIsNotNone(told, "the owner was not told the client left")
        self.assertEqual(told.forward.method, "GONE")

    def test_a_peers_answer_that_cannot_be_written_is_a_502(self):
        before = dropped(self.http_port, "bad_answer")
        for status, content_type in ((200, "text/plain\r\nSet-Cookie: stolen=1"), (70000, "text/plain"),
                                     (101, "text/plain"), (200, ""), (200, "x" * 500)):
            with self.subTest(status=status, content_type=content_type[:30]):
                got, headers, body = self.poll_answered(status, content_type)
                self.assertEqual(got, 502)
                self.assertNotIn("Set-Cookie", dict(headers))
                self.assertEqual(json.loads(body), {"code": 3, "message": "Bad request"})
        self.assertEqual(dropped(self.http_port, "bad_answer"), before + 5)


class DeliveryReportTest(InProcessWorkerTest):
    """A worker's event for one sid with ``report_delivery`` is reported by
    the socket's own thread once the socket took it or dropped it: DELIVERED
    when queued for the client (or held until its connect is answered),
    REJECTED with the reason when dropped. Here the connect hook sends four
    events and the socket may hold two (--outbound-messages 4)."""

    gateway_id = "gwD"
    gateway_args = ("--outbound-messages", "4")

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("dr", capacity=4)
        cls.reports = queue.Queue()

        @svc.on_connect
        def hello(req):
            for i in range(4):
                cls.worker.emit_to_sid(req.sid, "early", i, nsp="/dr", report_delivery=True, ref=f"early{i}")

        @svc.on("later")
        def later(req):
            cls.worker.emit_to_sid(req.sid, "later", 1, nsp="/dr", report_delivery=True, ref="later")
            req.reply(True)

        return svc

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.worker.on_report(cls.reports.put)

    def report(self):
        try:
            return self.reports.get(timeout=WAIT)
        except queue.Empty:
            self.fail("no delivery report")

    def test_a_dropped_event_is_reported_rejected_not_delivered(self):
        warnings.simplefilter("ignore", ResourceWarning)
        sio, got = queued_client(self, "/dr", "early")
        sid = sio.get_sid(namespace="/dr")
        reports = {r.ref: r for r in (self.report() for _ in range(4))}
        self.assertEqual({ref: r.status for ref, r in reports.items()},
                         {"early0": "DELIVERED", "early1": "DELIVERED", "early2": "REJECTED", "early3": "REJECTED"})
        self.assertEqual(reports["early2"].detail, "too many events before the client's connect was answered")
        self.assertEqual({r.sid for r in reports.values()}, {sid})
        self.assertEqual([got.get(timeout=WAIT) for _ in range(2)], [0, 1])
        self.assertTrue(sio.call("later", namespace="/dr", timeout=WAIT))
        r = self.report()
        self.assertEqual((r.ref, r.status, r.sid), ("later", "DELIVERED", sid))
        time.sleep(0.2)
        self.assertTrue(got.empty(), "a dropped event reached the client")


class KickDuringConnectTest(InProcessWorkerTest):
    """A worker that disconnects a socket from its connect hook: the
    disconnect waits for the connect's answer, like the hook's events, then
    ends the socket (Socket.IO and /ws); an HTTP API session so ended gets
    its POST answered 410 at once (it waited for ever)."""

    gateway_id = "gwK"

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("kick", capacity=4)
        cls.kicked = []

        @svc.on_connect
        def kick(req):
            cls.kicked.append(req.sid)
            req.emit("hello", 1)
            cls.worker.disconnect(req.sid, nsp="/kick")

        record_disconnects(cls, svc)

        return svc

    def test_socketio_is_connected_then_disconnected(self):
        # python-socketio 5.7.2 (Debian 12) ignores a namespace DISCONNECT
        # that its read thread handles before connect() has set
        # `connected`, which connect() does last, after its wait for the
        # CONNECT answer: the "disconnect" handler then never runs (seen
        # once in a full ctest run). What this checks is what the gateway
        # sent, so the packets are recorded as the client library reads
        # them, before that check.
        warnings.simplefilter("ignore", ResourceWarning)
        seen = queue.Queue()

        class Recording(socketio.Client):
            def _handle_disconnect(self, namespace):
                seen.put(("disconnect", namespace))
                super()._handle_disconnect(namespace)

        sio = Recording(reconnection=False)
        sio.on("hello", lambda n: seen.put(("hello", n)), namespace="/kick")
        sio.connect(f"http://127.0.0.1:{self.http_port}", namespaces=["/kick"], transports=["websocket"],
                    wait_timeout=WAIT)
        self.addCleanup(sio.disconnect)
        self.assertEqual(seen.get(timeout=WAIT), ("hello", 1), "the hook's event comes before the disconnect")
        try:
            self.assertEqual(seen.get(timeout=WAIT), ("disconnect", "/kick"))
        except queue.Empty:
            self.fail("the worker's disconnect was lost")

    def test_plain_ws_gets_connect_then_disconnect(self):
        import websocket  # python3-websocket
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.http_port}/ws?nsp=/kick", timeout=WAIT)
        self.addCleanup(ws.close)
        events = [json.loads(ws.recv())["event"] for _ in range(3)]
        self.assertEqual(events, ["connect", "hello", "disconnect"])

    def test_an_api_session_ended_by_its_connect_hook_is_answered_410(self):
        import urllib.error
        import urllib.request
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/api/v1/sessions",
                                     data=json.dumps({"nsp": "/kick"}).encode(), method="POST")
        with self.assertRaises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(req, timeout=WAIT)
        self.assertEqual(caught.exception.code, 410)
        # Accepted, then kicked: its service gets the DISCONNECT, as for the other faces.
        sid = self.kicked[-1]
        self.assertTrue(eventually(lambda: sid in self.left, WAIT), "the service never heard the session left")


class CancelledAtEndTest(InProcessWorkerTest):
    """A socket that ends gives up its events still awaiting their acks: the
    one running sees its cancel token, those still queued at the broker do
    not run, and the service is free for other clients at once. Before, a
    client that sent many and left held the service's queue for everyone
    until their deadlines (a second client's connect took 27 s)."""

    gateway_id = "gwC"

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("slow", capacity=1)
        cls.started, cls.cancelled = queue.Queue(), queue.Queue()

        @svc.on("hold")
        def hold(req):
            cls.started.put(req.args[0])
            if not req.sleep(20):
                cls.cancelled.put(req.args[0])
            req.reply("held")

        @svc.on("echo")
        def echo(req):
            req.reply(req.args[0])

        return svc

    def test_the_events_of_a_socket_that_ends_are_cancelled(self):
        before = self.gateway_metric("sidecast_gateway_requests_cancelled_total")
        sio, _ = queued_client(self, "/slow", "none")
        for i in range(5):  # one runs (capacity 1), four wait in the broker's queue
            sio.emit("hold", i, namespace="/slow", callback=lambda *a: None)
        self.assertEqual(self.started.get(timeout=WAIT), 0)
        sio.disconnect()
        self.assertEqual(self.cancelled.get(timeout=WAIT), 0, "the running handler was not cancelled")
        self.assertTrue(eventually(
            lambda: self.gateway_metric("sidecast_gateway_requests_cancelled_total") - before == 5, WAIT))
        other, _ = queued_client(self, "/slow", "none")
        # Behind the four holds it would wait 20 s each (call() raises at WAIT).
        self.assertEqual(other.call("echo", "hi", namespace="/slow", timeout=WAIT), "hi")
        time.sleep(0.5)  # a queued hold that ran would have started by now
        ran = [self.started.get_nowait() for _ in range(self.started.qsize())]
        self.assertEqual(ran, [], "cancelled events ran")


class UnfinishedMessagesTest(InProcessWorkerTest):
    """What a client starts and never finishes is not held: a Socket.IO
    binary packet is taken only in a namespace the client joined, and one
    still short of attachments at two pings in a row ends its connection;
    a /ws message left unfinished in fragments the same. Every frame (a
    pong too) kept such a connection alive, holding what had come (up to
    --max-attachments x --max-payload) for good."""

    gateway_id = "gwU"
    gateway_args = ("--ping-interval", "300", "--ping-timeout", "2000")

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("unf", capacity=4)

        @svc.on("echo")
        def echo(req):
            req.reply(*req.args)

        return svc

    def eio_websocket(self):
        import websocket  # python3-websocket
        ws = websocket.create_connection(
            f"ws://127.0.0.1:{self.http_port}/socket.io/?EIO=4&transport=websocket", timeout=WAIT)
        self.addCleanup(ws.close)
        self.assertTrue(ws.recv().startswith("0{"))
        return ws

    def closed_within(self, ws, seconds, answer_pings=True):
        """True when the gateway closes `ws` within `seconds` while the
        client answers each Engine.IO ping."""
        import websocket
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            # Short reads: python3-websocket answers WebSocket pings inside
            # recv() and reads on, so a long timeout never ran out.
            ws.settimeout(0.1)
            try:
                got = ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError):
                return True
            if got == "":
                return True
            if answer_pings and got == "2":
                ws.send("3")
        return False

    def test_a_binary_packet_needs_a_joined_namespace(self):
        before = dropped(self.http_port, "bad_packet")
        ws = self.eio_websocket()
        ws.send('451-/unf,["echo",{"_placeholder":true,"num":0}]')
        self.assertTrue(self.closed_within(ws, WAIT), "a binary packet with no namespace joined was taken")
        self.assertTrue(eventually(lambda: dropped(self.http_port, "bad_packet") > before))

    def test_a_binary_packet_short_of_attachments_ends_its_connection(self):
        ws = self.eio_websocket()
        ws.send("40/unf,")
        self.assertTrue(ws.recv().startswith("40/unf,{"))
        ws.send('452-/unf,1["echo",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]')
        ws.send_binary(b"\x01" * 1000)  # the second never comes
        # Two pings (300 ms apart) find it waiting; bounded well past that.
        self.assertTrue(self.closed_within(ws, 3), "the unfinished packet was held while the client ponged")

    def test_a_complete_binary_packet_still_goes_through(self):
        ws = self.eio_websocket()
        ws.send("40/unf,")
        self.assertTrue(ws.recv().startswith("40/unf,{"))
        ws.send('451-/unf,7["echo",{"_placeholder":true,"num":0}]')
        ws.send_binary(b"\x02" * 10)
        deadline = time.monotonic() + WAIT
        got = ""
        while time.monotonic() < deadline and not got.startswith("461-/unf,7"):
            got = ws.recv()
            if got == "2":
                ws.send("3")
        self.assertTrue(got.startswith("461-/unf,7"), got)
        self.assertEqual(ws.recv(), b"\x02" * 10)

    def test_a_ws_message_left_in_fragments_ends_its_connection(self):
        import websocket
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.http_port}/ws?nsp=/unf", timeout=WAIT)
        self.addCleanup(ws.close)
        self.assertEqual(json.loads(ws.recv())["event"], "connect")
        ws.send_frame(websocket.ABNF.create_frame('{"event":"echo","data":"', websocket.ABNF.OPCODE_TEXT, fin=0))
        # The gateway's pings are answered by recv() (python3-websocket pongs).
        self.assertTrue(self.closed_within(ws, 3, answer_pings=False), "the unfinished message was held")
        # A message in fragments that ends is taken.
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.http_port}/ws?nsp=/unf", timeout=WAIT)
        self.addCleanup(ws.close)
        self.assertEqual(json.loads(ws.recv())["event"], "connect")
        ws.send_frame(websocket.ABNF.create_frame('{"event":"echo","id":1,', websocket.ABNF.OPCODE_TEXT, fin=0))
        ws.send_frame(websocket.ABNF.create_frame('"data":"x"}', websocket.ABNF.OPCODE_CONT, fin=1))
        self.assertEqual(json.loads(ws.recv()), {"id": 1, "data": "x"})


class GoneClientTest(InProcessWorkerTest):
    """What a worker hears of a client that is gone: a socket whose client
    leaves while the connect hook runs is disconnected once the service
    accepts it (its on_disconnect runs: no per-sid state leaks); an
    emit_with_ack to a gone sid, or one the gateway will not deliver, is
    answered at once instead of at the worker's timeout; a control for a
    socket of another namespace is refused; a /ws frame without "nsp" is
    for the connection's own namespace."""

    gateway_id = "gwO"

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("gone", capacity=8)
        cls.connected, cls.asked = queue.Queue(), queue.Queue()

        @svc.on_connect
        def hello(req):
            time.sleep(float(req.auth.get("sleep", 0)))
            cls.connected.put(req.sid)
            if "user" in req.auth:
                req.accept({"user": req.auth["user"]})

        record_disconnects(cls, svc)

        @svc.on("ask")
        def ask(req):
            cls.asked.put(req)
            req.reply(req.nsp)

        return svc

    def setUp(self):
        for q in (self.connected, self.asked):  # what earlier tests left
            while not q.empty():
                q.get_nowait()

    def ws(self, query="nsp=/gone"):
        import websocket  # python3-websocket
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.http_port}/ws?{query}", timeout=WAIT)
        self.addCleanup(ws.close)
        return ws

    def test_a_client_that_leaves_during_its_connect_hook_is_disconnected(self):
        ws = self.ws("nsp=/gone&auth=" + urllib.parse.quote(json.dumps({"sleep": 1.0, "user": "ann"})))
        time.sleep(0.2)
        ws.close()
        sid = self.connected.get(timeout=WAIT)
        self.assertTrue(eventually(lambda: sid in self.left, WAIT), "the service never heard the socket left")
        self.assertEqual(self.left_users[sid], "ann", "the DISCONNECT names another user than the hook did")

    def test_a_ws_upgrade_beast_refuses_never_reaches_the_connect_hook(self):
        for headers, status in (("", 400),  # no Sec-WebSocket-Key
                                ("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 12\r\n", 426)):
            with socket.create_connection(("127.0.0.1", self.http_port), timeout=WAIT) as s:
                s.sendall(("GET /ws?nsp=/gone HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                           f"Upgrade: websocket\r\n{headers}\r\n").encode())
                self.assertTrue(s.recv(4096).startswith(f"HTTP/1.1 {status} ".encode()), headers)
        time.sleep(0.3)
        self.assertTrue(self.connected.empty(), "the service heard of a client that never connected")

    def test_an_emit_with_ack_to_a_gone_client_is_answered_at_once(self):
        ws = self.ws()
        self.assertEqual(json.loads(ws.recv())["event"], "connect")
        ws.send(json.dumps({"event": "ask", "id": 1}))
        self.assertEqual(json.loads(ws.recv()), {"id": 1, "data": "/gone"}, "a frame without nsp is for /gone")
        req = self.asked.get(timeout=WAIT)
        ws.close()
        self.assertTrue(eventually(lambda: req.sid in self.left, WAIT))
        started = time.monotonic()
        result = req.emit_with_ack("late", 1, timeout=20).result(timeout=WAIT)
        self.assertEqual((result.code.name, result.message), ("UNAVAILABLE", "the client is gone"))
        self.assertLess(time.monotonic() - started, 10, "answered at the worker's timeout")

    def test_an_emit_with_ack_the_gateway_will_not_deliver_is_answered_at_once(self):
        warnings.simplefilter("ignore", ResourceWarning)
        sio = socketio.Client(reconnection=False)
        sio.connect(f"http://127.0.0.1:{self.http_port}", namespaces=["/gone"], transports=["websocket"],
                    wait_timeout=WAIT)
        self.addCleanup(sio.disconnect)
        self.assertEqual(sio.call("ask", namespace="/gone", timeout=WAIT), "/gone")
        req = self.asked.get(timeout=WAIT)
        result = req.emit_with_ack("connect", 1, timeout=20).result(timeout=WAIT)
        self.assertEqual((result.code.name, result.message), ("BAD_REQUEST", "reserved event name"))

    def polling_socket(self):
        """(Engine.IO sid, Socket.IO sid, ask) of a polling session joined to /gone."""
        def ask(method, query, body=None):
            c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=WAIT)
            c.request(method, f"/socket.io/?EIO=4&transport=polling{query}", body=body)
            res = c.getresponse()
            answer = (res.status, res.read().decode())
            c.close()
            return answer

        status, opened = ask("GET", "")
        eio_sid = json.loads(opened[1:])["sid"]
        self.assertEqual(ask("POST", f"&sid={eio_sid}", "40/gone,"), (200, "ok"))
        status, connected = ask("GET", f"&sid={eio_sid}")
        self.assertTrue(connected.startswith("40/gone,"), connected)
        return eio_sid, json.loads(connected[len("40/gone,"):])["sid"], ask

    def test_a_polling_session_whose_get_was_abandoned_ends_at_once(self):
        # Its packets would otherwise go into a closed socket, and the
        # session would linger until its ping timeout (45 s here).
        eio_sid, sid, ask = self.polling_socket()
        gone = socket.create_connection(("127.0.0.1", self.http_port), timeout=WAIT)
        gone.sendall(f"GET /socket.io/?EIO=4&transport=polling&sid={eio_sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(0.2)
        gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        gone.close()
        self.assertTrue(eventually(lambda: sid in self.left, WAIT), "the session outlived its abandoned poll")
        self.assertEqual(ask("GET", f"&sid={eio_sid}")[0], 400)

    def test_a_peer_gateways_abandoned_poll_ends_the_session_here(self):
        # Another gateway relayed a GET for this session, and its client left.
        eio_sid, sid, ask = self.polling_socket()
        context = zmq.Context()
        peer = Peer(context, self.broker.router, "gwG", role=pb.ROLE_GATEWAY)
        try:
            self.assertTrue(peer.hello())
            env = pb.Envelope()
            env.forward.id = "gwG:1"
            env.forward.sid = eio_sid
            env.forward.method = "GONE"
            peer.send(env)
            answer = peer.next("answer")
            self.assertEqual((answer.answer.id, answer.answer.status), ("gwG:1", 200))
            self.assertTrue(eventually(lambda: sid in self.left, WAIT), "the session outlived its abandoned poll")
            env.forward.id, env.forward.method = "gwG:2", "DELETE"
            peer.send(env)
            self.assertEqual(peer.next("answer").answer.status, 400)
        finally:
            peer.close()
            context.term()

    def test_a_control_for_another_namespace_is_refused(self):
        reports = queue.Queue()
        self.worker.on_report(reports.put)
        self.addCleanup(self.worker.on_report, lambda r: None)
        ws = self.ws()
        self.assertEqual(json.loads(ws.recv())["event"], "connect")
        sid = self.connected.get(timeout=WAIT)
        self.worker.disconnect(sid, nsp="/")  # the socket is in /gone
        r = reports.get(timeout=WAIT)
        self.assertEqual((r.status, r.sid, r.detail), ("REJECTED", sid, "not the namespace of the socket"))
        ws.send(json.dumps({"event": "ask", "id": 2}))
        self.assertEqual(json.loads(ws.recv()), {"id": 2, "data": "/gone"}, "disconnected by the wrong namespace")
        ws.send(json.dumps({"event": "ask", "id": 3, "nsp": "/"}))
        self.assertIn("error", json.loads(ws.recv()), "a frame naming another namespace is still refused")


class HookLog:
    """What a test service's hooks saw, in order, from the worker's threads.
    Each class using it gets a log of its own."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.log, cls.lock = [], threading.Lock()

    @classmethod
    def record(cls, *entry):
        with cls.lock:
            cls.log.append(entry)

    def events(self):
        with self.lock:
            return list(self.log)


class SlowConnectHookTest(HookLog, InProcessWorkerTest):
    """A connect hook that answers after the connect's deadline: the client
    was refused (TIMEOUT), so a hook that accepts late holds a socket that
    is not there. The broker sends the socket's DISCONNECT to the worker
    whose hook accepted, after the accept (protocol.md, Late accepts), and
    nothing after a late refusal. Two workers of capacity 1: two hooks at
    once run on both."""

    gateway_id = "gwS"
    gateway_args = ("--request-timeout", "400")
    worker_count = 2

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("slow", capacity=1)

        @svc.on_connect
        def hello(req):
            time.sleep(float(req.auth.get("sleep", 0)))
            cls.record("answered", req.sid, req.worker_id)
            if req.auth.get("refuse"):
                req.refuse("no")

        @svc.on_disconnect
        def left(req):
            cls.record("left", req.sid, req.worker_id, req.reason)

        return svc

    def connect(self, auth, clients=1):
        """Opens `clients` sockets at once; their sids, in the order their
        hooks answered, once every client was told its connect failed."""
        import websocket  # python3-websocket
        sockets = []
        for _ in range(clients):
            ws = websocket.create_connection(
                f"ws://127.0.0.1:{self.http_port}/ws?nsp=/slow&auth=" + urllib.parse.quote(json.dumps(auth)),
                timeout=WAIT)
            self.addCleanup(ws.close)
            sockets.append(ws)
        for ws in sockets:
            frame = json.loads(ws.recv())
            self.assertEqual((frame["event"], frame["data"]),
                             ("connect_error", {"message": "service unavailable: TIMEOUT"}))
        self.assertTrue(eventually(lambda: len(self.answered()) == clients, WAIT), "the hooks never answered")
        return [e[1] for e in self.answered()]

    def answered(self):
        return [e for e in self.events() if e[0] == "answered"]

    def requests(self):
        return sum(w.stats().requests for w in self.workers)

    def setUp(self):
        with self.lock:
            self.log.clear()

    def test_a_hook_that_accepts_late_hears_the_disconnect_after_it_on_its_worker(self):
        sids = self.connect({"sleep": 1.2}, clients=2)
        self.assertTrue(eventually(lambda: len(self.events()) == 4, WAIT), f"no DISCONNECT: {self.events()}")
        events = self.events()
        workers = set()
        for sid in sids:
            answered = next(i for i, e in enumerate(events) if e[:2] == ("answered", sid))
            worker = events[answered][2]
            workers.add(worker)
            self.assertIn(("left", sid, worker, "the connect was not answered in time"), events[answered + 1:],
                          f"{sid} did not leave on {worker}, after its hook: {events}")
        self.assertEqual(len(workers), 2, f"both hooks ran on one worker: {events}")

    def test_a_hook_that_refuses_late_hears_nothing(self):
        before = self.requests()
        sid, = self.connect({"sleep": 1.2, "refuse": True})
        time.sleep(0.5)
        self.assertEqual([e[:2] for e in self.events()], [("answered", sid)])
        self.assertEqual(self.requests(), before + 1, "a DISCONNECT came after a refusal")


class BrokerLostConnectTest(HookLog, InProcessWorkerTest):
    """The broker dies while a connect hook runs, and a new one takes its
    place: the client is told at once (BROKER_LOST, not at the connect's
    deadline), and since the hook may have accepted, the service hears the
    socket's DISCONNECT through the new broker (protocol.md, Broker
    restarts). The hook's late accept reaches the new broker, which does not
    know the CONNECT and drops it."""

    gateway_id = "gwL"
    gateway_args = ("--request-timeout", "20000")

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("held", capacity=2)

        @svc.on_connect
        def hello(req):
            cls.record("hook", req.sid)
            time.sleep(3)

        @svc.on_disconnect
        def left(req):
            cls.record("left", req.sid, req.reason)

        return svc

    def test_a_connect_the_dead_broker_held_is_refused_at_once_and_its_disconnect_reaches_the_service(self):
        import websocket  # python3-websocket
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.http_port}/ws?nsp=/held", timeout=15)
        self.addCleanup(ws.close)
        self.assertTrue(eventually(lambda: len(self.events()) == 1, WAIT), "the connect hook never ran")
        sid = self.events()[0][1]
        old = self.broker.process
        self.broker.kill()
        old.cleanup()
        self.broker.start()
        frame = json.loads(ws.recv())  # within the 15 s; TIMEOUT would come after 21
        self.assertEqual((frame["event"], frame["data"]),
                         ("connect_error", {"message": "service unavailable: BROKER_LOST"}))
        self.assertTrue(eventually(lambda: any(e[0] == "left" for e in self.events()), WAIT),
                        f"no DISCONNECT: {self.events()}")
        self.assertIn(("left", sid, "the broker restarted while the connect hook ran"), self.events())
        gateway_metrics = http_get(self.http_port, "/metrics")[1]
        self.assertEqual(metric(gateway_metrics, "sidecast_gateway_broker_lost_total"), 1)
        self.assertEqual(metric(gateway_metrics, "sidecast_gateway_broker_restarts_total"), 1)


class ProxyProtocolTest(InProcessWorkerTest):
    """A gateway behind a balancer (--proxy-protocol-from): the balancer's
    connections may start with a PROXY protocol header (v1 or v2), and the
    per-address limits count the client it names, not the balancer; a
    malformed header closes the connection; a header from anyone else is
    no header at all (its request is a bad one)."""

    gateway_id = "gwX"
    gateway_args = ("--proxy-protocol-from", "127.0.0.1", "--max-connections-per-ip", "2")

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        return Service("proxied", capacity=2)

    def open(self, header=b"", source="127.0.0.1"):
        """A kept-alive connection that sent `header` and asked /healthz:
        its answer's status line, or b"" when the gateway closed it."""
        s = socket.create_connection(("127.0.0.1", self.http_port), timeout=WAIT, source_address=(source, 0))
        self.addCleanup(s.close)
        try:
            s.sendall(header + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            return s.recv(4096).split(b"\r\n")[0]
        except (ConnectionResetError, BrokenPipeError):  # closed with the request unread
            return b""

    def dropped(self, reason):
        return metric(http_get(self.http_port, "/metrics")[1], "sidecast_gateway_dropped_total", reason=reason) or 0

    @staticmethod
    def v2(client):
        addresses = socket.inet_aton(client) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 4000, 80)
        return b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + struct.pack("!H", len(addresses)) + addresses

    def test_the_client_a_balancer_names_is_the_address_counted(self):
        refused = self.dropped("connection_limit")
        v1 = b"PROXY TCP4 10.1.1.1 127.0.0.1 4000 80\r\n"
        self.assertEqual([self.open(v1), self.open(self.v2("10.1.1.1"))], [b"HTTP/1.1 200 OK"] * 2)
        self.assertEqual(self.open(v1), b"", "a third connection of 10.1.1.1 (--max-connections-per-ip 2)")
        self.assertEqual(self.dropped("connection_limit"), refused + 1)
        # Another client through the same balancer, and the balancer's own
        # request (no header: a health check), are counted apart.
        self.assertEqual(self.open(self.v2("10.1.1.2")), b"HTTP/1.1 200 OK")
        self.assertEqual(self.open(b"PROXY TCP4 10.1.1.2 127.0.0.1 4001 80\r\n"), b"HTTP/1.1 200 OK")
        self.assertEqual(self.open(), b"HTTP/1.1 200 OK")

    def test_a_connection_yet_to_send_its_header_is_the_balancers(self):
        refused = self.dropped("connection_limit")
        silent = [socket.create_connection(("127.0.0.1", self.http_port), timeout=WAIT) for _ in range(2)]
        for s in silent:
            self.addCleanup(s.close)
        self.assertEqual(self.open(self.v2("10.1.1.9")), b"", "the balancer's 2 places are taken")
        silent[0].sendall(self.v2("10.1.1.9") + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(silent[0].recv(4096).split(b"\r\n")[0], b"HTTP/1.1 200 OK")
        # Its header named a client: the balancer's place is free again (and
        # /metrics, asked from the balancer's address, can be read).
        self.assertEqual(self.dropped("connection_limit"), refused + 1)
        self.assertEqual(self.open(self.v2("10.1.1.9")), b"HTTP/1.1 200 OK")

    def test_a_malformed_header_closes_the_connection(self):
        bad = self.dropped("bad_proxy_header")
        for header in (b"PROXY TCP4 10.1.1.300 127.0.0.1 4000 80\r\n", b"PROXY TCP5 x\r\n",
                       b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x00"):
            self.assertEqual(self.open(header), b"", header)
        self.assertEqual(self.dropped("bad_proxy_header"), bad + 3)

    def test_a_header_from_anyone_else_names_no_one(self):
        status = self.open(b"PROXY TCP4 10.1.1.3 127.0.0.1 4000 80\r\n", source="127.0.0.2")
        self.assertEqual(status, b"HTTP/1.1 400 Bad Request")


class BridgeQueueTest(InProcessWorkerTest):
    """With --bridge-queue 3 and two I/O threads, sockets that all close at
    once overflow the bridge's queue; their detach and DISCONNECT notice
    are owed and never refused: every accepted socket's service hears it
    left, and the rooms they joined are given up."""

    gateway_id = "gwQ"
    gateway_threads = 2
    gateway_args = ("--bridge-queue", "3")

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("bq", capacity=64)
        cls.accepted = set()

        @svc.on_connect
        def hello(req):
            req.join("lobby")
            cls.accepted.add(req.sid)

        record_disconnects(cls, svc)

        return svc

    def test_sockets_closing_at_once_are_all_disconnected(self):
        import websocket  # python3-websocket
        sockets = []
        for _ in range(150):
            try:
                sockets.append(websocket.create_connection(f"ws://127.0.0.1:{self.http_port}/ws?nsp=/bq",
                                                           timeout=WAIT))
            except (OSError, websocket.WebSocketException):
                pass
        # Each gets its connect answer (accepted or refused busy) before the close.
        for ws in sockets:
            try:
                ws.recv()
            except (OSError, websocket.WebSocketException):
                pass
        self.assertTrue(eventually(lambda: len(self.accepted) > 0, WAIT))
        for ws in sockets:
            ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            ws.sock.close()
        rooms = lambda: metric(http_get(self.http_port, "/metrics")[1], "sidecast_gateway_rooms")
        self.assertTrue(eventually(lambda: rooms() == 0, 15), f"rooms left behind: {rooms()}")
        accepted = set(self.accepted)
        self.assertTrue(eventually(lambda: self.left >= accepted, 15),
                        f"{len(accepted - self.left)} of {len(accepted)} accepted sockets never disconnected")


class GatewayBusyTest(InProcessWorkerTest):
    """A connect the gateway cannot pass on to the broker (its bridge queue
    full) is the gateway's refusal on every face: 503 "gateway busy" to the
    API, connect_error "gateway busy" on /ws and Socket.IO, and the service
    never hears of it. A service that answers BUSY, even in the same words,
    is still the service: 429 "busy". The two are told apart by where the
    answer came from, not by its message."""

    gateway_id = "gwB"

    @classmethod
    def service(cls):
        from sidecast_worker import Code, Service
        svc = Service("full", capacity=8)
        cls.hooked = []

        @svc.on_connect
        def hello(req):
            cls.hooked.append(req.sid)
            if req.auth == {"say": "busy"}:
                req.fail(Code.BUSY, "gateway busy")

        return svc

    def open_session(self, port, auth=None):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        self.addCleanup(c.close)
        body = {"nsp": "/full"} if auth is None else {"nsp": "/full", "auth": auth}
        c.request("POST", "/api/v1/sessions", body=json.dumps(body))
        res = c.getresponse()
        return res.status, json.loads(res.read())

    def test_a_service_busy_in_the_gateways_words_is_still_the_service(self):
        self.assertEqual(self.open_session(self.http_port, {"say": "busy"}),
                         (429, {"error": "busy", "message": "gateway busy"}))
        self.assertEqual(self.open_session(self.http_port)[0], 201)

    def full_gateway(self, gateway_id):
        """The port of a new gateway with --bridge-queue 1 and one thread (the
        bridge shares it): a connect's attach takes the one place, so its
        CONNECT, queued in the same turn, finds the queue full."""
        port = free_port()
        gw = Process([os.path.join(BIN, "sidecast-gateway"), "--http", f"127.0.0.1:{port}",
                      "--broker", self.broker.router, "--events", self.broker.xpub, "--gateway-id", gateway_id,
                      "--route", "/full=full", "--threads", "1", "--bridge-queue", "1", "--log-level", "warn"],
                     f"gateway-{gateway_id}")
        self.addCleanup(gw.cleanup)
        self.addCleanup(gw.stop)
        self.assertTrue(eventually(lambda: http_get(port, "/healthz")[0] == 200, WAIT), gw.output())
        return port, gw

    def test_a_connect_the_gateway_cannot_pass_on_is_refused_as_its_own(self):
        port, _ = self.full_gateway("gwF")
        hooked = len(self.hooked)
        self.assertEqual(self.open_session(port), (503, {"error": "gateway busy"}))

        import websocket  # python3-websocket
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws?nsp=/full", timeout=WAIT)
        self.addCleanup(ws.close)
        frame = json.loads(ws.recv())
        self.assertEqual((frame["event"], frame["data"]), ("connect_error", {"message": "gateway busy"}))

        sio = socketio.Client(reconnection=False)
        refused = queue.Queue()
        sio.on("connect_error", refused.put, namespace="/full")
        with self.assertRaises(socketio.exceptions.ConnectionError):
            sio.connect(f"http://127.0.0.1:{port}", namespaces=["/full"], transports=["websocket"],
                        wait_timeout=WAIT)
        sio.disconnect()
        self.assertEqual(refused.get(timeout=WAIT), {"message": "gateway busy"})

        self.assertGreaterEqual(dropped(port, "bridge_full"), 3)
        self.assertEqual(len(self.hooked), hooked, "the service heard of a connect the gateway refused")

    def test_a_relayed_request_is_answered_while_the_bridge_queue_is_full(self):
        # The answer to a request another gateway relayed here is owed: sent
        # past --bridge-queue. With a queue of 1 and one thread, a relayed
        # long-poll waits; a relayed POST then carries a namespace connect,
        # whose attach fills the queue and whose refusal (connect_error)
        # answers the waiting poll in the same turn. Refused, that answer
        # would leave the relaying gateway's client to wait out the relay's
        # timeout for a 504.
        port, owner = self.full_gateway("gwQ")
        status, body = http_get(port, "/socket.io/?EIO=4&transport=polling")
        self.assertEqual(status, 200)
        sid = json.loads(body[1:])["sid"]
        self.assertTrue(sid.startswith("gwQ."), sid)

        context = zmq.Context()
        self.addCleanup(context.term)
        relay = Peer(context, self.broker.router, "gwZ", role=pb.ROLE_GATEWAY)
        self.addCleanup(relay.close)
        self.assertTrue(relay.hello())
        before = dropped(port, "bridge_full")

        def forward(n, method, body=b""):
            env = pb.Envelope()
            env.forward.id = f"gwZ:{n}"
            env.forward.sid = sid
            env.forward.method = method
            env.forward.body = body
            relay.send(env)

        def answer(n):
            got = relay.next("answer", where=lambda e: e.answer.id == f"gwZ:{n}")
            self.assertIsNotNone(got, f"no answer to relayed request {n}; {owner.output()}")
            return got.answer.status, got.answer.body

        forward(1, "GET")
        self.assertIsNone(relay.next("answer", timeout=0.3), "the poll did not wait")
        forward(2, "POST", b"40/full,")
        self.assertEqual(answer(2), (200, b"ok"))
        self.assertEqual(answer(1), (200, b'44/full,{"message":"gateway busy"}'))
        self.assertGreater(dropped(port, "bridge_full"), before, "the queue was not full: the test proves nothing")


class JoinRooms(InProcessWorkerTest):
    """Service "jr": ``enter`` joins the asking socket to a room and emits
    "welcome" to the room at once; and ways to read the gateway (no tests)."""

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("jr", capacity=8)

        @svc.on("enter")
        def enter(req):
            req.reply(req.join(req.args[0]) and req.emit_to_room(req.args[0], "welcome", req.args[0]))

        return svc

    def unheard(self):
        return self.gateway_metric("sidecast_gateway_room_events_unheard_total")

    def publish_welcome(self, room, data):
        body = {"room": room, "nsp": "/jr", "event": "welcome", "data": data}
        self.assertEqual(self.api("POST", "/publish", body)[0], 202)

    def welcome_comes(self, welcomes, data, timeout=WAIT):
        """Whether a welcome carrying ``data`` comes within ``timeout`` (any
        other is passed over)."""
        until = time.monotonic() + timeout
        while (left := until - time.monotonic()) > 0:
            try:
                if welcomes.get(timeout=left) == data:
                    return True
            except queue.Empty:
                break
        return False

    def unheard_after_a_publish_to_a_room_with_no_member(self):
        """How many more room events the gateway dropped for want of a member
        after a publish to room "nobody", counted once a publish to a room its
        socket is in (sent behind it, on the same path) has come."""
        sio, welcomes = queued_client(self, "/jr", "welcome")
        self.assertIs(sio.call("enter", "probe", namespace="/jr", timeout=WAIT), True)
        # The room is subscribed to when a publish to it comes (with
        # --room-subscriptions room, the enter's own emit is most often lost).
        for n in range(50):
            self.publish_welcome("probe", f"try-{n}")
            if self.welcome_comes(welcomes, f"try-{n}", 0.2):
                break
        else:
            self.fail("no publish to the socket's room reached it")
        before = self.unheard()
        self.publish_welcome("nobody", "nobody")
        self.publish_welcome("probe", "last")
        self.assertTrue(self.welcome_comes(welcomes, "last"))
        return self.unheard() - before


class JoinThenEmitTest(JoinRooms):
    """Flask-SocketIO's ``join_room(room); emit(..., to=room)`` and Socket.IO's
    ``socket.join(room); io.to(room).emit(...)``: a handler joins the asking
    socket to a room new to the gateway and emits to the room at once. The
    join travels over the broker's ROUTER, the emit over PUB/SUB, and the
    emit reaches the broker first; the gateway's default
    ``--room-subscriptions namespace`` asked for every room of the
    namespace when the socket came, so the emit finds the member whenever it
    does not overtake the join on the way (the two take different
    connections: docs/protocol.md, Topics). The same through the sockets API
    and the publish API."""

    gateway_id = "gwJ"
    gateway_args = ("--api-key", API_KEY)
    rooms = 10

    def welcomed(self, welcomes, expected):
        got = []
        try:
            while len(got) < len(expected):
                got.append(welcomes.get(timeout=WAIT))
        except queue.Empty:
            pass
        self.assertEqual(sorted(got), sorted(expected))

    def test_a_worker_that_joins_and_emits_at_once_loses_nothing(self):
        warnings.simplefilter("ignore", ResourceWarning)
        sio, welcomes = queued_client(self, "/jr", "welcome")
        names = [f"new-{i}" for i in range(self.rooms)]
        for room in names:
            self.assertIs(sio.call("enter", room, namespace="/jr", timeout=WAIT), True)
        self.welcomed(welcomes, names)

    def test_a_publish_right_after_the_sockets_apis_join_reaches_the_socket(self):
        warnings.simplefilter("ignore", ResourceWarning)
        sio, welcomes = queued_client(self, "/jr", "welcome")
        sid = sio.get_sid(namespace="/jr")
        names = [f"api-{i}" for i in range(self.rooms)]
        for room in names:
            self.assertEqual(self.api("POST", f"/sockets/{sid}/join", {"room": room})[0], 200)
            self.publish_welcome(room, room)
        self.welcomed(welcomes, names)

    def test_every_room_of_the_namespace_reaches_the_gateway(self):
        warnings.simplefilter("ignore", ResourceWarning)
        self.assertEqual(self.unheard_after_a_publish_to_a_room_with_no_member(), 1)


class PerRoomSubscriptionsTest(JoinRooms):
    """``--room-subscriptions room``: the broker sends the gateway only the
    rooms its sockets are in. (Its join-then-emit window is not tested: it
    loses most such emits, which is why it is not the default.)"""

    gateway_id = "gwJr"
    gateway_args = ("--api-key", API_KEY, "--room-subscriptions", "room")

    def test_a_room_with_no_member_does_not_reach_the_gateway(self):
        warnings.simplefilter("ignore", ResourceWarning)
        self.assertEqual(self.unheard_after_a_publish_to_a_room_with_no_member(), 0)

    def test_a_value_that_is_no_mode_is_refused(self):
        for value in ("rooms", "0", "1", ""):  # the modes' numbers are no names
            run = subprocess.run([os.path.join(BIN, "sidecast-gateway"), "--room-subscriptions", value],
                                 capture_output=True, text=True, timeout=WAIT)
            self.assertNotEqual(run.returncode, 0, value)
            self.assertIn("--room-subscriptions", run.stderr)


class EventsLostTest(InProcessWorkerTest):
    """Events lost between the broker and a gateway are counted, not silent.
    The gateway stops (SIGSTOP) while 64 KB events flood a room of its
    namespace that it has no member in, small ones to a room its client is in
    mixed in; the kernel's buffers fill, then the broker's XPUB queue for it
    (--hwm 64), and libzmq drops what comes after without a word. The broker
    numbers each room's events, and the gateway, running again, counts the
    gaps: every event to the client's room published after the first it
    heard either reaches the client or is counted lost."""

    gateway_id = "gwE"
    gateway_args = ("--hwm", "64")
    broker_args = ("--hwm", "64")
    every = 10     # one event to the client's room per this many floods

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("lossy")

        @svc.on("enter")
        def enter(req):
            req.reply(req.join(req.args[0]))

        return svc

    def test_events_lost_on_the_way_to_a_gateway_are_counted(self):
        warnings.simplefilter("ignore", ResourceWarning)
        sio, notes = queued_client(self, "/lossy", "note")
        self.assertIs(sio.call("enter", "watched", namespace="/lossy", timeout=WAIT), True)
        pub = zmq.Context.instance().socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, 0)  # the test's own queue loses nothing
        pub.connect(self.broker.xsub)
        self.addCleanup(pub.close)

        def emit(room, data):
            env = pb.Envelope()
            env.emit.nsp, env.emit.room, env.emit.event = "/lossy", room, "note"
            env.emit.args = json.dumps([data]).encode()
            pub.send_multipart([f"r/lossy\0{room}\0".encode(), env.SerializeToString()])

        def until_the_last_comes(prefix, got):
            """Sends ``prefix-n`` events to the client's room, waiting up to
            half a second for each, until the last one sent has come (every
            event before it then either came or left a gap the gateway
            counted), then reads until nothing more comes for half a second
            (python-socketio runs each handler on a thread of its own: the
            notes are not queued in the order they came). Adds what comes
            to ``got``; returns the names sent."""
            sent = []
            for n in range(100):
                sent.append(f"{prefix}-{n}")
                emit("watched", sent[-1])
                until = time.monotonic() + 0.5
                while (left := until - time.monotonic()) > 0 and sent[-1] not in got:
                    try:
                        got.append(notes.get(timeout=left))
                    except queue.Empty:
                        break
                if sent[-1] in got:
                    break
            else:
                self.fail(f"the last {prefix} event sent never came")
            try:
                while True:
                    got.append(notes.get(timeout=0.5))
            except queue.Empty:
                return sent

        # Until the gateway has heard one: counting starts there.
        until_the_last_comes("probe", [])
        lost_before = self.gateway_metric("sidecast_gateway_events_lost_total")
        published_before = self.broker.metric("sidecast_broker_events_total")
        flood = "x" * 65536
        # Twice what the two ends' TCP buffers may grow to, and 1,200 at least.
        most = sum(int(open(f"/proc/sys/net/ipv4/tcp_{m}").read().split()[2]) for m in ("rmem", "wmem"))
        floods = max(1200, 2 * most // len(flood))
        sent = []
        self.gateway.signal(signal.SIGSTOP)
        try:
            for n in range(floods):
                emit("nobody", flood)
                if n % self.every == 0:
                    sent.append(f"w-{n}")
                    emit("watched", sent[-1])
            total = floods + len(sent)
            self.assertTrue(eventually(
                lambda: self.broker.metric("sidecast_broker_events_total") - published_before >= total, WAIT),
                "the broker did not publish every event")
        finally:
            self.gateway.signal(signal.SIGCONT)
        lost = lambda: self.gateway_metric("sidecast_gateway_events_lost_total") - lost_before
        # A lost event shows as a gap before the next one heard: send more
        # until the last one sent comes (the gateway catches up meanwhile),
        # which closes the count. Those of them that do not come are lost too.
        got = []
        sent += until_the_last_comes("last", got)
        print(f"\n{len(sent)} sent to the client's room: {len(got)} arrived, {lost()} counted lost", end=" ")
        self.assertGreater(lost(), 0, "nothing was lost: the test's premise failed (larger TCP buffers?)")
        self.assertEqual(len(got) + lost(), len(sent), f"{len(got)} arrived, {lost()} counted lost")
        self.assertEqual(len(set(got)), len(got), "an event came twice")
        self.assertLessEqual(set(got), set(sent), "an event from before the count came")
        self.assertTrue(sio.connected)


class RoomWideControlTest(InProcessWorkerTest):
    """Room-wide joins, leaves and disconnects (Socket.IO's
    io.in(room).socketsJoin() and the like, Flask-SocketIO's close_room()):
    from the Python SDK over the PUB socket, and from the gateway's rooms API
    over the broker. Real python-socketio clients; each socket's rooms read
    with the sockets API."""

    gateway_id = "gwW"
    gateway_args = ("--api-key", API_KEY, "--route", "/other=rw", "--max-room-bytes", "16")

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("rw", capacity=8)

        @svc.on("enter")
        def enter(req):
            req.join(req.args[0])
            req.reply(True)

        @svc.on("move")  # everyone in args[0] joins args[1]
        def move(req):
            req.reply(req.sockets_join(req.args[1], in_room=req.args[0]))

        @svc.on("close")
        def close(req):
            req.reply(req.close_room(req.args[0]))

        @svc.on("kick")  # a last word to the room, then everyone in it goes
        def kick(req):
            req.reply(req.emit_to_room(req.args[0], "last", req.args[0]) and
                      req.disconnect_sockets(in_room=req.args[0]))

        return svc

    def client(self, room, nsp="/rw"):
        """A client of ``nsp`` in ``room``: (client, sid, the events it handled,
        the Socket.IO packets it read, in the order it read them). The
        client runs each handler on a thread of its own, so only the second
        list has the order they came in."""
        sio = socketio.Client(reconnection=False)
        events, wire = [], []
        sio.on("last", lambda room: events.append(("last", room)), namespace=nsp)
        sio.on("disconnect", lambda *a: events.append(("disconnect",)), namespace=nsp)
        receive = sio.eio._receive_packet  # on the read loop's thread, in order

        def recording(pkt):
            if pkt.packet_type == engineio.packet.MESSAGE:
                wire.append(pkt.data)
            return receive(pkt)

        sio.eio._receive_packet = recording
        sio.connect(f"http://127.0.0.1:{self.http_port}", namespaces=[nsp], transports=["websocket"],
                    wait_timeout=WAIT)
        self.addCleanup(sio.disconnect)
        self.assertIs(sio.call("enter", room, namespace=nsp, timeout=WAIT), True)
        return sio, sio.get_sid(namespace=nsp), events, wire

    def rooms(self, sid):
        status, body = self.api("GET", f"/sockets/{sid}")
        return body["rooms"] if status == 200 else status

    def rooms_become(self, expected):
        """Every sid's rooms, as the sockets API reads them, become ``expected``."""
        ok = eventually(lambda: all(self.rooms(sid) == rooms for sid, rooms in expected.items()))
        self.assertTrue(ok, {sid: self.rooms(sid) for sid in expected})

    def test_a_worker_and_the_rooms_api_move_whole_rooms(self):
        warnings.simplefilter("ignore", ResourceWarning)
        a, sid_a, _, _ = self.client("r")
        _, sid_b, _, _ = self.client("r")
        _, sid_c, _, _ = self.client("other")
        # The same room name in another namespace is another room.
        _, sid_d, _, _ = self.client("all", nsp="/other")
        before = metric(http_get(self.http_port, "/metrics")[1], "sidecast_gateway_room_controls_total") or 0
        # From a handler: everyone in r joins s; c is not in r.
        self.assertIs(a.call("move", ("r", "s"), namespace="/rw", timeout=WAIT), True)
        self.rooms_become({sid_a: ["r", "s"], sid_b: ["r", "s"], sid_c: ["other"]})
        # From the worker, outside any request: close r.
        self.assertFalse(self.worker.close_room("r", nsp=""), "a room-wide control with no namespace was sent")
        self.assertTrue(self.worker.close_room("r", nsp="/rw"))
        self.rooms_become({sid_a: ["s"], sid_b: ["s"], sid_c: ["other"]})
        # From the rooms API: everyone in s joins t, every socket of /rw joins
        # all, then t is closed.
        self.assertEqual(self.api("POST", "/rooms/join", {"nsp": "/rw", "room": "s", "join": "t"}), (202, {"ok": True}))
        self.assertEqual(self.api("POST", "/rooms/join", {"nsp": "/rw", "broadcast": True, "join": "all"}),
                         (202, {"ok": True}))
        self.rooms_become({sid_a: ["s", "t", "all"], sid_b: ["s", "t", "all"], sid_c: ["other", "all"]})
        # Rooms t and all are new to the gateway: no subscription of their
        # own to wait for (--room-subscriptions namespace), so leaves sent at
        # once reach every member.
        for body in ({"nsp": "/rw", "room": "t"}, {"nsp": "/rw", "room": "all", "leave": "other"}):
            self.assertEqual(self.api("POST", "/rooms/leave", body), (202, {"ok": True}))
        self.rooms_become({sid_a: ["s", "all"], sid_b: ["s", "all"], sid_c: ["all"], sid_d: ["all"]})
        # Close /other's room "all": /rw's stays.
        self.assertEqual(self.api("POST", "/rooms/leave", {"nsp": "/other", "room": "all"}), (202, {"ok": True}))
        self.rooms_become({sid_d: []})
        self.rooms_become({sid_a: ["s", "all"], sid_b: ["s", "all"], sid_c: ["all"]})
        after = metric(http_get(self.http_port, "/metrics")[1], "sidecast_gateway_room_controls_total")
        self.assertEqual(after - before, 7)

    def test_a_room_hears_its_last_word_before_it_is_disconnected(self):
        warnings.simplefilter("ignore", ResourceWarning)
        _, sid_a, events_a, wire_a = self.client("doomed")
        _, sid_b, events_b, wire_b = self.client("doomed")
        c, sid_c, events_c, _ = self.client("spared")
        # Asked by c, which is not in the room: the ack of one in it would race
        # its disconnect (the ack is routed, the disconnect published).
        self.assertIs(c.call("kick", "doomed", namespace="/rw", timeout=WAIT), True)
        for events, wire in ((events_a, wire_a), (events_b, wire_b)):
            # (Each handler runs on a thread of its own: either may be last.)
            self.assertTrue(eventually(lambda: ("disconnect",) in events and ("last", "doomed") in events), events)
            self.assertEqual(wire[-2:], ['2/rw,["last","doomed"]', "1/rw,"], "the emit before it came after it")
        self.assertEqual(self.api("GET", f"/sockets/{sid_a}")[0], 404)
        self.assertEqual(self.api("GET", f"/sockets/{sid_b}")[0], 404)
        self.assertEqual(self.rooms(sid_c), ["spared"])
        self.assertEqual(events_c, [])
        # The rooms API disconnects every socket of the namespace.
        self.assertEqual(self.api("POST", "/rooms/disconnect", {"nsp": "/rw", "broadcast": True}), (202, {"ok": True}))
        self.assertTrue(eventually(lambda: events_c == [("disconnect",)]), events_c)
        self.assertTrue(eventually(lambda: self.api("GET", f"/sockets/{sid_c}")[0] == 404))

    def test_the_rooms_api_refuses_what_it_cannot_do(self):
        for body, why in ((b"[1]", "body must be a JSON object"),
                          ({"join": "x"}, "give exactly one of room, broadcast"),
                          ({"room": "r", "broadcast": True, "join": "x"}, "give exactly one of room, broadcast"),
                          ({"sid": "gwW.x", "join": "x"}, "unknown key: sid"),
                          ({"room": 7, "join": "x"}, "room is a non-empty string, broadcast is true"),
                          ({"broadcast": False, "join": "x"}, "room is a non-empty string, broadcast is true"),
                          ({"room": "r", "nsp": "rw", "join": "x"}, "bad nsp"),
                          ({"room": "r"}, "join must be a non-empty string"),
                          ({"room": "r", "join": ""}, "join must be a non-empty string"),
                          ({"room": "r", "leave": "x"}, "unknown key: leave")):
            self.assertEqual(self.api("POST", "/rooms/join", body), (400, {"error": why}), body)
        self.assertEqual(self.api("POST", "/rooms/leave", {"broadcast": True}),
                         (400, {"error": "leave must be a non-empty string"}))
        self.assertEqual(self.api("POST", "/rooms/leave", {"room": ""}),
                         (400, {"error": "room is a non-empty string, broadcast is true"}))
        # --max-room-bytes 16: every gateway would refuse each member's join.
        self.assertEqual(self.api("POST", "/rooms/join", {"room": "r", "join": "x" * 17}),
                         (400, {"error": "the room's name is longer than --max-room-bytes"}))
        self.assertEqual(self.api("POST", "/rooms/join", {"room": "r", "join": "x" * 16}), (202, {"ok": True}))
        self.assertEqual(self.api("POST", "/rooms/disconnect", {"room": "r", "join": "x"}),
                         (400, {"error": "unknown key: join"}))
        self.assertEqual(self.api("POST", "/rooms/move", {"room": "r"}), (404, {"error": "no such action"}))
        self.assertEqual(self.api("GET", "/rooms/join")[0], 405)
        self.assertEqual(self.api("POST", "/rooms/join", {"room": "r", "join": "x"}, key=None)[0], 401)
        self.assertEqual(self.api("POST", "/rooms/join", {"room": "r", "join": "x"}, key="wrong")[0], 401)
        c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=WAIT)
        self.addCleanup(c.close)
        c.request("POST", "/api/v1/rooms/join", body=b"{}")
        res = c.getresponse()
        res.read()
        self.assertEqual((res.status, res.getheader("WWW-Authenticate")), (401, 'Bearer realm="sidecast"'))


class RestartedGatewayTest(InProcessWorkerTest):
    """A gateway restarted under its pinned id does not number its requests
    as the last start did: a job of that start's, still running at the
    worker, neither swallows the new start's request of its number as a
    duplicate nor gives it its answer. (Before, both starts counted from 1:
    the new gwR:2 was dropped at the broker, and the old gwR:2's answer came
    to it when the worker finished.)"""

    gateway_id = "gwR"

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("restart", capacity=8)
        cls.waiting = threading.Event()

        @svc.on("wait")
        def wait(req):
            cls.waiting.set()
            req.sleep(3.0)
            req.reply(*req.args)

        @svc.on("echo")
        def echo(req):
            req.reply(*req.args)

        return svc

    def emit(self, sid, event, data, timeout=WAIT):
        c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            c.request("POST", f"/api/v1/sessions/{sid}/emit",
                      body=json.dumps({"event": event, "data": data, "ack": True}))
            res = c.getresponse()
            return res.status, json.loads(res.read())
        finally:
            c.close()

    def session(self):
        self.assertTrue(eventually(lambda: http_get(self.http_port, "/healthz")[0] == 200, WAIT))
        status, created = self.api("POST", "/sessions", {"nsp": "/restart"}, key=None)
        self.assertEqual(status, 201, created)
        return created["session"]

    def test_a_restarted_gateway_gets_its_own_answers(self):
        old = self.session()
        def abandoned():
            try:
                self.emit(old, "wait", "the last start's", timeout=WAIT * 2)
            except OSError:
                pass  # its gateway was killed under it
        t = threading.Thread(target=abandoned, daemon=True)
        t.start()
        self.assertTrue(self.waiting.wait(WAIT))
        # The same gateway again (same id, same port), as a supervisor would.
        first = self.gateway
        first.kill()
        self.addCleanup(first.cleanup)
        type(self).gateway = Process(first.argv, "gateway-again")
        self.assertEqual(self.emit(self.session(), "echo", "this start's"), (200, {"data": "this start's"}))
        t.join(WAIT * 2)


class CorsWildcardTest(InProcessWorkerTest):
    """--cors-origin '*' lets any page read the answers, but names no origin
    and allows no credentials (a cookie-authenticated proxy in front would
    otherwise answer any site in its visitors' names); an origin listed by
    name still gets both."""

    gateway_id = "gwC"
    gateway_args = ("--cors-origin", "*", "--cors-origin", "http://app.example")

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        return Service("cw", capacity=1)

    def headers_for(self, origin, method="GET"):
        c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=WAIT)
        self.addCleanup(c.close)
        c.request(method, "/socket.io/?EIO=4&transport=polling", headers={"Origin": origin})
        res = c.getresponse()
        res.read()
        return res.status, dict(res.getheaders())

    def test_any_origin_gets_a_wildcard_without_credentials(self):
        for method in ("GET", "OPTIONS"):
            status, headers = self.headers_for("https://evil.example", method)
            self.assertIn(status, (200, 204), method)
            self.assertEqual(headers.get("Access-Control-Allow-Origin"), "*", method)
            self.assertNotIn("Access-Control-Allow-Credentials", headers, method)

    def test_an_origin_listed_by_name_gets_it_with_credentials(self):
        status, headers = self.headers_for("http://app.example")
        self.assertEqual(status, 200)
        self.assertEqual(headers.get("Access-Control-Allow-Origin"), "http://app.example")
        self.assertEqual(headers.get("Access-Control-Allow-Credentials"), "true")


class ApiPollingTest(InProcessWorkerTest):
    """HTTP API long-polls: --api-session-ttl counts from the end of the last
    poll (a client that keeps polling, each poll longer than the TTL, keeps
    its session), and a poll whose client gave up takes no events with it.
    A page of another origin may use the API only if --cors-origin lists it."""

    gateway_id = "gwL"
    gateway_args = ("--api-session-ttl", "1000", "--cors-origin", "http://app.example", "--api-key", "k")

    def ask(self, method, path, headers, body=None):
        c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=WAIT)
        self.addCleanup(c.close)
        c.request(method, f"/api/v1/sessions{path}", body=body, headers=headers)
        res = c.getresponse()
        return res.status, dict(res.getheaders()), res.read()

    def test_an_origin_not_listed_is_refused_and_a_listed_one_gets_cors_headers(self):
        status, _, body = self.ask("POST", "", {"Origin": "http://evil.example"}, '{"nsp":"/ttl"}')
        self.assertEqual((status, json.loads(body)), (403, {"error": "origin not allowed"}))
        status, headers, body = self.ask("POST", "", {"Origin": "http://app.example"}, '{"nsp":"/ttl"}')
        self.assertEqual(status, 201, body)
        self.assertEqual(headers.get("Access-Control-Allow-Origin"), "http://app.example")
        sid = json.loads(body)["session"]
        status, headers, _ = self.ask("OPTIONS", f"/{sid}", {
            "Origin": "http://app.example", "Access-Control-Request-Method": "DELETE"})
        self.assertEqual(status, 204)
        self.assertIn("DELETE", headers.get("Access-Control-Allow-Methods", ""))
        self.assertEqual(self.ask("DELETE", f"/{sid}", {"Origin": "http://app.example"})[0], 204)
        # No Origin: not a browser page; the gateway's own origin: same-origin.
        self.assertEqual(self.ask("POST", "", {}, '{"nsp":"/ttl"}')[0], 201)
        self.assertEqual(self.ask("POST", "", {"Origin": f"http://127.0.0.1:{self.http_port}",
                                               "Host": f"127.0.0.1:{self.http_port}"}, '{"nsp":"/ttl"}')[0], 201)

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("ttl", capacity=4)
        cls.texts = []  # the JSON text of each raw request's auth and args, as the worker got it

        @svc.on_connect
        def hello(req):
            if "raw" in req.auth:
                cls.texts.append(req.auth_json)

        @svc.on("raw")
        def raw(req):
            cls.texts.append(req.args_json)
            req.reply(True)

        return svc

    def test_json_the_client_wrote_reaches_the_worker_as_written(self):
        # Boost.JSON would write 1.10 as 1.1E0, round an integer past 64 bits,
        # and write 0e3081 (zero) as NaN, which is not JSON at all.
        value = '{"n": 12345678901234567890123, "f": 1.10, "z": 0e3081}'
        status, _, body = self.ask("POST", "", {}, '{"nsp": "/ttl", "auth": {"raw": 1.0E1}}')
        self.assertEqual(status, 201, body)
        sid, key = (json.loads(body)[k] for k in ("sid", "session"))
        status, _, body = self.ask("POST", f"/{key}/emit", {}, '{"event": "raw", "ack": true, "data": ' + value + "}")
        self.assertEqual((status, json.loads(body)), (200, {"data": True}))
        self.assertEqual(self.texts, ['{"raw": 1.0E1}', "[" + value + "]"])
        # The publish API's data and args reach a client as written too.
        for field, text in (("data", value), ("args", "[" + value + ", 2.50]")):
            c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=WAIT)
            self.addCleanup(c.close)
            c.request("POST", "/api/v1/publish", body=f'{{"sid": "{sid}", "event": "e", "{field}": {text}}}',
                      headers={"Authorization": "Bearer k"})
            res = c.getresponse()
            self.assertEqual(res.status, 202, res.read())
            status, _, body = self.ask("GET", f"/{key}/events?timeout=2000", {})
            self.assertIn(value.encode(), body, field)
        self.assertIn(b"2.50", body)
        self.ask("DELETE", f"/{key}", {})

    def open_session(self, with_sid=False):
        """The sessions' URL and the new session's key (and its socket's sid)."""
        import urllib.request
        url = f"http://127.0.0.1:{self.http_port}/api/v1/sessions"
        req = urllib.request.Request(url, data=json.dumps({"nsp": "/ttl"}).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=WAIT) as res:
            opened = json.loads(res.read())
        return (url, opened["session"], opened["sid"]) if with_sid else (url, opened["session"])

    def test_a_session_polled_past_its_ttl_is_kept(self):
        import urllib.request
        url, sid = self.open_session()
        for _ in range(2):
            with urllib.request.urlopen(f"{url}/{sid}/events?timeout=2000", timeout=WAIT) as res:
                self.assertEqual(json.loads(res.read()), {"events": []})
            time.sleep(0.6)  # an expiry check (every TTL/2) falls between the polls

    def test_a_session_not_polled_for_its_ttl_is_closed_then(self):
        # A ttl (1 s) after its last poll, not up to 1.5 ttl (it was checked
        # every ttl/2 from its start: alive at 1.3 s).
        import urllib.error
        import urllib.request
        url, sid = self.open_session()
        with urllib.request.urlopen(f"{url}/{sid}/events?timeout=0", timeout=WAIT) as res:
            self.assertEqual(json.loads(res.read()), {"events": []})
        time.sleep(1.3)
        with self.assertRaises(urllib.error.HTTPError) as gone:
            urllib.request.urlopen(f"{url}/{sid}/events?timeout=0", timeout=WAIT)
        self.assertIn(gone.exception.code, (404, 410))  # forgotten, or closed with events kept

    def test_a_client_that_pipelines_and_half_closes_is_answered(self):
        # Its poll and the request after it, sent at once, then FIN: it
        # has not left, it waits for both answers.
        url, sid = self.open_session()
        c = socket.create_connection(("127.0.0.1", self.http_port), timeout=WAIT)
        c.sendall(f"GET /api/v1/sessions/{sid}/events?timeout=500 HTTP/1.1\r\nHost: x\r\n\r\n"
                  "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        c.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := c.recv(65536):
            got += chunk
        c.close()
        self.assertEqual(got.count(b"HTTP/1.1 200"), 2, got)
        self.assertIn(b'{"events":[]}', got)

    def test_a_poll_whose_client_left_takes_no_events(self):
        # Its path percent-encoded too: it is served as a poll (the path is
        # routed decoded), so it must be watched as one.
        import urllib.request
        for action in ("events", "event%73"):
            with self.subTest(path=action):
                url, key, sid = self.open_session(with_sid=True)
                gone = socket.create_connection(("127.0.0.1", self.http_port), timeout=WAIT)
                gone.sendall(f"GET /api/v1/sessions/{key}/{action}?timeout=900 HTTP/1.1\r\nHost: x\r\n\r\n"
                             .encode())
                time.sleep(0.2)
                # Gives up while the poll waits, with a reset (SO_LINGER 0), as a crashed client's kernel does.
                gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                gone.close()
                time.sleep(0.2)
                self.worker.emit_to_sid(sid, "late", 1, nsp="/ttl")
                time.sleep(0.3)
                with urllib.request.urlopen(f"{url}/{key}/events?timeout=3000", timeout=WAIT) as res:
                    events = json.loads(res.read())["events"]
                self.assertEqual([(e["event"], e["data"]) for e in events], [("late", 1)],
                                 "the abandoned poll took it")


class WsKeepAliveTest(InProcessWorkerTest):
    """A /ws connection is pinged every --ping-interval; one whose client
    sends nothing within --ping-timeout after (no pong: a NAT forgot it, a
    network went away without a FIN) is closed, counted in
    sidecast_gateway_ping_timeouts_total, and its service hears it leave.
    Before, nothing was ever sent to an idle /ws client: a dead one kept
    its socket, its rooms and its place under the connection limits until
    a write failed (minutes), and a balancer's tunnel timeout cut live ones.
    Also: an event whose handler gives no answer gets a reply without data,
    since /ws has no ack timeout of its own."""

    gateway_id = "gwK"
    gateway_args = ("--ping-interval", "300", "--ping-timeout", "300")

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("alive", capacity=4)
        cls.left = queue.Queue()

        @svc.on_disconnect
        def left(req):
            cls.left.put(req.sid)

        @svc.on("quiet")
        def quiet(req):
            return None  # no answer

        return svc

    def connect(self):
        import websocket  # python3-websocket
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.http_port}/ws?nsp=/alive", timeout=WAIT)
        self.addCleanup(ws.close)
        hello = json.loads(ws.recv())
        self.assertEqual(hello["event"], "connect", hello)
        return ws, hello["data"]["sid"]

    def test_a_client_that_answers_no_ping_is_closed(self):
        import websocket  # python3-websocket
        live, live_sid = self.connect()
        dead, dead_sid = self.connect()
        # The live one reads (websocket-client answers each ping as it
        # reads); the dead one reads nothing for 1.5 s: ping intervals
        # of 0.3 s, timeouts of 0.3 s.
        live.settimeout(0.05)
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            try:
                live.recv()
            except websocket.WebSocketTimeoutException:
                pass
        self.assertEqual(self.left.get(timeout=WAIT), dead_sid, "the silent client was not closed")
        self.assertTrue(self.left.empty(), "the client that answered pings was closed too")
        self.assertGreaterEqual(self.gateway_metric("sidecast_gateway_ping_timeouts_total"), 1)
        live.settimeout(WAIT)
        live.send(json.dumps({"event": "quiet", "id": 5}))
        self.assertEqual(json.loads(live.recv()), {"id": 5}, "no reply for an event answered silently")


class ApiBufferBytesTest(InProcessWorkerTest):
    """What an HTTP API session that does not poll keeps is bounded in bytes
    too (--outbound-bytes, as a Socket.IO connection's queue), not only in
    events (--api-buffer): five events of 400 KB against 1.5 MB keep the
    last three, the two oldest counted api_buffer_full. (Before, 300 events
    of 0.9 MB took a gateway from 20 to 549 MB.)"""

    gateway_id = "gwU"
    gateway_args = ("--outbound-bytes", "1500000")

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        return Service("buf", capacity=1)

    def test_what_waits_for_a_poll_is_bounded_in_bytes(self):
        status, created = self.api("POST", "/sessions", {"nsp": "/buf"}, key=None)
        self.assertEqual(status, 201, created)
        sid, key = created["sid"], created["session"]
        for i in range(5):
            self.assertTrue(self.worker.emit_to_sid(sid, "big", f"{i}" + "x" * 400_000, nsp="/buf"))
        overflow = lambda: self.gateway_metric("sidecast_gateway_dropped_total", reason="api_buffer_full")
        self.assertTrue(eventually(lambda: overflow() == 2, WAIT), overflow())
        got = []
        for _ in range(3):  # --max-payload (1 MB) takes two an answer
            status, answer = self.api("GET", f"/sessions/{key}/events?timeout=0", key=None)
            self.assertEqual(status, 200)
            got += [e["data"][:1] for e in answer["events"]]  # each event's number
        self.assertEqual(got, ["2", "3", "4"])


class RelayedPollTest(InProcessWorkerTest):
    """An HTTP API session's long-poll that a peer gateway relays (the
    balancer ignored the sid) loses nothing when its client leaves there:
    the peer names the poll in its GONE, and the owner answers that poll
    empty if it still waits, or takes back what it answered if the answer
    came too late to be written. Before, the answer was dropped at the peer
    (23 of 30 events lost in a review), and a GONE answered whatever poll
    was waiting then, a newer one included."""

    gateway_id = "gwO"

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        return Service("relay", capacity=1)

    def peer_gateway(self):
        port = free_port()
        gw = Process([os.path.join(BIN, "sidecast-gateway"), "--http", f"127.0.0.1:{port}",
                      "--broker", self.broker.router, "--events", self.broker.xpub, "--gateway-id", "gwP2",
                      "--route", "/relay=relay", "--threads", "1", "--log-level", "warn"], "gateway-peer")
        self.addCleanup(gw.cleanup)
        self.addCleanup(gw.stop)
        self.assertTrue(eventually(lambda: http_get(port, "/healthz")[0] == 200, WAIT), gw.output())
        self.peer_process = gw
        return port

    def poll_there(self, port, sid):
        """A long-poll of `sid` through `port`, left open: its socket."""
        s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        s.sendall(f"GET /api/v1/sessions/{sid}/events?timeout=5000 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return s

    def events_here(self, sid, timeout_ms):
        status, answer = self.api("GET", f"/sessions/{sid}/events?timeout={timeout_ms}", key=None)
        self.assertEqual(status, 200, answer)
        return [e["data"] for e in answer["events"]]

    def test_a_relayed_poll_at_its_gateways_drain_loses_nothing(self):
        # The relaying gateway drains (a rolling restart behind a balancer
        # that ignores the sid): it answers its client's poll empty and tells
        # the owner the poll's client left. Before, it stopped with the poll
        # waiting, and the owner's next event went into it, lost.
        peer = self.peer_gateway()
        status, created = self.api("POST", "/sessions", {"nsp": "/relay"}, key=None)
        self.assertEqual(status, 201, created)
        sid, key = created["sid"], created["session"]
        s = self.poll_there(peer, key)
        self.addCleanup(s.close)
        time.sleep(0.3)  # waiting at the owner
        self.peer_process.signal(signal.SIGTERM)
        answer = s.recv(65536)
        self.assertIn(b"200 OK", answer)
        self.assertIn(b'{"events":[]}', answer)
        self.peer_process.proc.wait(WAIT)
        self.assertEqual(self.peer_process.proc.returncode, 0)
        self.assertTrue(self.worker.emit_to_sid(sid, "n", 7, nsp="/relay"))
        got = []
        deadline = time.time() + WAIT
        while 7 not in got and time.time() < deadline:
            got += self.events_here(key, 1000)
        self.assertIn(7, got, "the event went into the drained gateway's poll")

    def test_a_relayed_engine_io_get_at_its_gateways_drain_is_released(self):
        # The relaying gateway drains: it asks the owner to answer the GET
        # it relays (a noop: nothing waits), passes that on, and the session
        # goes on; the client polls again elsewhere. Before, the GET was cut
        # with the gateway, and the owner ended the session (its GET's
        # client left).
        peer = self.peer_gateway()
        base = "/socket.io/?EIO=4&transport=polling"
        status, body = http_get(self.http_port, base)
        self.assertEqual(status, 200, body)
        eio_sid = json.loads(body[1:])["sid"]
        c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=WAIT)
        self.addCleanup(c.close)
        c.request("POST", f"{base}&sid={eio_sid}", body=b"40/relay,")
        self.assertEqual(c.getresponse().read(), b"ok")
        status, body = http_get(self.http_port, f"{base}&sid={eio_sid}")
        self.assertTrue(body.startswith("40/relay,{"), body)
        sid = json.loads(body[len("40/relay,"):])["sid"]
        s = socket.create_connection(("127.0.0.1", peer), timeout=WAIT)
        self.addCleanup(s.close)
        s.sendall(f"GET {base}&sid={eio_sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(0.3)  # waiting at the owner
        self.peer_process.signal(signal.SIGTERM)
        answer = b""
        while b"\r\n\r\n6" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
        self.assertIn(b"200 OK", answer, "the relayed GET was cut")
        self.assertIn(b"\r\n\r\n6", answer)
        self.assertIn(b"Connection: close", answer)
        self.peer_process.proc.wait(WAIT)
        self.assertEqual(self.peer_process.proc.returncode, 0)
        # The session goes on: its next GET, here, gets what comes next.
        self.assertTrue(self.worker.emit_to_sid(sid, "n", 7, nsp="/relay"))
        status, body = http_get(self.http_port, f"{base}&sid={eio_sid}", timeout=WAIT)
        self.assertEqual(status, 200, body)
        self.assertIn('42/relay,["n",7]', body.split("\x1e"))

    def test_a_relayed_poll_whose_client_left_loses_nothing(self):
        peer = self.peer_gateway()
        status, created = self.api("POST", "/sessions", {"nsp": "/relay"}, key=None)
        self.assertEqual(status, 201, created)
        sid, key = created["sid"], created["session"]
        # The peer relays it (the sid is gwO's): proof it reaches the owner.
        s = self.poll_there(peer, key)
        self.assertTrue(self.worker.emit_to_sid(sid, "n", -1, nsp="/relay"))
        self.assertIn(b'"data":-1', s.recv(65536))
        s.close()
        lost = []
        for i in range(30):
            s = self.poll_there(peer, key)
            time.sleep(0.05)  # waiting at the owner
            self.assertTrue(self.worker.emit_to_sid(sid, "n", i, nsp="/relay"))
            # Gone at once, with a reset (SO_LINGER 0), as the answer is on its way.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            got = []
            deadline = time.time() + WAIT
            while i not in got and time.time() < deadline:
                got += self.events_here(key, 1000)
            if i not in got:
                lost.append(i)
        given_back = self.gateway_metric("sidecast_gateway_api_events_given_back_total")
        # What an answer written into the reset socket before the peer saw
        # the reset takes with it is lost here as it would be on the owner.
        self.assertLessEqual(len(lost), 3, f"lost {lost}; {given_back} given back")
        self.assertGreater(given_back, 0, "no answer came too late: the race was never run")

    def test_a_gone_leaves_a_newer_poll_be(self):
        peer = self.peer_gateway()
        status, created = self.api("POST", "/sessions", {"nsp": "/relay"}, key=None)
        sid = created["session"]
        s = self.poll_there(peer, sid)
        time.sleep(0.1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        started = time.monotonic()
        self.assertEqual(self.events_here(sid, 1500), [])  # its own timeout, not the GONE of the other
        self.assertGreater(time.monotonic() - started, 1.0)


class ApiClosedSessionTest(InProcessWorkerTest):
    """An HTTP API session its worker disconnects keeps what its client had
    not polled: the next poll gets it with a 410 (so does a poll waiting
    then), and only then is the sid forgotten (404); an emit to it is 410.
    Unpolled, it is forgotten after --api-session-ttl (its events counted
    undelivered); a DELETE lets go of it at once."""

    gateway_id = "gwQ"
    gateway_args = ("--api-session-ttl", "1500")

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("closing", capacity=4)

        @svc.on("leave_me")
        def leave_me(req):
            req.emit("last", {"n": 1})
            cls.worker.disconnect(req.sid, nsp="/closing")

        return svc

    def call(self, method, path, body=None):
        c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=WAIT)
        self.addCleanup(c.close)
        c.request(method, f"/api/v1/sessions{path}", body=None if body is None else json.dumps(body))
        res = c.getresponse()
        text = res.read()
        return res.status, json.loads(text) if text else None

    def closed_session(self):
        status, opened = self.call("POST", "", {"nsp": "/closing"})
        self.assertEqual(status, 201)
        sid = opened["session"]
        self.assertEqual(self.call("POST", f"/{sid}/emit", {"event": "leave_me"})[0], 202)
        self.assertTrue(eventually(lambda: self.call("POST", f"/{sid}/emit", {"event": "x"})[0] == 410, WAIT),
                        "the worker's disconnect never closed the session")
        return sid

    def test_the_next_poll_gets_what_was_not_polled_with_a_410(self):
        sid = self.closed_session()
        status, body = self.call("GET", f"/{sid}/events?timeout=0")
        self.assertEqual(status, 410)
        self.assertEqual((body["error"], body["reason"]), ("session closed", "server namespace disconnect"))
        self.assertEqual([(e["event"], e["data"]) for e in body["events"]], [("last", {"n": 1})])
        self.assertEqual(self.call("GET", f"/{sid}/events?timeout=0"), (404, {"error": "unknown session"}))

    def test_a_poll_waiting_when_the_worker_disconnects_gets_the_410(self):
        status, opened = self.call("POST", "", {"nsp": "/closing"})
        sid = opened["session"]
        self.assertEqual(self.call("GET", f"/{sid}/events?timeout=0"), (200, {"events": []}))
        answers = queue.Queue()
        threading.Thread(target=lambda: answers.put(self.call("GET", f"/{sid}/events?timeout=5000")),
                         daemon=True).start()
        time.sleep(0.3)
        self.assertEqual(self.call("POST", f"/{sid}/emit", {"event": "leave_me"})[0], 202)
        status, body = answers.get(timeout=WAIT)
        # The event came first (its own answer), or with the 410. After the
        # event, the next poll waits too: the disconnect may not be here yet.
        if status == 200:
            self.assertEqual([e["event"] for e in body["events"]], ["last"])
            status, body = self.call("GET", f"/{sid}/events?timeout=4000")
            self.assertEqual(body["events"], [])
        self.assertEqual((status, body["reason"]), (410, "server namespace disconnect"))
        self.assertEqual(self.call("GET", f"/{sid}/events?timeout=0")[0], 404)

    def test_unpolled_it_is_forgotten_after_the_ttl(self):
        lost = metric(http_get(self.http_port, "/metrics")[1], "sidecast_gateway_dropped_total",
                      reason="undelivered") or 0
        sid = self.closed_session()
        # Asked with emits, which leave what it kept in place (a poll takes it).
        self.assertTrue(eventually(lambda: self.call("POST", f"/{sid}/emit", {"event": "x"})[0] == 404, 5),
                        "the closed session was kept past its TTL")
        self.assertEqual(metric(http_get(self.http_port, "/metrics")[1], "sidecast_gateway_dropped_total",
                                reason="undelivered"), lost + 1)

    def test_a_delete_lets_go_of_it(self):
        sid = self.closed_session()
        self.assertEqual(self.call("DELETE", f"/{sid}")[0], 204)
        self.assertEqual(self.call("GET", f"/{sid}/events?timeout=0")[0], 404)


class DrainTest(InProcessWorkerTest):
    """SIGTERM drains every face, not only Engine.IO sessions: a polling
    Socket.IO socket, a /ws connection, an HTTP API session (its waiting
    poll gets 410) and a socket parked for recovery all end, and the
    service hears a DISCONNECT for each before the gateway exits 0."""

    gateway_id = "gwX"
    gateway_args = ("--recovery", "/drain", "--drain-timeout", "3000")

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("drain", capacity=8)
        cls.accepted = queue.Queue()

        @svc.on_connect
        def hello(req):
            cls.accepted.put(req.sid)

        record_disconnects(cls, svc)

        return svc

    def test_every_face_is_closed_and_disconnected(self):
        import urllib.error
        import urllib.request
        import websocket  # python3-websocket
        warnings.simplefilter("ignore", ResourceWarning)
        base = f"127.0.0.1:{self.http_port}"
        sids = []
        # A socket parked for recovery: its transport dropped without a disconnect.
        raw = websocket.create_connection(f"ws://{base}/socket.io/?EIO=4&transport=websocket", timeout=WAIT)
        self.assertTrue(raw.recv().startswith("0"))
        raw.send("40/drain,")
        self.assertTrue(raw.recv().startswith("40/drain,"))
        sids.append(self.accepted.get(timeout=WAIT))
        raw.close()
        gauge = lambda t: metric(http_get(self.http_port, "/metrics")[1], "sidecast_gateway_connections", transport=t)
        self.assertTrue(eventually(lambda: gauge("websocket") == 0, WAIT))
        # A polling Socket.IO client, a /ws connection, an API session with a poll waiting.
        sio = socketio.Client(reconnection=False)
        sio.connect(f"http://{base}", namespaces=["/drain"], transports=["polling"], wait_timeout=WAIT)
        sids.append(self.accepted.get(timeout=WAIT))
        ws = websocket.create_connection(f"ws://{base}/ws?nsp=/drain", timeout=WAIT)
        self.assertEqual(json.loads(ws.recv())["event"], "connect")
        sids.append(self.accepted.get(timeout=WAIT))
        url = f"http://{base}/api/v1/sessions"
        req = urllib.request.Request(url, data=json.dumps({"nsp": "/drain"}).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=WAIT) as res:
            api_sid = json.loads(res.read())["session"]
        sids.append(self.accepted.get(timeout=WAIT))
        polled = queue.Queue()

        def poll():
            try:
                with urllib.request.urlopen(f"{url}/{api_sid}/events?timeout=20000", timeout=WAIT) as res:
                    polled.put(res.status)
            except urllib.error.HTTPError as e:
                polled.put(e.code)
            except OSError as e:
                polled.put(repr(e))

        threading.Thread(target=poll, daemon=True).start()
        time.sleep(0.3)  # the poll waits
        self.gateway.signal(signal.SIGTERM)
        self.assertEqual(polled.get(timeout=WAIT), 410, "the waiting poll was cut without an answer")
        self.assertTrue(eventually(lambda: set(sids) <= self.left, WAIT),
                        f"no DISCONNECT for {len(set(sids) - self.left)} of the 4 sockets")
        self.gateway.proc.wait(WAIT)
        self.assertEqual(self.gateway.proc.returncode, 0)
        ws.close()
        sio.disconnect()


class DrainKeepsUnpolledEventsTest(InProcessWorkerTest):
    """A drain closes an API session that has events its client has not
    polled (none waiting at SIGTERM): the gateway stays until the client's
    next poll, on a connection it kept, takes them with the 410. (Before, it
    exited as soon as the sockets were disconnected, and the events went
    with it.) It exits then, not at --drain-timeout."""

    gateway_id = "gwV"
    gateway_args = ("--drain-timeout", "8000")

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        return Service("unpolled", capacity=4)

    def test_the_next_poll_gets_the_events_and_the_gateway_exits_then(self):
        import http.client
        import urllib.request
        url = f"http://127.0.0.1:{self.http_port}/api/v1/sessions"
        req = urllib.request.Request(url, data=json.dumps({"nsp": "/unpolled"}).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=WAIT) as res:
            opened = json.loads(res.read())
        self.worker.emit_to_sid(opened["sid"], "kept", 7, nsp="/unpolled")
        kept = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=WAIT)
        self.addCleanup(kept.close)
        kept.request("GET", "/healthz")
        self.assertEqual(kept.getresponse().read(), b"ok\n")
        time.sleep(0.3)  # the event is in the session's buffer
        self.gateway.signal(signal.SIGTERM)
        time.sleep(0.5)
        self.assertIsNone(self.gateway.proc.poll(), "the gateway left with the session's events")
        kept.request("GET", f"/api/v1/sessions/{opened['session']}/events?timeout=0")
        res = kept.getresponse()
        self.assertEqual((res.status, res.getheader("Connection")), (410, "close"))
        body = json.loads(res.read())
        self.assertEqual((body["reason"], [(e["event"], e["data"]) for e in body["events"]]),
                         ("server shutting down", [("kept", 7)]))
        answered = time.monotonic()
        self.gateway.proc.wait(WAIT)
        self.assertEqual(self.gateway.proc.returncode, 0)
        self.assertLess(time.monotonic() - answered, 3, "it waited for its --drain-timeout")


class DrainRefusesNewSessionsTest(InProcessWorkerTest):
    """While it drains, a gateway opens nothing new on the connections it
    still has (keep-alive HTTP): an Engine.IO handshake and an API session
    get 503 and "Connection: close", so the client goes elsewhere. It
    waits for a CONNECT still in its service's hook: the service, which
    accepts the socket after its client was closed, still hears that it
    left, with the user its hook named, before the gateway exits 0."""

    gateway_id = "gwZ"
    gateway_args = ("--drain-timeout", "5000")

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("drainnew", capacity=8)
        cls.hooked = queue.Queue()

        @svc.on_connect
        def hello(req):
            cls.hooked.put(req.sid)
            time.sleep(1.5)
            req.accept({"user": "bea"})

        record_disconnects(cls, svc)
        return svc

    def test_nothing_opens_and_a_connect_in_its_hook_is_waited_for(self):
        import http.client
        warnings.simplefilter("ignore", ResourceWarning)
        keep = [http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=WAIT) for _ in range(2)]
        for c in keep:  # open before the drain, kept alive
            c.request("GET", "/healthz")
            self.assertEqual(c.getresponse().read(), b"ok\n")
        opened = queue.Queue()

        def open_session():  # an API session: nothing else holds the drain up
            c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=WAIT)
            c.request("POST", "/api/v1/sessions", body=json.dumps({"nsp": "/drainnew"}))
            opened.put(c.getresponse().status)
            c.close()

        threading.Thread(target=open_session, daemon=True).start()
        sid = self.hooked.get(timeout=WAIT)  # its hook runs for 1.5 s
        self.gateway.signal(signal.SIGTERM)
        time.sleep(0.2)
        keep[0].request("POST", "/api/v1/sessions", body=json.dumps({"nsp": "/drainnew"}),
                        headers={"Content-Type": "application/json"})
        res = keep[0].getresponse()
        self.assertEqual((res.status, res.getheader("Connection"), json.loads(res.read())),
                         (503, "close", {"error": "server shutting down"}))
        keep[1].request("GET", "/socket.io/?EIO=4&transport=polling")
        res = keep[1].getresponse()
        self.assertEqual((res.status, res.getheader("Connection"), json.loads(res.read())["message"]),
                         (503, "close", "Server shutting down"))
        self.assertTrue(self.hooked.empty(), "a session was opened during the drain")
        self.assertEqual(opened.get(timeout=WAIT), 410)
        self.assertTrue(eventually(lambda: sid in self.left, WAIT),
                        "the service accepted a socket during the drain and never heard it left")
        self.assertEqual(self.left_users[sid], "bea")
        self.gateway.proc.wait(WAIT)
        self.assertEqual(self.gateway.proc.returncode, 0)
        for c in keep:
            c.close()


class BinaryOnJsonFacesTest(InProcessWorkerTest):
    """A worker's binary attachments reach the JSON faces as base64 in place
    of their placeholders: {"_base64": "..."} (a Socket.IO client gets them
    as binary). Before, a /ws or API client got {"_placeholder": true,
    "num": 0} and no bytes."""

    gateway_id = "gwB"
    gateway_args = ("--api-key", "k")

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("bin", capacity=4)

        @svc.on("blob")
        def blob(req):
            req.emit("blob", {"payload": b"\x01\x02\x03", "n": 1})
            return {"b": b"\xff\x00"}

        return svc

    def test_ws_and_api_clients_get_the_bytes_in_base64(self):
        import urllib.request
        import websocket  # python3-websocket
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.http_port}/ws?nsp=/bin", timeout=WAIT)
        self.addCleanup(ws.close)
        self.assertEqual(json.loads(ws.recv())["event"], "connect")
        ws.send(json.dumps({"event": "blob", "id": 1}))
        got = sorted((json.loads(ws.recv()) for _ in range(2)), key=lambda m: "id" in m)
        self.assertEqual(got, [{"event": "blob", "data": {"payload": {"_base64": "AQID"}, "n": 1}, "nsp": "/bin"},
                               {"id": 1, "data": {"b": {"_base64": "/wA="}}}])
        url = f"http://127.0.0.1:{self.http_port}/api/v1/sessions"
        req = urllib.request.Request(url, data=json.dumps({"nsp": "/bin"}).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=WAIT) as res:
            key = json.loads(res.read())["session"]
        req = urllib.request.Request(f"{url}/{key}/emit", data=json.dumps({"event": "blob", "ack": True}).encode(),
                                     method="POST")
        with urllib.request.urlopen(req, timeout=WAIT) as res:
            self.assertEqual(json.loads(res.read()), {"data": {"b": {"_base64": "/wA="}}})
        with urllib.request.urlopen(f"{url}/{key}/events?timeout=2000", timeout=WAIT) as res:
            events = json.loads(res.read())["events"]
        self.assertEqual(events, [{"event": "blob", "data": {"payload": {"_base64": "AQID"}, "n": 1}, "nsp": "/bin"}])


class EarlyClientFramesTest(InProcessWorkerTest):
    """Frames a /ws client sends as soon as its socket opens, while the
    connect hook still runs, wait for its answer and are then handled in
    order; past --max-early-frames (3 here), or past --max-payload bytes of
    them (1000 here), a frame is refused at once."""

    gateway_id = "gwE"
    gateway_args = ("--max-early-frames", "3", "--max-payload", "1000")

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("ef", capacity=4)
        cls.go = threading.Event()
        cls.seen = queue.Queue()

        @svc.on_connect
        def hello(req):
            cls.go.wait(WAIT)

        @svc.on("say")
        def say(req):
            cls.seen.put(req.args[0])
            return req.args[0] * 10

        return svc

    def test_frames_sent_before_the_connect_answer_wait_for_it(self):
        import websocket  # python3-websocket
        self.go.clear()
        before = dropped(self.http_port, "early_frames")
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.http_port}/ws?nsp=/ef", timeout=WAIT)
        self.addCleanup(ws.close)
        for i in range(1, 5):
            ws.send(json.dumps({"event": "say", "data": i, "id": i}))
        refused = json.loads(ws.recv())
        self.assertEqual(refused["id"], 4)
        self.assertIn("not connected yet", refused["error"])
        self.assertTrue(self.seen.empty(), "a frame reached the service before its connect was answered")
        self.go.set()
        self.assertEqual(json.loads(ws.recv())["event"], "connect")
        self.assertEqual([json.loads(ws.recv()) for _ in range(3)],
                         [{"id": i, "data": i * 10} for i in range(1, 4)])
        self.assertEqual([self.seen.get(timeout=WAIT) for _ in range(3)], [1, 2, 3])
        self.assertEqual(dropped(self.http_port, "early_frames"), before + 1)

    def test_what_they_hold_is_bounded_in_bytes_too(self):
        import websocket  # python3-websocket
        self.go.clear()
        before = dropped(self.http_port, "early_frames")
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.http_port}/ws?nsp=/ef", timeout=WAIT)
        self.addCleanup(ws.close)
        text = "x" * 400  # two fit under --max-payload 1000, three do not
        for i in range(1, 4):
            ws.send(json.dumps({"event": "say", "data": text, "id": i}))
        refused = json.loads(ws.recv())
        self.assertEqual(refused["id"], 3)
        self.assertIn("not connected yet", refused["error"])
        self.go.set()
        self.assertEqual(json.loads(ws.recv())["event"], "connect")
        self.assertEqual([json.loads(ws.recv())["id"] for _ in range(2)], [1, 2])
        self.assertEqual([self.seen.get(timeout=WAIT) for _ in range(2)], [text, text])
        self.assertEqual(dropped(self.http_port, "early_frames"), before + 1)


class EarlyEventsEndToEndTest(InProcessWorkerTest):
    """Events a worker sends a socket while its connect hook still runs wait
    for the CONNECT answer, up to half of what a connection may queue
    (--outbound-messages 8 here: 4); past that they are dropped and counted
    (undelivered), and one that wanted an ack is refused to its worker at
    once rather than left to time out."""

    gateway_id = "gwY"
    gateway_args = ("--outbound-messages", "8")

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("early", capacity=4)
        cls.acks = queue.Queue()

        @svc.on_connect
        def hello(req):
            for i in range(6):
                req.emit("early", i)
            future = req.emit_with_ack("early_ack", "x", timeout=30)
            if future is None:
                cls.acks.put(None)
            else:
                future.add_done_callback(lambda f: cls.acks.put(f.result()))

        return svc

    def test_events_before_the_connect_answer_are_bounded(self):
        warnings.simplefilter("ignore", ResourceWarning)
        before = dropped(self.http_port, "undelivered")
        sio = socketio.Client(reconnection=False)
        got = queue.Queue()
        sio.on("early", got.put, namespace="/early")
        sio.connect(f"http://127.0.0.1:{self.http_port}", namespaces=["/early"], transports=["websocket"],
                    wait_timeout=WAIT)
        self.addCleanup(sio.disconnect)
        result = self.acks.get(timeout=WAIT)
        self.assertIsNotNone(result, "emit_with_ack was refused by the worker itself")
        self.assertEqual(result.code.name, "BUSY")
        received = sorted(got.get(timeout=WAIT) for _ in range(4))
        self.assertEqual(received, [0, 1, 2, 3])
        time.sleep(0.2)
        self.assertTrue(got.empty(), "more than --outbound-messages events were kept")
        self.assertEqual(dropped(self.http_port, "undelivered"), before + 3)

    def test_a_ws_socket_gets_them_after_its_connect_and_cannot_ack(self):
        # The same bound on /ws. It has no acks from its client: the
        # emit_with_ack is answered BAD_REQUEST at once, and its event, past
        # the bound, is dropped like the other two.
        import websocket  # python3-websocket
        before = dropped(self.http_port, "undelivered")
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.http_port}/ws?nsp=/early", timeout=WAIT)
        self.addCleanup(ws.close)
        self.assertEqual(json.loads(ws.recv())["event"], "connect")
        received = [json.loads(ws.recv()) for _ in range(4)]
        self.assertEqual([(m["event"], m["data"]) for m in received], [("early", i) for i in range(4)])
        result = self.acks.get(timeout=WAIT)
        self.assertIsNotNone(result, "emit_with_ack was refused by the worker itself")
        self.assertEqual((result.code.name, result.message), ("BAD_REQUEST", "a /ws session cannot ack"))
        ws.settimeout(0.3)
        with self.assertRaises(websocket.WebSocketTimeoutException, msg="more than the bound was kept"):
            ws.recv()
        self.assertEqual(dropped(self.http_port, "undelivered"), before + 3)

    def open_api_session(self):
        import urllib.request
        url = f"http://127.0.0.1:{self.http_port}/api/v1/sessions"
        req = urllib.request.Request(url, data=json.dumps({"nsp": "/early"}).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=WAIT) as res:
            self.assertEqual(res.status, 201)
            sid = json.loads(res.read())["session"]
        self.assertEqual(self.acks.get(timeout=WAIT).code.name, "BAD_REQUEST")
        return f"{url}/{sid}"

    def api_out(self):
        return metric(http_get(self.http_port, "/metrics")[1], "sidecast_gateway_messages_total",
                      direction="out", face="api") or 0

    def test_an_api_session_finds_them_in_its_first_poll(self):
        # An API session keeps them in its --api-buffer (256) like any
        # event; they count as sent when a poll takes them.
        import urllib.request
        sent_before = self.api_out()
        session = self.open_api_session()
        self.assertEqual(self.api_out(), sent_before, "counted as sent before any poll took them")
        with urllib.request.urlopen(f"{session}/events?timeout=2000", timeout=WAIT) as res:
            events = json.loads(res.read())["events"]
        self.assertEqual([(e["event"], e["data"]) for e in events],
                         [("early", i) for i in range(6)] + [("early_ack", "x")])
        self.assertEqual(self.api_out(), sent_before + 7)

    def test_an_api_session_closed_before_its_poll_counts_them_undelivered(self):
        import urllib.request
        before, sent_before = dropped(self.http_port, "undelivered"), self.api_out()
        session = self.open_api_session()
        with urllib.request.urlopen(urllib.request.Request(session, method="DELETE"), timeout=WAIT) as res:
            self.assertEqual(res.status, 204)
        self.assertEqual(dropped(self.http_port, "undelivered"), before + 7)
        self.assertEqual(self.api_out(), sent_before)


class RecoveryTest(InProcessWorkerTest):
    """A gateway with recovery in the namespace /rec of an in-process Python
    worker, and raw Socket.IO frames over a WebSocket (python-socketio has no
    client side of recovery)."""

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("rec", capacity=4)

        @svc.on_connect
        def accept(req):
            pass

        return svc

    def connect(self, auth=None):
        import websocket  # python3-websocket
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.http_port}/socket.io/?EIO=4&transport=websocket",
                                         timeout=WAIT)
        self.assertTrue(ws.recv().startswith("0"))
        ws.send("40/rec," + (json.dumps(auth) if auth else ""))
        answer = ws.recv()
        self.assertTrue(answer.startswith("40/rec,"), answer)
        return ws, json.loads(answer[len("40/rec,"):])

    def event(self, ws):
        frame = ws.recv()
        self.assertTrue(frame.startswith("42/rec,"), frame)
        name, n, offset = json.loads(frame[len("42/rec,"):])
        return n, offset

    def drop_transport(self, ws):
        """Closes `ws` with no Socket.IO disconnect (the socket is kept for
        recovery) and waits until the gateway has seen it."""
        ws.close()
        self.assertTrue(eventually(lambda: metric(http_get(self.http_port, "/metrics")[1], "sidecast_gateway_connections",
                                                  transport="websocket") == 0), "the gateway never saw the close")


class RecoveryBufferEndToEndTest(RecoveryTest):
    """Connection-state recovery past --recovery-buffer (3 here). A client
    that missed more events than the gateway kept is told it did not recover
    (the CONNECT answer carries a new pid: socket.recovered is false, and the
    app fetches its state again), instead of recovering with a silent gap;
    one that missed fewer gets them."""

    gateway_id = "gwR"
    gateway_args = ("--recovery", "/rec", "--recovery-buffer", "3", "--ping-interval", "60000")

    def away_while(self, sent):
        """Connects, sees event 0, drops the transport, and the worker sends
        `sent` more; returns what the client knows (sid, pid, offset)."""
        ws, hello = self.connect()
        self.worker.emit_to_sid(hello["sid"], "n", 0, nsp="/rec")
        n, offset = self.event(ws)
        self.assertEqual(n, 0)
        self.drop_transport(ws)
        before = dropped(self.http_port, "replay_overflow")
        for i in range(1, sent + 1):
            self.worker.emit_to_sid(hello["sid"], "n", i, nsp="/rec")
        # Kept: the newest 3 of event 0 (unconfirmed: no ping ran) and those.
        self.assertTrue(eventually(lambda: dropped(self.http_port, "replay_overflow") == before + max(0, sent - 2)))
        return hello["sid"], hello["pid"], offset

    def test_a_client_that_missed_what_was_kept_gets_it(self):
        sid, pid, offset = self.away_while(2)
        ws, hello = self.connect({"pid": pid, "offset": offset})
        self.addCleanup(ws.close)
        self.assertEqual(hello, {"sid": sid, "pid": pid}, "not recovered")
        self.assertEqual([self.event(ws)[0] for _ in range(2)], [1, 2])

    def test_a_client_that_missed_more_is_told_it_did_not_recover(self):
        sid, pid, offset = self.away_while(5)
        before = dropped(self.http_port, "undelivered")
        ws, hello = self.connect({"pid": pid, "offset": offset})
        self.addCleanup(ws.close)
        self.assertEqual(hello["sid"], sid, "the sid and its rooms stay")
        self.assertNotEqual(hello["pid"], pid, "told it recovered, with events 1 and 2 lost")
        # Events 3 to 5, kept but not sent to a client that starts afresh.
        self.assertEqual(dropped(self.http_port, "undelivered"), before + 3)
        ws.settimeout(0.3)
        import websocket
        with self.assertRaises(websocket.WebSocketTimeoutException, msg="events replayed after a gap"):
            ws.recv()


class RecoveryBufferBytesTest(RecoveryTest):
    """--recovery-buffer-bytes (3000 here) bounds what a socket keeps for
    replay in bytes, as --recovery-buffer does in events: large events to a
    client that is away give way sooner, and counted, and the client is
    told it did not recover."""

    gateway_id = "gwB"
    gateway_args = ("--recovery", "/rec", "--recovery-buffer-bytes", "3000", "--ping-interval", "60000")

    def test_large_events_give_way_past_the_bytes(self):
        ws, hello = self.connect()
        self.worker.emit_to_sid(hello["sid"], "n", 0, nsp="/rec")
        n, offset = self.event(ws)
        self.drop_transport(ws)
        before = dropped(self.http_port, "replay_overflow")
        for i in range(1, 6):
            self.worker.emit_to_sid(hello["sid"], "big", "x" * 1000, nsp="/rec")
        # 3000 bytes hold two of them: event 0 and the first three give way.
        self.assertTrue(eventually(lambda: dropped(self.http_port, "replay_overflow") == before + 4),
                        dropped(self.http_port, "replay_overflow") - before)
        ws, again = self.connect({"pid": hello["pid"], "offset": offset})
        self.addCleanup(ws.close)
        self.assertEqual(again["sid"], hello["sid"])
        self.assertNotEqual(again["pid"], hello["pid"], "told it recovered, with events lost")


class RecoveryEdgesTest(RecoveryTest):
    """What a recovery does with an emit awaiting the client's ack, with a
    worker's disconnect of a parked socket, and with an event it could not
    keep while the client was away."""

    gateway_id = "gwE"
    gateway_args = ("--recovery", "/rec", "--ping-interval", "60000")

    @classmethod
    def service(cls):
        from sidecast_worker import Service
        svc = Service("rec", capacity=4)
        cls.gone = queue.Queue()

        @svc.on_connect
        def accept(req):
            req.accept({"user": "ann"})

        @svc.on_disconnect
        def bye(req):
            cls.gone.put(req.sid)

        svc.on("whoami", lambda req: req.user)
        return svc

    def ask(self, sid):
        """A worker's emit to `sid` that wants the client's ack: its future."""
        future = self.worker._core.emit_with_ack("/rec", sid, "q", [1], WAIT * 2, None)
        self.assertIsNotNone(future)
        return future

    def test_an_emit_awaiting_the_ack_is_acked_after_the_recovery(self):
        ws, hello = self.connect()
        future = self.ask(hello["sid"])
        frame = ws.recv()
        self.assertTrue(frame.startswith("42/rec,"), frame)
        ack_id = frame[len("42/rec,"):frame.index("[")]
        self.drop_transport(ws)
        ws, again = self.connect({"pid": hello["pid"], "offset": "0"})
        self.addCleanup(ws.close)
        self.assertEqual(again, hello, "not recovered")
        ws.send(f"43/rec,{ack_id}[\"yes\"]")
        result = future.result(WAIT)
        self.assertEqual((result.code.name, result.args), ("OK", ["yes"]))
        # Still the user its connect hook accepted (no hook runs on a recovery).
        ws.send('42/rec,7["whoami"]')
        self.assertEqual(ws.recv(), '43/rec,7["ann"]')

    def test_a_parked_socket_a_worker_disconnects_is_not_recovered(self):
        ws, hello = self.connect()
        self.drop_transport(ws)
        self.worker.disconnect(hello["sid"], nsp="/rec")
        self.assertEqual(self.gone.get(timeout=WAIT), hello["sid"], "the service never heard it end")
        ws, again = self.connect({"pid": hello["pid"], "offset": "0"})
        self.addCleanup(ws.close)
        self.assertNotEqual(again["sid"], hello["sid"], "recovered into a socket its worker disconnected")

    def test_a_polling_client_that_closes_and_reconnects_at_once_recovers(self):
        # Its close packet comes with no GET pending (under traffic, the GET
        # is on its way back): the socket is parked at once, so a reconnect
        # within the moment the session waits for a late GET finds it. (It
        # got a new sid, and the old socket stayed parked for the whole
        # recovery window, its service never told it left.)
        import requests
        base = f"http://127.0.0.1:{self.http_port}/socket.io/?EIO=4&transport=polling"

        def handshake():
            return json.loads(requests.get(base, timeout=WAIT).text[1:])["sid"]

        def post(sid, body):
            self.assertEqual(requests.post(f"{base}&sid={sid}", data=body.encode(), timeout=WAIT).text, "ok")

        eio = handshake()
        post(eio, "40/rec,")
        hello = json.loads(requests.get(f"{base}&sid={eio}", timeout=WAIT).text[len("40/rec,"):])
        post(eio, "1")  # no GET waits
        again_eio = handshake()
        post(again_eio, "40/rec," + json.dumps({"pid": hello["pid"], "offset": "0"}))
        answer = requests.get(f"{base}&sid={again_eio}", timeout=WAIT).text
        self.assertTrue(answer.startswith("40/rec,"), answer)
        self.assertEqual(json.loads(answer[len("40/rec,"):]), hello, "not recovered")
        post(again_eio, "1")

    def test_an_event_dropped_while_away_means_no_recovery(self):
        ws, hello = self.connect()
        self.drop_transport(ws)
        result = self.ask(hello["sid"]).result(WAIT)  # wants an ack: not kept for the client's return
        self.assertEqual(result.code.name, "BUSY")
        ws, again = self.connect({"pid": hello["pid"], "offset": "0"})
        self.addCleanup(ws.close)
        self.assertEqual(again["sid"], hello["sid"], "the sid and its rooms stay")
        self.assertNotEqual(again["pid"], hello["pid"], "told it recovered, with the event lost")


class ParkedSocketsTest(RecoveryTest):
    """A socket kept for recovery keeps its connection's place under the
    connection limits (--max-connections 3 here) until it is recovered or
    its window ends: dropping transports on purpose cannot pile up parked
    sockets past the limits."""

    gateway_id = "gwK"
    gateway_args = ("--recovery", "/rec", "--max-connections", "3")

    def test_parked_sockets_keep_their_places(self):
        for _ in range(2):
            ws, _ = self.connect()
            self.drop_transport(ws)
        live, _ = self.connect()  # the third place
        self.addCleanup(live.close)
        import socket
        with socket.create_connection(("127.0.0.1", self.http_port), timeout=WAIT) as s:
            try:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = s.recv(100)
            except ConnectionError:
                answer = b""
        self.assertEqual(answer, b"", "a fourth connection was served: the parked sockets held no place")


class WorkerArgsTest(unittest.TestCase):
    """Event and answer args are bytes the broker passes on unread; the
    gateway checks they are JSON before they reach a client. A fake worker
    (a raw DEALER serving `demo`) sends bad JSON next to good: the client gets
    an error ack for a bad answer, never a bad event, and every good one.
    (Found by tests/fuzz/chaos: a published `[...]` with invalid UTF-8 became
    a text frame the client's WebSocket library refused.)"""

    @classmethod
    def setUpClass(cls):
        cls.broker = Broker(heartbeat_interval_ms=500)
        cls.http_port = free_port()
        cls.gateway = Process([os.path.join(BIN, "sidecast-gateway"),
                               "--http", f"127.0.0.1:{cls.http_port}", "--broker", cls.broker.router,
                               "--events", cls.broker.xpub, "--gateway-id", "gwA", "--threads", "1",
                               "--log-level", "error"], "gateway")
        if not eventually(lambda: http_get(cls.http_port, "/healthz")[0] == 200, 10):
            print(f"--- gateway output:\n{cls.gateway.output()}")
            cls.tearDownClass()
            raise RuntimeError("the gateway did not connect to the broker")

    @classmethod
    def tearDownClass(cls):
        for p in (cls.gateway, cls.broker.process):
            p.stop()
            p.cleanup()

    def setUp(self):
        warnings.simplefilter("ignore", ResourceWarning)
        self.context = zmq.Context()
        self.addCleanup(self.context.term)
        self.worker = Peer(self.context, self.broker.router, "fakew", role=pb.ROLE_WORKER)
        self.addCleanup(self.worker.close)
        hello = pb.Envelope()
        hello.hello.role, hello.hello.id, hello.hello.protocol_version = pb.ROLE_WORKER, "fakew", 1
        hello.hello.services.add(name="demo", capacity=4)
        self.worker.send(hello)
        self.assertIsNotNone(self.worker.next("welcome"), "the broker did not welcome the fake worker")
        self.worker.registered = True
        self.notes = queue.Queue()
        self.sio = socketio.Client(reconnection=False)
        self.sio.on("note", lambda *args: self.notes.put(list(args)))
        self.in_thread(lambda: self.sio.connect(f"http://127.0.0.1:{self.http_port}", transports=["websocket"],
                                                wait_timeout=WAIT),
                       lambda: self.answer(self.worker.next(
                           "lifecycle", where=lambda e: e.lifecycle.kind == pb.Lifecycle.CONNECT), b""))
        self.addCleanup(self.sio.disconnect)

    def in_thread(self, client_side, worker_side):
        """Runs the client's blocking call while the fake worker plays its part; the call's result."""
        out = {}
        t = threading.Thread(target=lambda: out.update(result=client_side()), daemon=True)
        t.start()
        worker_side()
        t.join(WAIT)
        self.assertFalse(t.is_alive(), "the client's call did not return")
        return out.get("result")

    def answer(self, env, args):
        self.assertIsNotNone(env, "the gateway asked the fake worker nothing")
        job = getattr(env, env.WhichOneof("kind"))
        reply = pb.Envelope()
        reply.reply.id, reply.reply.code, reply.reply.args = job.id, pb.OK, args
        self.worker.send(reply)

    def emit(self, args, nsp="/", event="note", **to):
        env = pb.Envelope()
        e = env.emit
        for k, v in to.items():
            setattr(e, k, v)
        e.nsp, e.event, e.args, e.origin = nsp, event, args, "fakew"
        return env.SerializeToString()

    def room_gets_only(self, sid, bad, good):
        """Joins `sid` to room r, then publishes the `bad` emits and a `good`
        one on r's topic until the good one arrives (the subscription takes a
        moment): the client must see it, and nothing else."""
        join = pb.Envelope()
        join.control.action, join.control.sid, join.control.nsp, join.control.room = pb.Control.JOIN, sid, "/", "r"
        self.worker.send(join)
        pub = self.context.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.connect(self.broker.xsub)
        self.addCleanup(pub.close)
        got, until = None, time.monotonic() + WAIT
        while got is None and time.monotonic() < until:
            for emit in bad + [self.emit(good, room="r")]:
                pub.send_multipart([b"r/\0r\0", emit])
            try:
                got = self.notes.get(timeout=0.2)
            except queue.Empty:
                pass
        expected = json.loads(good)
        self.assertEqual(got, expected)
        time.sleep(0.3)
        while not self.notes.empty():
            self.assertEqual(self.notes.get_nowait(), expected, "a refused event reached the client")
        self.assertTrue(self.sio.connected)

    def test_events_a_socket_cannot_take_are_refused(self):
        """A reserved name ("connect" would fire the client's own connect
        handlers) or a namespace the socket is not in (the packet would be
        framed for it): refused with a report; a room event whose topic is
        not its own: dropped."""
        sid = self.sio.get_sid("/")
        before = dropped(self.http_port, "bad_event")
        for kw, why in (({"event": "connect"}, "reserved event name"),
                        ({"nsp": "/chat"}, "not the namespace of the socket or topic")):
            self.worker.socket.send(self.emit(b'["x"]', sid=sid, **kw))
            report = self.worker.next("report")
            self.assertIsNotNone(report, f"no delivery report for {kw}")
            self.assertEqual((report.report.status, report.report.detail), (pb.DeliveryReport.REJECTED, why))
        self.room_gets_only(sid, [self.emit(b'["elsewhere"]', nsp="/chat", room="r"),
                                  self.emit(b'["other room"]', room="s"),
                                  self.emit(b'["x"]', event="disconnect", room="r")], b'["here"]')
        self.assertGreaterEqual(dropped(self.http_port, "bad_event") - before, 5)

    def test_an_answer_that_is_not_json_becomes_an_error_ack(self):
        ack = self.in_thread(lambda: self.sio.call("echo", "x", timeout=WAIT),
                             lambda: self.answer(self.worker.next("request"), b'["\xff\xfe"]'))
        self.assertEqual(ack, {"error": "internal", "message": "the worker's answer is not valid JSON"})
        ack = self.in_thread(lambda: self.sio.call("echo", "x", timeout=WAIT),
                             lambda: self.answer(self.worker.next("request"), b'["fine"]'))
        self.assertEqual(ack, "fine")

    def test_events_with_bad_args_never_reach_the_client(self):
        sid = self.sio.get_sid("/")
        before = dropped(self.http_port, "bad_args")
        self.worker.socket.send(self.emit(b"[1", sid=sid))
        report = self.worker.next("report")
        self.assertIsNotNone(report, "no delivery report for the refused emit")
        self.assertEqual(report.report.status, pb.DeliveryReport.REJECTED)
        self.assertEqual(report.report.detail, "args are not valid JSON")
        self.worker.socket.send(self.emit(b'["to the sid"]', sid=sid))
        self.assertEqual(self.notes.get(timeout=WAIT), ["to the sid"])

        self.room_gets_only(sid, [self.emit(b'["\xc3\x28"]', room="r")], b'["to the room"]')
        self.assertGreaterEqual(dropped(self.http_port, "bad_args") - before, 2)


class StandbyHoldTest(unittest.TestCase):
    """A gateway and a worker of a broker pair whose backup is up but whose
    primary is not yet: the backup never serves before it has heard an
    active primary, so it refuses them (Error STANDBY; a refused request
    names its id: it did not run). What a client asks meanwhile is held by
    the gateway, not failed, and goes to the broker that welcomes it once
    the pair serves (docs/protocol.md, "Broker pairs")."""

    def setUp(self):
        from sidecast_worker import Service, Worker
        primary_pair, backup_pair = free_ports(2)
        self.primary_ports = tuple(free_ports(4))
        self.primary_args = pair_args("primary", primary_pair, backup_pair)
        self.primary = None
        self.backup = Broker(heartbeat_interval_ms=200, extra=pair_args("backup", backup_pair, primary_pair))
        primary_router, primary_xsub, primary_xpub = (f"tcp://127.0.0.1:{p}" for p in self.primary_ports[:3])
        self.http_port = free_port()
        # The backup first: the gateway and the worker start on it.
        self.gateway = Process([os.path.join(BIN, "sidecast-gateway"),
                                "--http", f"127.0.0.1:{self.http_port}", "--broker", self.backup.router,
                                "--events", self.backup.xpub, "--backup-broker", primary_router,
                                "--backup-events", primary_xpub, "--gateway-id", "gwH", "--route", "/held=held",
                                "--gateway-heartbeat", "200", "--request-timeout", "20000", "--threads", "1",
                                "--log-level", "warn"], "gateway")
        svc = Service("held", capacity=2)
        svc.on("echo", lambda req: req.reply(*req.args))
        self.worker = Worker(self.backup.router, self.backup.xsub, worker_id="pyH", heartbeat_interval=0.2,
                             backup_broker=primary_router, backup_publish=primary_xsub).add(svc)
        self.worker.start()
        self.addCleanup(self.cleanup)
        # Not healthy (no broker welcomed it), but it serves clients.
        self.assertTrue(eventually(lambda: http_get(self.http_port, "/healthz")[0] != 0, 10))

    def cleanup(self):
        self.worker.stop()
        for p in (self.gateway, self.backup.process, self.primary and self.primary.process):
            if p:
                p.stop()
                p.cleanup()

    def test_what_a_client_asks_before_the_pair_serves_is_served_once_it_does(self):
        import websocket  # python3-websocket
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.http_port}/ws?nsp=/held", timeout=15)
        self.addCleanup(ws.close)
        time.sleep(1)  # the backup refuses the gateway and the worker meanwhile
        self.assertGreaterEqual(self.backup.metric("sidecast_broker_dropped_total", reason="standby") or 0, 1)
        self.assertEqual(http_get(self.http_port, "/healthz")[0], 503, "welcomed by a backup that never heard a primary")
        self.primary = Broker(heartbeat_interval_ms=200, ports=self.primary_ports, extra=self.primary_args)
        frame = json.loads(ws.recv())  # within 15 s; the connect's deadline (20 s) would fail it
        self.assertEqual(frame["event"], "connect", frame)
        ws.send(json.dumps({"event": "echo", "data": ["after"], "id": 1}))
        self.assertEqual(json.loads(ws.recv())["data"], ["after"])

if __name__ == "__main__":
    main()
