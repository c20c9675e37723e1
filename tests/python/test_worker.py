#!/usr/bin/python3
"""The Python worker SDK against the real broker.

Each test starts sidecast-broker ($SIDECAST_BIN) on free loopback ports, runs
a sidecast_worker.Worker in this process (so the test can see what its
handlers saw), and plays the broker's other neighbours with raw DEALER peers
speaking the envelope protocol: a client, or a fake gateway "gwT" that owns
the sids "gwT.*". Every wait is bounded.

    PYTHONPATH=<build>/python:workers/python SIDECAST_BIN=<build>/bin \\
        /usr/bin/python3 tests/python/test_worker.py -v
"""
import collections
import concurrent.futures
import importlib.util
import json
import os
import queue
import re
import signal
import struct
import sys
import threading
import time
import unittest

import zmq

from harness import (BIN, EXAMPLES, WAIT, Broker, Peer, Process, eventually, free_ports, has_failed, http_get, main,
                     pair_args)
from sidecast.v1 import envelope_pb2 as pb
from sidecast_worker import Code, Service, SocketState, Worker, namespace_topic, room_topic


def args_of(msg):
    return json.loads(msg.args) if msg.args else []


class Recorder:
    """A queue with bounded waits, for what handlers saw."""

    def __init__(self):
        self.q = queue.Queue()

    def put(self, item):
        self.q.put(item)

    def get(self, what="an item", timeout=WAIT):
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no {what} within {timeout} s") from None

    def empty_for(self, seconds):
        try:
            self.q.get(timeout=seconds)
            return False
        except queue.Empty:
            return True


class BrokerTest(unittest.TestCase):
    heartbeat_ms = 200  # broker heartbeat interval; liveness is 3

    def setUp(self):
        self.ctx = zmq.Context()
        self.workers, self.peers, self.brokers = [], [], []
        self.addCleanup(self.cleanup)  # first: a broker started below goes even if the next fails
        self.broker = self.start_broker()

    def start_broker(self, **options):
        """A Broker (harness) at this test's heartbeat interval, stopped at cleanup."""
        b = Broker(self.heartbeat_ms, **options)
        self.brokers.append(b)
        return b

    def cleanup(self):
        try:
            for w in self.workers:
                w.stop()
            for p in self.peers:
                p.close()
            self.ctx.term()
        finally:  # the brokers go, and say what they logged, whatever failed above
            failed = has_failed(self)
            for b in self.brokers:
                if failed:
                    print(f"--- broker output ({self.id()}):\n{b.process.output()}")
                b.cleanup()

    def start_worker(self, *services, worker_id="pyw", **options):
        w = Worker(self.broker.router, self.broker.xsub, worker_id=worker_id, **options)
        for s in services:
            w.add(s)
        self.workers.append(w)
        w.start()
        self.assertTrue(w.wait_connected(WAIT), "the broker did not welcome the worker")
        return w

    def peer(self, peer_id="c1", role=pb.ROLE_CLIENT):
        p = Peer(self.ctx, self.broker.router, peer_id, role)
        self.peers.append(p)
        self.assertTrue(p.hello(), f"no Welcome for {peer_id}")
        return p

    def gateway(self, peer_id="gwT"):
        return self.peer(peer_id, pb.ROLE_GATEWAY)


class RequestReplyTest(BrokerTest):
    def service(self):
        svc = Service("t", capacity=4)

        @svc.on("echo")
        def echo(req):
            req.reply(*req.args)

        @svc.on("whoami")
        def whoami(req):
            # A return value is the reply.
            return {"sid": req.sid, "nsp": req.nsp, "auth": req.auth, "user": req.user,
                    "event": req.event, "attempt": req.attempt, "kind": req.kind,
                    "wants_reply": req.wants_reply, "worker": req.worker_id}

        svc.on("quiet", lambda req: None)
        svc.on("boom", lambda req: 1 / 0)

        def surrogate_boom(req):
            raise ValueError("bad \udcff byte")
        svc.on("surrogate-boom", surrogate_boom)
        svc.on("surrogate-reply", lambda req: req.reply("x\udcff"))
        svc.on("refuse", lambda req: req.fail(Code.REFUSED, "not you"))
        svc.on("twice", lambda req: [req.reply(1), req.reply(2)])
        svc.on("nan", lambda req: req.reply(float("nan")))
        return svc

    def test_echo_reply(self):
        self.start_worker(self.service())
        c = self.peer()
        args = [1, "two", {"three": [3, None, True]}, "é✓"]
        reply = c.call("t", "echo", json.dumps(args))
        self.assertIsNotNone(reply)
        self.assertEqual(reply.code, pb.OK)
        self.assertEqual(args_of(reply), args)
        self.assertFalse(reply.silent)
        self.assertFalse(reply.partial)
        reply = c.call("t", "echo", "[]")
        self.assertEqual((reply.code, args_of(reply)), (pb.OK, []))

    def test_request_fields_and_return_value(self):
        self.start_worker(self.service())
        c = self.gateway("gw9")  # only a sid's own gateway may name it
        reply = c.call("t", "whoami", "[]", sid="gw9.abc", nsp="/custom", auth=b'{"token":"x"}',
                       user="ann")
        self.assertEqual(args_of(reply), [{
            "sid": "gw9.abc", "nsp": "/custom", "auth": {"token": "x"}, "user": "ann",
            "event": "whoami", "attempt": 1, "kind": "event", "wants_reply": True, "worker": "pyw"}])
        reply = c.call("t", "whoami", "[]")
        self.assertEqual(args_of(reply)[0]["auth"], {})  # no auth payload: {}

    def test_silent_reply_when_handler_gives_none(self):
        self.start_worker(self.service())
        c = self.peer()
        for event in ("quiet", "no-such-event"):
            reply = c.call("t", event, "[1]")
            self.assertIsNotNone(reply, event)
            self.assertEqual(reply.code, pb.OK, event)
            self.assertTrue(reply.silent, event)

    def test_error_replies(self):
        w = self.start_worker(self.service())
        c = self.peer()
        reply = c.call("t", "boom")
        self.assertEqual(reply.code, pb.INTERNAL)
        self.assertIn("division", reply.message)
        reply = c.call("t", "refuse")
        self.assertEqual((reply.code, reply.message), (pb.REFUSED, "not you"))
        self.assertEqual(w.stats().handler_errors, 1)
        # Text UTF-8 cannot carry still gets an answer, not the deadline's TIMEOUT.
        reply = c.call("t", "surrogate-boom", timeout_ms=2000)
        self.assertEqual((reply.code, reply.message), (pb.INTERNAL, "bad ? byte"))
        reply = c.call("t", "surrogate-reply", timeout_ms=2000)
        self.assertEqual((reply.code, reply.message), (pb.INTERNAL, "the handler's answer is not valid UTF-8"))

    def test_an_answer_that_is_not_json_is_an_internal_error(self):
        # NaN is no JSON: json.dumps would write it, and no client could read it.
        self.start_worker(self.service())
        reply = self.peer().call("t", "nan", "[]")
        self.assertEqual(reply.code, pb.INTERNAL)
        self.assertIn("JSON", reply.message)

    def test_an_error_message_that_is_not_text_is_sent_as_text(self):
        # fail() with an exception as its message: it goes as str(exception).
        # It used to raise with the request counted answered and nothing sent:
        # the requester got TIMEOUT and the broker never got the credit back.
        svc = Service("f", capacity=1)
        svc.on("fail", lambda req: req.fail(Code.BAD_REQUEST, ValueError("count must be 1..20")))
        svc.on("echo", lambda req: req.reply(*req.args))
        w = self.start_worker(svc)
        c = self.peer()
        for _ in range(2):  # the second finds the only credit back
            reply = c.call("f", "fail", "[]", timeout_ms=1000)
            self.assertEqual((reply.code, reply.message), (pb.BAD_REQUEST, "count must be 1..20"))
        self.assertEqual(args_of(c.call("f", "echo", "[7]", timeout_ms=1000)), [7])
        self.assertTrue(eventually(lambda: w.stats().running == 0))
        self.assertEqual(w.stats().handler_errors, 0)

    def test_a_handler_raising_any_base_exception_answers_internal(self):
        # As the C++ SDK: not only Exception. The one handler thread lives on.
        svc = Service("x", capacity=1)

        def interrupt(req):
            raise KeyboardInterrupt
        svc.on("exit", lambda req: sys.exit(3))
        svc.on("interrupt", interrupt)
        svc.on("echo", lambda req: req.reply(*req.args))
        w = self.start_worker(svc, threads=1)
        c = self.peer()
        reply = c.call("x", "exit", timeout_ms=1000)
        self.assertEqual((reply.code, reply.message, reply.silent), (pb.INTERNAL, "SystemExit: 3", False))
        reply = c.call("x", "interrupt", timeout_ms=1000)
        self.assertEqual((reply.code, reply.message, reply.silent), (pb.INTERNAL, "KeyboardInterrupt", False))
        self.assertEqual(args_of(c.call("x", "echo", "[7]", timeout_ms=1000)), [7])
        self.assertEqual(w.stats().handler_errors, 2)

    def test_exactly_one_final_reply(self):
        self.start_worker(self.service())
        c = self.peer()
        rid = c.submit("t", "twice")
        replies = [e.reply for e in c.collect(0.5) if e.WhichOneof("kind") == "reply"]
        self.assertEqual([(r.id, args_of(r)) for r in replies], [(rid, [1])])

    def test_binary_attachments(self):
        self.start_worker(self.service())
        c = self.peer()
        rid = c.next_id + 1
        env = pb.Envelope()
        r = env.request
        r.id, r.service, r.event, r.nsp, r.wants_reply, r.timeout_ms = \
            f"c1:{rid}", "t", "echo", "/", True, 5000
        r.args = b'[{"_placeholder":true,"num":0},"x",{"b":{"_placeholder":true,"num":1}}]'
        r.attachments.extend([b"\x00\x01", b"\xff"])
        c.next_id = rid
        c.send(env)
        reply = c.reply_to(f"c1:{rid}").reply
        self.assertEqual(args_of(reply), [{"_placeholder": True, "num": 0}, "x",
                                          {"b": {"_placeholder": True, "num": 1}}])
        self.assertEqual(list(reply.attachments), [b"\x00\x01", b"\xff"])


class CapacityTest(BrokerTest):
    def test_capacity_one_holds_the_second_request(self):
        started, release = Recorder(), threading.Event()
        running, peak, lock = [0], [0], threading.Lock()
        svc = Service("one", capacity=1)

        @svc.on("work")
        def work(req):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            started.put(req.args[0])
            release.wait(10)
            with lock:
                running[0] -= 1
            req.reply(req.args[0])

        # More threads than capacity: only the broker's credits limit concurrency.
        self.start_worker(svc, threads=4)
        c = self.peer()
        first = c.submit("one", "work", "[1]", timeout_ms=10000)
        second = c.submit("one", "work", "[2]", timeout_ms=10000)
        self.assertEqual(started.get("first request"), 1)
        self.assertTrue(eventually(lambda: self.broker.metric("sidecast_broker_queue_depth",
                                                              service="one") == 1),
                        "the second request is not waiting in the broker's queue")
        self.assertTrue(started.empty_for(0.3), "the second request ran beside the first")
        release.set()
        self.assertEqual(started.get("second request"), 2)
        self.assertEqual(args_of(c.reply_to(first).reply), [1])
        self.assertEqual(args_of(c.reply_to(second).reply), [2])
        self.assertEqual(peak[0], 1)


    def test_requests_past_the_handler_queue_limit_are_answered_busy(self):
        # Capacity 4 but one handler thread and room for one waiting request
        # (queue_limit): the broker's credits let four in, the last two are
        # answered BUSY at once, counted, as in the C++ SDK.
        started, release = Recorder(), threading.Event()
        svc = Service("q", capacity=4)

        @svc.on("work")
        def work(req):
            started.put(req.args[0])
            release.wait(10)
            req.reply(req.args[0])

        w = self.start_worker(svc, threads=1, queue_limit=1)
        c = self.peer()
        first = c.submit("q", "work", "[1]", timeout_ms=10000)
        self.assertEqual(started.get("first request"), 1)
        second = c.submit("q", "work", "[2]", timeout_ms=10000)
        refused = [c.submit("q", "work", f"[{i}]", timeout_ms=10000) for i in (3, 4)]
        for rid in refused:
            reply = c.reply_to(rid).reply
            self.assertEqual((Code(reply.code), reply.message), (Code.BUSY, "the worker's handler queue is full"))
        self.assertEqual(w.stats().requests_refused, 2)
        release.set()
        self.assertEqual(args_of(c.reply_to(first).reply), [1])
        self.assertEqual(args_of(c.reply_to(second).reply), [2])
        self.assertEqual(started.get("second request"), 2)
        self.assertTrue(started.empty_for(0.3), "a refused request ran")

    def test_queue_limit_must_be_positive(self):
        with self.assertRaises(ValueError):
            Worker(self.broker.router, queue_limit=0)
        with self.assertRaises(ValueError):
            Worker(self.broker.router, outbox_limit=0)

    def test_a_full_outbox_never_costs_an_answer(self):
        # Four threads keep an outbox of two full of broadcasts, which wait
        # no time for room and are dropped: the answers find it full too,
        # and go beside it. One dropped would keep the broker's only credit
        # for good, and every call after it would end UNAVAILABLE.
        svc = Service("o", capacity=1)
        svc.on("go", lambda req: req.reply(req.args[0]))
        # Answered twice (an ack, then the silent reply): the ack must still
        # go first, or the broker ends the job on the reply and drops it.
        svc.on("early", lambda req: [req.ack(req.args[0]), req.reply()])
        w = self.start_worker(svc, outbox_limit=2, outbox_wait=0.0)
        stop = threading.Event()

        def flood():
            for _ in range(1_000_000):
                if stop.is_set():
                    return
                w.broadcast("spam", 1)
        floods = [threading.Thread(target=flood) for _ in range(4)]
        for t in floods:
            t.start()
        try:
            c = self.peer()
            def ask(i):  # the early ack is the answer of "early" (its reply is silent)
                if i % 2 == 0:
                    return c.call("o", "go", f"[{i}]", timeout_ms=2000)
                env = c.reply_to(c.submit("o", "early", f"[{i}]", timeout_ms=2000), 4.0, final=False)
                return env.reply if env is not None else None
            answers = [ask(i) for i in range(20)]
        finally:
            stop.set()
            for t in floods:
                t.join()
        self.assertEqual([(r.code, args_of(r)) if r else None for r in answers], [(pb.OK, [i]) for i in range(20)])
        self.assertGreater(w.stats().outbox_dropped, 0, "the outbox was never full: the test tested nothing")
        self.assertEqual(args_of(c.call("o", "go", "[20]", timeout_ms=2000)), [20])


class HeartbeatTest(BrokerTest):
    heartbeat_ms = 300  # the broker drops a worker silent for 900 ms

    def test_long_handlers_do_not_block_heartbeats(self):
        calls = Recorder()
        svc = Service("slow", capacity=2)

        @svc.on("sleep")
        def sleep(req):
            calls.put("sleep")
            time.sleep(2.0)  # blocking, not req.sleep(): > 6 heartbeat intervals
            return "slept"

        @svc.on("spin")
        def spin(req):
            calls.put("spin")
            until = time.monotonic() + 2.0  # holds the GIL but for its switch interval
            n = 0
            while time.monotonic() < until:
                n += 1
            return "spun"

        w = self.start_worker(svc)
        c = self.peer()
        self.assertTrue(eventually(lambda: self.broker.workers("slow") == 1))
        ids = [c.submit("slow", "sleep", timeout_ms=10000), c.submit("slow", "spin", timeout_ms=10000)]
        self.assertEqual({calls.get(), calls.get()}, {"sleep", "spin"})
        samples = []
        until = time.monotonic() + 1.7
        while time.monotonic() < until:
            samples.append(self.broker.workers("slow"))
            time.sleep(0.1)
        self.assertTrue(samples and all(s == 1 for s in samples),
                        f"the broker dropped the worker: {samples}\n{self.broker.process.output()}")
        self.assertEqual(args_of(c.reply_to(ids[0]).reply), ["slept"])
        self.assertEqual(args_of(c.reply_to(ids[1]).reply), ["spun"])
        self.assertTrue(calls.empty_for(0.2), "a handler ran twice: the job was re-dispatched")
        self.assertEqual(w.stats().reconnects, 0)
        self.assertTrue(w.connected)
        self.assertNotIn("peer pyw missed", self.broker.process.output())
        self.assertFalse(self.broker.metric("sidecast_broker_requests_total", service="slow",
                                            outcome="worker_lost"))


class CancelTest(BrokerTest):
    def waiting_service(self, seen):
        svc = Service("c", capacity=2)

        @svc.on("wait")
        def wait(req):
            seen.put("started")
            cancelled = req.cancelled.wait(5)
            seen.put((cancelled, req.cancel_reason))

        return svc

    def test_deadline_gives_timeout_and_cancels_the_handler(self):
        seen = Recorder()
        self.start_worker(self.waiting_service(seen))
        c = self.peer()
        started = time.monotonic()
        reply = c.call("c", "wait", timeout_ms=300)
        self.assertEqual(seen.get(), "started")
        self.assertIsNotNone(reply)
        self.assertEqual(reply.code, pb.TIMEOUT)
        self.assertLess(time.monotonic() - started, 2)
        self.assertEqual(seen.get("the handler's cancellation"), (True, Code.TIMEOUT))

    def test_a_reply_past_the_deadline_loses_to_the_timeout(self):
        # The broker is stopped across the deadline, and the handler answers
        # while it is stopped: on waking it has both the expired deadline and
        # the reply to read. The requester must get `timeout`, never the
        # late answer, and nothing twice.
        seen, go = Recorder(), threading.Event()
        svc = Service("late", capacity=1)

        @svc.on("wait")
        def wait(req):
            seen.put("started")
            go.wait(5)
            seen.put(req.reply("late"))

        w = self.start_worker(svc)
        c = self.peer()
        rid = c.submit("late", "wait", timeout_ms=300)
        self.assertEqual(seen.get(), "started")
        # Stopped while it waits in its poll: a stop inside a turn resumes
        # that turn with the clock it read before (seen once, on a loaded
        # host), where the reply read in it is not late.
        time.sleep(0.05)
        self.broker.process.signal(signal.SIGSTOP)
        try:
            time.sleep(0.45)
            go.set()
            self.assertTrue(seen.get("the handler's reply"))
            self.assertTrue(eventually(lambda: w.stats().replies == 1))
        finally:
            self.broker.process.signal(signal.SIGCONT)
        reply = c.reply_to(rid)
        self.assertIsNotNone(reply, "no answer")
        self.assertEqual(reply.reply.code, pb.TIMEOUT, f"got {reply}")
        self.assertEqual(c.collect(0.3), [], "a second answer reached the requester")
        self.assertTrue(eventually(lambda: self.broker.metric(
            "sidecast_broker_requests_total", service="late", outcome="timeout") == 1))

    def test_requester_cancel_reaches_the_handler(self):
        seen = Recorder()
        w = self.start_worker(self.waiting_service(seen))
        c = self.peer()
        rid = c.submit("c", "wait", timeout_ms=10000)
        self.assertEqual(seen.get(), "started")
        c.cancel(rid)
        self.assertEqual(seen.get("the handler's cancellation"), (True, Code.CANCELLED))
        self.assertEqual(w.stats().cancels, 1)

    def test_stop_cancels_running_handlers(self):
        seen = Recorder()
        w = self.start_worker(self.waiting_service(seen))
        c = self.peer()
        c.submit("c", "wait", timeout_ms=10000)
        self.assertEqual(seen.get(), "started")
        started = time.monotonic()
        w.stop()
        self.assertLess(time.monotonic() - started, 2)
        self.assertEqual(seen.get("the handler's cancellation"), (True, Code.CANCELLED))
        self.assertFalse(w.connected)

    def test_stop_cancels_a_handler_that_already_replied(self):
        # A handler that answers, then keeps working until cancelled (progress
        # emits after its reply): stop() used to wait for it for good, since
        # only requests not yet answered were cancelled.
        seen = Recorder()
        svc = Service("r", capacity=1)

        @svc.on("work")
        def work(req):
            req.reply("done")
            seen.put("replied")
            seen.put(req.cancelled.wait(WAIT))

        w = self.start_worker(svc)
        c = self.peer()
        reply = c.call("r", "work", timeout_ms=10000)
        self.assertIsNotNone(reply)
        self.assertEqual(reply.code, pb.OK)
        self.assertEqual(seen.get(), "replied")
        started = time.monotonic()
        w.stop()
        self.assertLess(time.monotonic() - started, 2)
        self.assertTrue(seen.get("the handler's cancellation"), "the handler was never cancelled")

    def test_a_request_past_its_deadline_while_queued_does_not_run(self):
        # One handler thread, held by a long job: a request that waits behind
        # it past its deadline is answered TIMEOUT (by the broker) and is not
        # run when the thread frees: its client was told it failed.
        seen, go = Recorder(), threading.Event()
        svc = Service("q", capacity=2)

        @svc.on("work")
        def work(req):
            seen.put(req.args)
            if req.args == ["hold"]:
                go.wait(WAIT)
            req.reply("ran")

        w = self.start_worker(svc, threads=1)
        c = self.peer()
        c.submit("q", "work", '["hold"]', timeout_ms=10000)
        self.assertEqual(seen.get(), ["hold"])
        reply = c.call("q", "work", '["late"]', timeout_ms=300)
        self.assertIsNotNone(reply)
        self.assertEqual(reply.code, pb.TIMEOUT)
        go.set()
        self.assertTrue(eventually(lambda: w.stats().requests_expired == 1))
        self.assertTrue(seen.empty_for(0.3), "the request past its deadline ran")

    def test_an_ack_timeout_that_is_no_number_is_refused_and_holds_no_place(self):
        w = Worker(self.broker.router, self.broker.xsub, worker_id="acks", pending_acks_limit=2)
        try:
            for timeout in (None, -1, float("nan"), float("inf"), "5"):
                with self.assertRaises(ValueError):
                    w.check_socket("/", "gw.x", lambda state: None, timeout=timeout)
            self.assertEqual(len(w._core.acks), 0)
            self.assertEqual(w.stats().acks_refused, 0)
        finally:
            w.stop()

    def test_stop_from_an_ack_done_callback_tells_running_handlers(self):
        # A done-callback runs on the I/O thread; a stop() there used to wait
        # for the other handler's deadline (10 s), which only the I/O loop's
        # exit, after stop() returned, would have cancelled.
        seen = Recorder()
        svc = self.waiting_service(seen)

        @svc.on("ask")
        def ask(req):
            req.emit_with_ack("question", timeout=5).add_done_callback(lambda _: w.stop())

        w = self.start_worker(svc)
        gw = self.gateway("gwT")
        gw.submit("c", "wait", sid="gwT.a", timeout_ms=10000)
        self.assertEqual(seen.get("the waiting handler"), "started")
        gw.submit("c", "ask", sid="gwT.b", timeout_ms=10000)
        question = gw.next("emit")
        self.assertIsNotNone(question, "the question never reached the gateway")
        answer = pb.Envelope()
        answer.reply.id = question.emit.ack_id
        started = time.monotonic()
        gw.send(answer)
        self.assertEqual(seen.get("the waiting handler's cancellation"), (True, Code.CANCELLED))
        self.assertTrue(w._core.stopped.wait(WAIT), "stop() from the done-callback did not finish")
        self.assertLess(time.monotonic() - started, 3)

    def test_stop_before_start_leaves_nothing_to_start(self):
        w = Worker(self.broker.router, self.broker.xsub, worker_id="early")
        w.add(self.waiting_service(Recorder()))
        w.stop()
        started = time.monotonic()
        w.run(handle_signals=False)  # starts nothing, and returns at once
        self.assertLess(time.monotonic() - started, 2)
        self.assertIsNone(w._core.io_thread)
        self.assertIsNone(w._core.context, "a ZeroMQ context (and its thread) left behind")

    def test_stop_answers_awaited_acks_and_starts_no_queued_handler(self):
        # One handler thread: the first request's handler holds it, awaiting
        # a client ack that never comes; the second request waits in the
        # pool's queue. Stopping must answer the ack (future and callback)
        # with CANCELLED, as the C++ SDK does, and must not start the second.
        seen = Recorder()
        svc = Service("ask", capacity=2)

        @svc.on("ask")
        def ask(req):
            seen.put(("started", req.sid))
            future = req.emit_with_ack("question", timeout=30,
                                       callback=lambda r: seen.put(("callback", r.code)))
            req.cancelled.wait(WAIT)
            seen.put(("future", future.result(WAIT).code))
            seen.put(("refused after stop", req.emit_with_ack("again") is None))

        w = self.start_worker(svc, threads=1)
        gw = self.gateway("gwT")
        gw.submit("ask", "ask", sid="gwT.a", timeout_ms=10000)
        self.assertEqual(seen.get("the first handler"), ("started", "gwT.a"))
        self.assertIsNotNone(gw.next("emit"), "the question never reached the gateway")
        gw.submit("ask", "ask", sid="gwT.b", timeout_ms=10000)
        self.assertTrue(eventually(lambda: w.stats().requests == 2))
        w.stop()
        got = [seen.get("what the handler saw after stop") for _ in range(3)]
        self.assertCountEqual(got, [("future", Code.CANCELLED), ("callback", Code.CANCELLED),
                                    ("refused after stop", True)])
        self.assertTrue(seen.empty_for(0.3), "the queued handler started after stop")


def job_service(release):
    """"work" answers [worker id, attempt]; given ``release``, a request whose
    args are ["hold"] first waits for it (at most WAIT; cancelled: no answer)."""
    svc = Service("job", capacity=2)

    @svc.on("work")
    def work(req):
        if release is not None and req.args == ["hold"]:
            until = time.monotonic() + WAIT
            while not release.is_set() and not req.cancelled.is_set() and time.monotonic() < until:
                release.wait(0.01)
            if req.cancelled.is_set():
                return None  # stopping: no answer
        req.reply(req.worker_id, req.attempt)

    return svc


class DrainTest(BrokerTest):
    """Worker.drain(): the broker gives the worker nothing new while what it
    holds runs to its end and is answered from it; then it stops and says
    Goodbye. A drain that times out stops the worker, and the broker gives
    what it held to another worker at once (heartbeats 1 s apart, so 3 s
    would pass before its silence told the broker)."""

    heartbeat_ms = 1000

    def test_a_draining_worker_finishes_what_it_holds_and_gets_nothing_new(self):
        release = threading.Event()
        w1 = self.start_worker(job_service(release), worker_id="pyA")
        c = self.peer()
        held = c.submit("job", "work", '["hold"]', timeout_ms=10000)
        self.assertTrue(eventually(lambda: w1.stats().requests == 1, WAIT))
        drained = queue.Queue()
        threading.Thread(target=lambda: drained.put(w1.drain(WAIT)), daemon=True).start()
        self.assertTrue(eventually(
            lambda: self.broker.metric("sidecast_broker_messages_received_total", kind="drain") == 1, WAIT))
        self.start_worker(job_service(None), worker_id="pyB")
        for _ in range(4):
            reply = c.call("job", "work", "[]")
            self.assertEqual((reply.code, args_of(reply)), (pb.OK, ["pyB", 1]),
                             "a draining worker was given new work")
        self.assertTrue(drained.empty(), "drain() returned while a request still ran")
        self.assertEqual((w1.stats().running, w1.stats().draining), (1, True))
        release.set()
        reply = c.next("reply", where=lambda env: env.reply.id == held)
        self.assertIsNotNone(reply)
        self.assertEqual((reply.reply.code, args_of(reply.reply)), (pb.OK, ["pyA", 1]))
        self.assertTrue(drained.get(timeout=WAIT), "drain() said something was left running")
        self.assertEqual(w1.stats().running, 0)
        self.assertTrue(eventually(
            lambda: self.broker.metric("sidecast_broker_messages_received_total", kind="goodbye") == 1, WAIT))
        self.assertFalse(w1.connected)

    def test_a_drain_that_times_out_hands_what_was_held_to_another_worker_at_once(self):
        never = threading.Event()
        w1 = self.start_worker(job_service(never), worker_id="pyA")
        c = self.peer()
        held = c.submit("job", "work", '["hold"]', timeout_ms=20000)
        self.assertTrue(eventually(lambda: w1.stats().requests == 1, WAIT))
        self.start_worker(job_service(None), worker_id="pyB")
        started = time.monotonic()
        self.assertFalse(w1.drain(0.1))
        reply = c.next("reply", timeout=2.5, where=lambda env: env.reply.id == held)
        self.assertIsNotNone(reply, "the held request did not go to the other worker at once")
        self.assertEqual((reply.reply.code, args_of(reply.reply)), (pb.OK, ["pyB", 2]))
        self.assertLess(time.monotonic() - started, 2.5)

    def test_a_second_signal_ends_the_process_even_if_a_handler_ignores_its_cancellation(self):
        # Worker.run() in a process of its own, its handler deaf to
        # req.cancelled: the first SIGTERM drains (up to 30 s), the second
        # stops, and past STOP_GRACE the process ends without the handler.
        script = f"""
import time
from sidecast_worker import Service, Worker
svc = Service("deaf", capacity=1)
@svc.on("work")
def work(req):
    print("running", flush=True)
    time.sleep(60)
w = Worker({self.broker.router!r}, {self.broker.xsub!r}, worker_id="deaf")
w.add(svc)
w.run(drain_timeout=30)
"""
        import subprocess
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
        c = self.peer()
        held = c.submit("deaf", "work", "[]", timeout_ms=60000)
        self.assertEqual(proc.stdout.readline().strip(), "running")
        proc.send_signal(signal.SIGTERM)
        self.assertTrue(eventually(lambda: self.broker.metric(
            "sidecast_broker_draining_workers", service="deaf") == 1, WAIT))
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.fail("a second SIGTERM did not end the process")
        self.assertEqual(code, 128 + signal.SIGTERM)
        self.assertLess(time.monotonic() - started, Worker.STOP_GRACE + 2)
        self.assertIsNone(c.reply_to(held, timeout=0.2), "the job was answered by a worker that never finished it")

    def test_a_drain_waits_for_a_handler_that_runs_on_after_its_reply(self):
        # As the C++ SDK's drain (which counts the handles still held): the
        # handler's work after its final answer is not cut by the stop().
        seen = Recorder()
        svc = Service("after", capacity=1)

        @svc.on("work")
        def work(req):
            req.reply("done")
            time.sleep(0.5)
            seen.put(req.cancelled.is_set())

        w = self.start_worker(svc, worker_id="pyAfter")
        c = self.peer()
        self.assertEqual(c.call("after", "work", timeout_ms=5000).code, pb.OK)
        started = time.monotonic()
        self.assertTrue(w.drain(5))
        self.assertGreaterEqual(time.monotonic() - started, 0.3)
        self.assertFalse(seen.get("the handler's end"), "cancelled before it ended")

    def test_drain_from_a_handler_is_refused(self):
        refused = queue.Queue()
        svc = Service("selfish", capacity=1)
        w = None

        @svc.on("go")
        def go(req):
            try:
                w.drain(1)
            except RuntimeError as e:
                refused.put(str(e))

        w = self.start_worker(svc)
        self.peer().call("selfish", "go")
        self.assertIn("would wait for itself", refused.get(timeout=WAIT))


class FakeBroker:
    """A broker played by the test (a ROUTER on a free loopback port) that one
    worker "wd" connects to, for orders the real broker's timing cannot make
    certain. Every wait is bounded."""

    def __init__(self, ctx):
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.RCVTIMEO, int(WAIT * 1000))
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # as the real broker: a new socket takes the id
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.xsub = ctx.socket(zmq.XSUB)
        self.xsub.setsockopt(zmq.LINGER, 0)
        self.publish = f"tcp://127.0.0.1:{self.xsub.bind_to_random_port('tcp://127.0.0.1')}"

    def close(self):
        self.router.close()
        self.xsub.close()

    def next(self):
        """The worker's next message that is not a heartbeat."""
        while True:
            _, data = self.router.recv_multipart()
            env = pb.Envelope()
            env.ParseFromString(data)
            if env.WhichOneof("kind") != "heartbeat":
                return env

    def send(self, env):
        self.router.send_multipart([b"wd", env.SerializeToString()])

    def welcome(self, worker, interval_ms, **fields):
        """Takes the Hello and welcomes it: heartbeats every interval_ms (the
        fake sends none; the worker gives up on it after three), and Welcome
        `fields`. Returns the Welcome, to send again changed."""
        hello = self.next().hello
        env = pb.Envelope()
        env.welcome.protocol_version = hello.protocol_version
        env.welcome.heartbeat_interval_ms = interval_ms
        env.welcome.heartbeat_liveness = 3
        env.welcome.hello = hello.hello
        for name, value in fields.items():
            setattr(env.welcome, name, value)
        self.send(env)
        if not worker.wait_connected(WAIT):
            raise AssertionError("the worker never took the Welcome")
        return env

    def until_hello(self):
        """Reads the worker's messages up to its next Hello, numbering each
        after the Hello before as the broker counts them (heartbeats too).
        Returns that Hello, and each emit's first argument -> its number."""
        after_hello, number_of = 0, {}
        while True:
            _, data = self.router.recv_multipart()
            env = pb.Envelope()
            env.ParseFromString(data)
            kind = env.WhichOneof("kind")
            if kind == "hello":
                return env.hello, number_of
            after_hello += 1
            if kind == "emit":
                number_of[args_of(env.emit)[0]] = after_hello


class FakeBrokerTest(unittest.TestCase):
    """A worker "wd" serving self.service(), connected to a FakeBroker."""
    worker_options = {}

    def setUp(self):
        self.ctx = zmq.Context()
        self.broker = FakeBroker(self.ctx)
        self.worker = Worker(self.broker.endpoint, self.broker.publish, worker_id="wd", **self.worker_options)
        self.worker.add(self.service())
        self.worker.start()

    def tearDown(self):
        self.worker.stop()
        self.broker.close()
        self.ctx.term()

    def job(self, request_id, args, attempt):
        env = pb.Envelope()
        env.request.id, env.request.service, env.request.event = request_id, "svc", "work"
        env.request.args, env.request.wants_reply = args.encode(), True
        env.request.timeout_ms, env.request.attempt = 5000, attempt
        self.broker.send(env)


class DrainConfirmationTest(FakeBrokerTest):
    """drain() with nothing running waits for the broker's own Drain: on the
    worker's pipe every job the broker dispatched before it comes first, so a
    worker cannot stop between a job's dispatch and its arrival. A broker of a
    build before Drain refuses it (BAD_REQUEST), which ends the wait too."""

    def service(self):
        svc = Service("svc", capacity=1)
        svc.on("work", lambda req: "ran")
        return svc

    def drain_in_background(self, timeout):
        drained = queue.Queue()
        threading.Thread(target=lambda: drained.put(self.worker.drain(timeout)), daemon=True).start()
        self.assertEqual(self.broker.next().WhichOneof("kind"), "drain")
        return drained

    def test_a_job_dispatched_before_the_broker_read_the_drain_is_run_here(self):
        self.broker.welcome(self.worker, 1000)
        drained = self.drain_in_background(WAIT)
        time.sleep(0.3)  # long enough for a worker that does not wait to be gone
        self.assertTrue(drained.empty(), "it stopped before the broker confirmed")
        self.job("c:1", "[]", 1)
        confirm = pb.Envelope()
        confirm.drain.SetInParent()
        self.broker.send(confirm)
        reply = self.broker.next()
        self.assertEqual(reply.WhichOneof("kind"), "reply")
        self.assertEqual((reply.reply.id, reply.reply.code, args_of(reply.reply)), ("c:1", pb.OK, ["ran"]))
        self.assertEqual(self.broker.next().WhichOneof("kind"), "goodbye")
        self.assertTrue(drained.get(timeout=WAIT))

    def test_a_broker_that_refuses_the_drain_ends_the_wait(self):
        self.broker.welcome(self.worker, 10000)  # its silence would end the wait only after 30 s
        drained = self.drain_in_background(10)
        refusal = pb.Envelope()
        refusal.error.code, refusal.error.message = pb.BAD_REQUEST, "malformed envelope"
        self.broker.send(refusal)
        self.assertTrue(drained.get(timeout=WAIT), "it waited for a confirmation that cannot come")


class MaxMessageBytesTest(FakeBrokerTest):
    """A message larger than the broker takes (Welcome.max_message_bytes, its
    --max-message-bytes) would cost the worker its connection over tcp, and
    every message in flight on it: an answer that large goes as INTERNAL,
    and an emit that large is dropped, counted. The worker keeps serving."""

    def service(self):
        svc = Service("svc", capacity=2)

        @svc.on("work")
        def work(req):
            if req.args[0] == "big":
                return "x" * 8000
            if req.args[0] == "emit":
                req.emit("huge", "x" * 8000)
            if req.args[0] == "emit_with_ack":
                acked = req.emit_with_ack("huge", "x" * 8000, timeout=30)
                return acked.result(WAIT).message
            return "small"

        return svc

    def test_a_large_answer_goes_as_an_error_and_a_large_emit_is_dropped(self):
        self.broker.welcome(self.worker, 1000, max_message_bytes=4096)
        self.job("c:1", '["big"]', 1)
        reply = self.broker.next()
        self.assertEqual((reply.WhichOneof("kind"), reply.reply.id, reply.reply.code), ("reply", "c:1", pb.INTERNAL))
        self.assertIn("more than the broker takes (4096)", reply.reply.message)
        dropped = self.worker.stats().outbox_dropped
        self.job("c:2", '["emit"]', 1)
        reply = self.broker.next()
        self.assertEqual(reply.WhichOneof("kind"), "reply", "the large emit went out")
        self.assertEqual((reply.reply.id, reply.reply.code, args_of(reply.reply)), ("c:2", pb.OK, ["small"]))
        self.assertEqual(self.worker.stats().outbox_dropped, dropped + 1)
        # An emit_with_ack that large: its callback hears at once, not at its 30 s timeout.
        self.job("c:3", '["emit_with_ack"]', 1)
        reply = self.broker.next()
        self.assertEqual((reply.WhichOneof("kind"), reply.reply.id, reply.reply.code), ("reply", "c:3", pb.OK))
        self.assertIn("more than the broker takes (4096)", args_of(reply.reply)[0])


class ProbeTest(FakeBrokerTest):
    """After a stall of its own thread the broker sends a peer nothing until
    the peer shows which connection it is on: the link answers its probe (a
    Heartbeat with a number) at once, on the socket it came on."""

    def service(self):
        svc = Service("svc", capacity=1)
        svc.on("work", lambda req: "ran")
        return svc

    def test_the_probe_is_answered_at_once(self):
        self.broker.welcome(self.worker, 10000)
        probe = pb.Envelope()
        probe.heartbeat.probe = 7
        self.broker.send(probe)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:  # its own heartbeats carry no probe
            _, data = self.broker.router.recv_multipart()
            env = pb.Envelope()
            env.ParseFromString(data)
            if env.WhichOneof("kind") == "heartbeat" and env.heartbeat.probe:
                self.assertEqual(env.heartbeat.probe, 7)
                return
        self.fail("the probe was not answered")


class FiveEmitsTest(FakeBrokerTest):
    """A worker whose job "work" emits 0..4 to its sid, then answers."""

    def service(self):
        svc = Service("svc", capacity=1)

        @svc.on("work")
        def work(req):
            for i in range(5):
                req.emit("n", i)
            return "done"

        return svc

    def work(self):
        """Sends job c:1 (sid gwT.x)."""
        env = pb.Envelope()
        env.request.id, env.request.service, env.request.event = "c:1", "svc", "work"
        env.request.sid, env.request.nsp, env.request.args = "gwT.x", "/", b"[]"
        env.request.wants_reply, env.request.timeout_ms, env.request.attempt = True, 5000, 1
        self.broker.send(env)


class ResendLostTest(FiveEmitsTest):
    """A worker that found the broker silent replaces its socket; the
    broker's Welcome on the new one says how much of what came after the
    Hello before it read (Welcome.previous_hello, .received). The one-way
    messages beyond that died in the old socket: the worker sends them
    again, in order, and only them (answers go again through jobs sent
    again, not here)."""

    incarnation = 0  # the fake broker's (0: a build before incarnations)

    def test_what_the_broker_did_not_read_goes_again(self):
        # The fake sends no heartbeat: a new socket after 0.6 s.
        welcome = self.broker.welcome(self.worker, 200, incarnation=self.incarnation)
        self.assertEqual(welcome.welcome.hello, 1)
        self.work()
        hello, number_of = self.broker.until_hello()
        self.assertEqual(hello.hello, 2, "a new socket's Hello")
        self.assertEqual(sorted(number_of), [0, 1, 2, 3, 4])
        # Say only what came up to the second emit was read.
        welcome.welcome.previous_hello, welcome.welcome.received, welcome.welcome.hello = 1, number_of[1], 2
        self.broker.send(welcome)
        again = []
        deadline = time.monotonic() + WAIT
        while len(again) < 3 and time.monotonic() < deadline:
            env = self.broker.next()
            self.assertNotEqual(env.WhichOneof("kind"), "reply", "an answer is not sent again this way")
            if env.WhichOneof("kind") == "emit":
                again.append(args_of(env.emit)[0])
        self.assertEqual(again, [2, 3, 4])
        self.assertTrue(eventually(lambda: self.worker.stats().notices_resent == 3, WAIT), self.worker.stats())
        self.assertGreater(self.worker.stats().kept_notice_bytes, 0, "those sent again are kept again")


class ResendLostSameIncarnationTest(ResendLostTest):
    """The same, from a broker that says its incarnation: its second Welcome
    is of the same one, the broker that knew the link."""
    incarnation = 7


class ResendOnlyToTheSameBrokerTest(FiveEmitsTest):
    """Welcome.previous_hello and .received say what the broker that welcomed
    the link last read (as core/peer_link.cpp: only a Welcome of that
    broker's incarnation counts). A Welcome of another incarnation names
    nothing lost, whatever those fields say: what it calls unread may have
    gone to another broker (a pair's other one), and sent again it would be
    emitted twice."""

    def welcome_hello(self, hello, incarnation, interval_ms=5000, previous_hello=0, received=0):
        """Welcomes ``hello`` (read already) as broker ``incarnation``."""
        env = pb.Envelope()
        w = env.welcome
        w.protocol_version, w.heartbeat_interval_ms, w.heartbeat_liveness = hello.protocol_version, interval_ms, 3
        w.hello, w.incarnation, w.previous_hello, w.received = hello.hello, incarnation, previous_hello, received
        self.broker.send(env)

    def run_job(self, request_id):
        """Sends job ``request_id`` (it emits 0..4), and returns the first
        argument of every emit the worker sends until the job's reply."""
        env = pb.Envelope()
        env.request.id, env.request.service, env.request.event = request_id, "svc", "work"
        env.request.sid, env.request.nsp, env.request.args = "gwT.x", "/", b"[]"
        env.request.wants_reply, env.request.timeout_ms, env.request.attempt = True, 5000, 1
        self.broker.send(env)
        emitted = []
        while True:
            got = self.broker.next()
            if got.WhichOneof("kind") == "emit":
                emitted.append(args_of(got.emit)[0])
            elif got.WhichOneof("kind") == "reply" and got.reply.id == request_id:
                return emitted

    def test_another_incarnation_names_nothing_lost(self):
        self.broker.welcome(self.worker, 200, incarnation=7)  # no heartbeats: a new socket after 0.6 s
        self.work()
        hello, number_of = self.broker.until_hello()
        self.assertEqual((hello.hello, sorted(number_of)), (2, [0, 1, 2, 3, 4]))
        # Another broker, whose fields would say emits 2, 3 and 4 died.
        self.welcome_hello(hello, 8, previous_hello=1, received=number_of[1])
        # What goes again would go ahead of the next job's emits.
        self.assertEqual(self.run_job("c:2"), [0, 1, 2, 3, 4], "emits the other broker never had went again")
        self.assertEqual(self.worker.stats().notices_resent, 0)

    def test_back_on_the_broker_before_what_went_to_the_other_is_not_sent_again(self):
        """A pair split: the link goes from broker 7 to broker 8, sends it
        emits, then back to 7, which still holds it: 7's Welcome says what it
        read after Hello 1, so what went after Hello 2 (to 8) would count as
        died. Broker 8 welcomed last: 7 is another incarnation, and nothing
        goes again."""
        self.broker.welcome(self.worker, 200, incarnation=7)  # no heartbeats: a new socket after 0.6 s
        self.work()
        hello, first = self.broker.until_hello()
        self.assertEqual((hello.hello, sorted(first)), (2, [0, 1, 2, 3, 4]))
        self.welcome_hello(hello, 8, interval_ms=200)  # a broker that never knew the link
        self.assertEqual(self.run_job("c:2"), [0, 1, 2, 3, 4])
        hello, _ = self.broker.until_hello()
        self.assertEqual(hello.hello, 3)
        # Broker 7 read everything up to Hello 2: only what went to 8 is beyond.
        self.welcome_hello(hello, 7, previous_hello=1, received=first[4])
        self.assertEqual(self.run_job("c:3"), [0, 1, 2, 3, 4], "emits broker 8 had went again to 7")
        self.assertEqual(self.worker.stats().notices_resent, 0)


class AckDeadlinesBoundTest(FakeBrokerTest):
    """A client's ack takes its emit out of the awaited ones at once; the
    deadline it leaves in the heap goes at a rebuild, so the heap stays
    bounded by the acks awaited (pending_acks_limit), not by the ack rate
    times the timeout."""
    limit = 500
    worker_options = {"pending_acks_limit": limit}

    def service(self):
        svc = Service("svc", capacity=1)
        svc.on("work", lambda req: "ran")
        return svc

    def test_acked_emits_leave_the_deadline_heap(self):
        self.broker.welcome(self.worker, 10000)
        core = self.worker._core
        # One never acked, awaited through every rebuild: its deadline stays.
        slow = core.emit_with_ack("/", "gwT.slow", "q", ["slow"], 4.0, None)
        self.assertIsNotNone(slow)
        self.assertEqual(self.broker.next().emit.sid, "gwT.slow")
        largest, total = 0, 0
        for _ in range(20):
            batch = [core.emit_with_ack("/", "gwT.x", "q", [i], 60.0, None) for i in range(self.limit - 1)]
            self.assertNotIn(None, batch, "refused: acks awaited past the limit")
            largest = max(largest, len(core.ack_heap))
            for _ in batch:  # every ack at once
                emit = self.broker.next().emit
                answer = pb.Envelope()
                answer.reply.id, answer.reply.args = emit.ack_id, b"[]"
                self.broker.send(answer)
            for future in batch:
                self.assertEqual(future.result(WAIT).code, Code.OK)
            total += len(batch)
        self.assertGreater(total, 4 * self.limit)
        # Rebuilt past twice the awaited plus 1024 (worker.COMPACT_FLOOR): 2024 here, against about 10000.
        self.assertLessEqual(largest, 5 * self.limit, "the heap grew with the acks that came")
        self.assertEqual(slow.result(WAIT).code, Code.TIMEOUT, "a rebuild lost an awaited ack's deadline")
        self.assertEqual(self.worker.stats().acks_refused, 0)


class ForgetReadTest(FiveEmitsTest):
    """The broker's heartbeats say how much of what the link sent after its
    Hello it read (Heartbeat.broker_read): the worker forgets the one-way
    messages it kept among those, and keeps the rest. Without it they stay
    until a Welcome on a new socket."""

    def heartbeat(self, hello, count):
        env = pb.Envelope()
        env.heartbeat.broker_read.hello, env.heartbeat.broker_read.count = hello, count
        self.broker.send(env)

    def test_what_the_broker_read_is_forgotten(self):
        self.broker.welcome(self.worker, 5000)  # no heartbeats from the fake within the test
        self.work()
        number_of, after_hello = {}, 0  # as the broker counts, heartbeats too
        while "reply" not in number_of:
            _, data = self.broker.router.recv_multipart()
            env = pb.Envelope()
            env.ParseFromString(data)
            after_hello += 1
            if env.WhichOneof("kind") == "emit":
                number_of[args_of(env.emit)[0]] = after_hello
            elif env.WhichOneof("kind") == "reply":
                number_of["reply"] = after_hello
        kept = self.worker.stats().kept_notice_bytes
        self.assertGreater(kept, 0, "the emits were not kept")
        self.heartbeat(0, 100)  # about no Hello of this link's: says nothing
        self.heartbeat(1, number_of[2])
        self.assertTrue(eventually(lambda: self.worker.stats().kept_notice_bytes == kept * 2 // 5, WAIT),
                        self.worker.stats())
        self.heartbeat(1, number_of[4])
        self.assertTrue(eventually(lambda: self.worker.stats().kept_notice_bytes == 0, WAIT), self.worker.stats())

    def test_after_a_broker_restart_what_the_old_one_never_confirmed_is_forgotten(self):
        """A new broker welcomes the worker's next Hello: what the old one
        never confirmed reading no Welcome can name lost any more, and goes
        with the new broker's first heartbeat."""
        self.broker.welcome(self.worker, 5000, incarnation=7)
        self.work()
        while self.broker.next().WhichOneof("kind") != "reply":
            pass
        self.assertGreater(self.worker.stats().kept_notice_bytes, 0, "the emits were not kept")
        refused = pb.Envelope()
        refused.error.code = pb.NOT_REGISTERED
        self.broker.send(refused)  # the new broker: the link says Hello again
        self.broker.welcome(self.worker, 5000, incarnation=8)
        self.heartbeat(2, 0)
        self.assertTrue(eventually(lambda: self.worker.stats().kept_notice_bytes == 0, WAIT), self.worker.stats())


class HeartbeatSaysWhatWasReadTest(FakeBrokerTest):
    """The link's heartbeats say how far it read what the broker sent, in the
    broker's count (Welcome.sent, then every message but a Welcome), after
    the Welcome to which Hello (Heartbeat.peer_read): the broker forgets
    what it kept of that."""

    def service(self):
        svc = Service("svc", capacity=1)

        @svc.on("busy")
        def busy(req):
            for i in range(100):  # an emit every 10 ms for a second
                req.emit("n", i)
                time.sleep(0.01)
            return "done"

        return svc

    def test_the_heartbeat_says_how_far_the_link_read(self):
        self.broker.welcome(self.worker, 200, sent=5)  # the worker's liveness: 0.6 s
        for _ in range(2):
            env = pb.Envelope()
            env.heartbeat.SetInParent()
            self.broker.send(env)
        deadline = time.monotonic() + WAIT
        said = []  # (hello, read_to) of each heartbeat; one may come before the two were read
        while (not said or said[-1][1] < 5 + 2) and time.monotonic() < deadline:
            _, data = self.broker.router.recv_multipart()
            env = pb.Envelope()
            env.ParseFromString(data)
            if env.WhichOneof("kind") == "heartbeat" and env.heartbeat.HasField("peer_read"):
                said.append((env.heartbeat.peer_read.hello, env.heartbeat.peer_read.read_to))
        self.assertTrue(said, "no heartbeat said what the link read")
        self.assertEqual(said[-1], (1, 5 + 2))

    def test_a_link_that_never_idles_still_says_it(self):
        """Heartbeats go every interval, however much else the link sends."""
        self.broker.welcome(self.worker, 200)  # the worker's liveness: 0.6 s
        env = pb.Envelope()
        env.request.id, env.request.service, env.request.event = "c:1", "svc", "busy"
        env.request.sid, env.request.nsp, env.request.args = "gwT.x", "/", b"[]"
        env.request.wants_reply, env.request.timeout_ms, env.request.attempt = True, 5000, 1
        self.broker.send(env)
        beats, emits, beat_at = 0, 0, 0.0
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if time.monotonic() >= beat_at:  # the fake broker's: the worker keeps its socket
                beat = pb.Envelope()
                beat.heartbeat.SetInParent()
                self.broker.send(beat)
                beat_at = time.monotonic() + 0.1
            if not self.broker.router.poll(20):
                continue
            _, data = self.broker.router.recv_multipart()
            env = pb.Envelope()
            env.ParseFromString(data)
            kind = env.WhichOneof("kind")
            if kind == "reply":
                break
            emits += kind == "emit"
            beats += kind == "heartbeat" and env.heartbeat.HasField("peer_read")
        self.assertEqual(emits, 100)
        self.assertGreaterEqual(beats, 3, "heartbeats waited for the link to idle")


class TailWaitsForWhatIsSentAgainTest(FakeBrokerTest):
    """What the link reads on its new socket before the Welcome (the tail) is
    the newest the broker sent: it waits until the broker has sent again
    what died in the old socket and marked the end of it
    (Heartbeat.resent). Without the wait the jobs run tail first."""

    def service(self):
        self.ran = []
        svc = Service("svc", capacity=1)

        @svc.on("work")
        def work(req):
            self.ran.append(req.id)
            return "done"

        return svc

    def tail_then_resent(self):
        """Job "tail" on the worker's new socket before its Welcome (which
        promises a mark), then "resent" after it."""
        welcome = self.broker.welcome(self.worker, 200, incarnation=7)  # the fake sends no heartbeat: a new socket after 0.6 s
        hello, _ = self.broker.until_hello()
        self.assertEqual(hello.hello, 2, "a new socket's Hello")
        self.job("tail", "[]", 1)  # on the new socket, before the Welcome
        time.sleep(0.05)
        self.assertEqual(self.ran, [], "the tail was not held")
        welcome.welcome.previous_hello, welcome.welcome.hello, welcome.welcome.marks_resent = 1, 2, True
        self.broker.send(welcome)
        self.job("resent", "[]", 1)

    def test_without_a_mark_the_tail_runs_in_the_end(self):
        self.tail_then_resent()
        beat = pb.Envelope()
        beat.heartbeat.SetInParent()
        for _ in range(15):  # 1.5 s, past two livenesses (1.2 s); the worker keeps its socket
            self.broker.send(beat)
            time.sleep(0.1)
        self.assertTrue(eventually(lambda: len(self.ran) == 2, WAIT), self.ran)
        self.assertEqual(self.ran, ["resent", "tail"])

    def test_the_tail_runs_after_what_is_sent_again(self):
        self.tail_then_resent()
        mark = pb.Envelope()
        mark.heartbeat.resent = True
        self.broker.send(mark)
        self.job("after", "[]", 1)
        self.assertTrue(eventually(lambda: len(self.ran) == 3, WAIT), self.ran)
        self.assertEqual(self.ran, ["resent", "tail", "after"])


class HoldUntilWelcomeTest(FakeBrokerTest):
    """What a worker's handlers send while its link waits for the Welcome of
    a new socket waits in the outbox: the Welcome names what died in the
    old socket, which goes again first. Sent at once, what waited (the
    handler's last emits, and its reply) would overtake it."""

    def service(self):
        svc = Service("svc", capacity=1)
        self.second_half_sent = threading.Event()

        @svc.on("work")
        def work(req):
            for i in range(5):
                req.emit("n", i)
            # The first five went into the socket the worker replaces.
            eventually(lambda: self.worker.stats().reconnects >= 1, WAIT)
            for i in range(5, 10):
                req.emit("n", i)
            self.second_half_sent.set()
            return "done"

        return svc

    def test_what_waited_goes_after_what_died(self):
        welcome = self.broker.welcome(self.worker, 200)  # the fake sends no heartbeat: a new socket after 0.6 s
        self.job("c:1", "[]", 1)
        hello, number_of = self.broker.until_hello()  # the old socket's messages
        self.assertEqual(hello.hello, 2, "a new socket's Hello")
        self.assertEqual(sorted(number_of), [0, 1, 2, 3, 4])
        self.assertTrue(self.second_half_sent.wait(WAIT))
        # Emits 5-9 and the reply wait for the Welcome.
        self.assertTrue(eventually(lambda: self.worker.stats().held == 6, WAIT), self.worker.stats())
        # Say only what came up to the second emit was read.
        welcome.welcome.previous_hello, welcome.welcome.received, welcome.welcome.hello = 1, number_of[1], 2
        self.broker.send(welcome)
        order = []
        deadline = time.monotonic() + WAIT
        while "done" not in order and time.monotonic() < deadline:
            env = self.broker.next()
            kind = env.WhichOneof("kind")
            if kind == "emit":
                order.append(args_of(env.emit)[0])
            elif kind == "reply":
                order.append("done")
        self.assertEqual(order, [2, 3, 4, 5, 6, 7, 8, 9, "done"])
        self.assertEqual(self.worker.stats().notices_resent, 3)
        self.assertEqual(self.worker.stats().held, 0)


class StandbyGivesBackTest(FakeBrokerTest):
    """A pair's standby gives back a one-way message it did not act on
    (Error STANDBY with `refused`: the broker stepped down while the emit
    was on its way): the worker holds it, and sends it again to the broker
    that welcomes it next, rather than losing it."""

    def service(self):
        self.go_on = threading.Event()
        self.addCleanup(self.go_on.set)
        svc = Service("svc", capacity=1)

        @svc.on("work")
        def work(req):
            req.emit("n", 1)
            if req.args == ["wait"]:
                req.emit("n", 2)
                self.go_on.wait(WAIT)
                req.emit("n", 3)
            req.reply("done")

        return svc

    def next_of(self, kinds):
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            env = self.broker.next()
            if env.WhichOneof("kind") in kinds:
                return env
        self.fail(f"no {kinds} from the worker")

    def test_a_refused_emit_goes_again_after_the_next_welcome(self):
        self.broker.welcome(self.worker, 200)
        self.job("c:1", "[]", 1)
        emit = self.next_of({"emit"})
        reply = self.next_of({"reply"})
        # Both given back, the job's answer first: it is not sent again (no
        # other broker holds the job), so only the emit is held.
        for given in (reply, emit):
            refused = pb.Envelope()
            refused.error.code = int(Code.STANDBY)
            refused.error.message = "stepped down"
            refused.error.refused = given.SerializeToString()
            self.broker.send(refused)
        self.assertTrue(eventually(lambda: self.worker.stats().held == 1, WAIT), self.worker.stats())
        # After an interval the link tries again (here the same endpoint, on
        # a new socket): welcomed, the emit goes there, and it goes first.
        self.broker.welcome(self.worker, 200)
        again = self.next_of({"emit", "reply"})
        self.assertEqual(again.SerializeToString(), emit.SerializeToString())
        self.assertEqual(self.worker.stats().held, 0)

    def test_an_emit_a_restarted_broker_gave_back_goes_after_its_welcome(self):
        """A restarted broker gives back what it read before the worker's
        Hello (NOT_REGISTERED with `refused`); dropped, as before, a job's
        progress across a broker restart was lost."""
        self.broker.welcome(self.worker, 200)
        self.job("c:1", "[]", 1)
        emit = self.next_of({"emit"})
        self.next_of({"reply"})
        refused = pb.Envelope()
        refused.error.code = int(Code.NOT_REGISTERED)
        refused.error.message = "send Hello first"
        refused.error.refused = emit.SerializeToString()
        self.broker.send(refused)
        self.assertTrue(eventually(lambda: self.worker.stats().held == 1, WAIT), self.worker.stats())
        self.broker.welcome(self.worker, 200)  # the Hello the NOT_REGISTERED asked for
        again = self.next_of({"emit", "reply"})
        self.assertEqual(again.SerializeToString(), emit.SerializeToString())
        self.assertEqual(self.worker.stats().held, 0)

    def test_what_is_given_back_goes_ahead_of_what_was_held_after_it(self):
        """The worker holds from the standby's first STANDBY on, and what the
        standby gives back was sent before that: it goes first, in its order,
        so the next broker gets the worker's messages in the order it sent
        them (a job's progress before its result). Held after, it went last."""
        # Heartbeats every 500 ms: the fake sends none, and the test has 1.5 s
        # from here to its last give-back.
        self.broker.welcome(self.worker, 500)
        self.job("c:1", '["wait"]', 1)
        read = [self.next_of({"emit"}), self.next_of({"emit"})]
        standby = pb.Envelope()
        standby.error.code = int(Code.STANDBY)
        standby.error.message = "stepped down"
        standby.error.takeover_ms = 5000  # the link tries again after 3 intervals
        self.broker.send(standby)
        self.assertTrue(eventually(lambda: not self.worker.connected, WAIT), "the STANDBY was not seen")
        self.go_on.set()  # the third emit and the answer are held
        self.assertTrue(eventually(lambda: self.worker.stats().held == 2, WAIT), self.worker.stats())

        def give_back(env):
            refused = pb.Envelope()
            refused.CopyFrom(standby)
            refused.error.refused = env.SerializeToString()
            self.broker.send(refused)

        def order(n):
            got = []
            for _ in range(n):
                env = self.next_of({"emit", "reply"})
                got.append(f"emit {args_of(env.emit)}" if env.HasField("emit") else f"reply {env.reply.id}")
            return got

        for env in read:
            give_back(env)
        self.assertTrue(eventually(lambda: self.worker.stats().held == 4, WAIT), self.worker.stats())
        self.broker.welcome(self.worker, 500)
        self.assertEqual(order(4), ["emit [1]", "emit [2]", "emit [3]", "reply c:1"])
        # A second step-down, with nothing held: what it gives back goes first again.
        self.broker.send(standby)
        self.assertTrue(eventually(lambda: not self.worker.connected, WAIT))
        give_back(read[1])
        self.assertTrue(eventually(lambda: self.worker.stats().held == 1, WAIT), self.worker.stats())
        self.broker.welcome(self.worker, 500)
        self.assertEqual(order(1), ["emit [2]"])


class ReadReportTest(FakeBrokerTest):
    """After a Welcome to a new socket's Hello the link says what it read
    of what the broker sent it (Heartbeat.read), counted from the last
    Welcome's `sent`: the broker sends what died in the old socket again."""

    def service(self):
        return Service("svc", capacity=1)

    def test_the_link_says_what_it_read(self):
        # The fake sends no heartbeat of its own: a new socket after 0.6 s.
        welcome = self.broker.welcome(self.worker, 200, sent=10)  # the broker had sent it 10 before
        beat = pb.Envelope()
        beat.heartbeat.SetInParent()
        self.broker.send(beat)
        self.broker.send(beat)
        self.broker.send(beat)  # read: 13; then silence
        while self.broker.next().WhichOneof("kind") != "hello":
            pass
        welcome.welcome.previous_hello, welcome.welcome.hello, welcome.welcome.sent = 1, 2, 20
        self.broker.send(welcome)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            _, data = self.broker.router.recv_multipart()
            env = pb.Envelope()
            env.ParseFromString(data)
            if env.WhichOneof("kind") == "heartbeat" and env.heartbeat.HasField("read"):
                self.assertEqual((env.heartbeat.read.read_to, env.heartbeat.read.tail), (13, 0))
                return
        self.fail("no read report after the Welcome to the new socket")


class JobsAgainBase(FakeBrokerTest):
    """"work" records each run, and holds a run whose args are ["hold"]."""

    def service(self):
        self.runs = []
        self.release = threading.Event()
        self.addCleanup(self.release.set)
        svc = Service("svc", capacity=4)

        @svc.on("work")
        def work(req):
            self.runs.append(req.id)
            if req.args == ["hold"]:
                self.release.wait(WAIT)
            return req.id

        return svc

    def answer(self):
        env = self.broker.next()
        self.assertEqual(env.WhichOneof("kind"), "reply", env)
        return env.reply.id, args_of(env.reply)


class JobsAgainTest(JobsAgainBase):
    """A worker back on a new socket gets every job the broker holds for it
    again (attempt > 1): one may have died on the old socket, and so may an
    answer. One still running is not run twice, one answered is answered
    again from the kept answers, and only one never seen runs."""

    def test_a_job_sent_again_runs_once(self):
        self.broker.welcome(self.worker, 1000)
        self.job("c:1", '["hold"]', 1)
        self.assertTrue(eventually(lambda: self.runs == ["c:1"], WAIT))
        self.job("c:1", '["hold"]', 2)  # still running
        self.job("c:2", "[]", 1)
        self.assertEqual(self.answer(), ("c:2", ["c:2"]))
        self.job("c:2", "[]", 2)  # answered: the kept answer goes again
        self.assertEqual(self.answer(), ("c:2", ["c:2"]))
        self.job("c:3", "[]", 2)  # never seen here: runs
        self.assertEqual(self.answer(), ("c:3", ["c:3"]))
        self.release.set()
        self.assertEqual(self.answer(), ("c:1", ["c:1"]))
        self.assertEqual(self.runs, ["c:1", "c:2", "c:3"])
        stats = self.worker.stats()
        self.assertEqual((stats.jobs_again, stats.replies_resent, stats.requests), (2, 1, 3))
        self.assertGreater(stats.kept_bytes, 0)


class RecallTest(FakeBrokerTest):
    """A Recall asks again for the final answers of jobs the broker does not
    send again (answered early, or ended while held). Each id gets exactly
    one answer: one still running answers when it ends (a Cancel does not
    make it look gone); one answered gets its kept final answer, not its
    early one; one never seen here gets a silent CANCELLED, which gives its
    capacity back."""

    def service(self):
        self.release = threading.Event()
        self.addCleanup(self.release.set)
        svc = Service("svc", capacity=4)

        @svc.on("work")
        def work(req):
            if req.args == ["hold"]:
                self.release.wait(WAIT)
                return "held"
            req.ack("early")
            return "final"

        return svc

    def reply(self):
        env = self.broker.next()
        self.assertEqual(env.WhichOneof("kind"), "reply", env)
        return env.reply

    def test_each_owed_final_answer_comes_once(self):
        self.broker.welcome(self.worker, 1000)
        self.job("c:run", '["hold"]', 1)
        self.job("c:acked", "[]", 1)
        early, final = self.reply(), self.reply()
        self.assertEqual((early.id, early.partial, final.id, final.partial),
                         ("c:acked", True, "c:acked", False))
        cancel = pb.Envelope()
        cancel.cancel.id, cancel.cancel.reason = "c:run", pb.TIMEOUT
        self.broker.send(cancel)
        recall = pb.Envelope()
        recall.recall.ids.extend(["c:run", "c:acked", "c:never"])
        self.broker.send(recall)
        again = self.reply()
        self.assertEqual((again.id, again.partial), ("c:acked", False),
                         "the early answer went again, not the final one")
        unknown = self.reply()
        self.assertEqual((unknown.id, unknown.code, unknown.silent), ("c:never", pb.CANCELLED, True))
        self.release.set()
        last = self.reply()
        self.assertEqual(last.id, "c:run", "the job still running was answered for it")
        stats = self.worker.stats()
        self.assertEqual((stats.recalled, stats.replies_resent), (3, 1))


class KeptAnswersBoundTest(JobsAgainBase):
    """At most kept_replies answers are kept, the last ones."""
    worker_options = {"kept_replies": 2}

    def test_a_sent_again_job_whose_answer_is_no_longer_kept_runs_again(self):
        self.broker.welcome(self.worker, 1000)
        for n in range(1, 4):
            self.job(f"c:{n}", "[]", 1)
            self.assertEqual(self.answer(), (f"c:{n}", [f"c:{n}"]))
        self.job("c:1", "[]", 2)  # its answer is no longer kept: it runs again
        self.assertEqual(self.answer(), ("c:1", ["c:1"]))
        self.assertEqual(self.runs, ["c:1", "c:2", "c:3", "c:1"])
        self.assertEqual(self.worker.stats().jobs_again, 0)


class GatewayGoneTest(FakeBrokerTest):
    """The broker announces a gateway lost with all its sockets (GatewayGone):
    no DISCONNECT will come for them, so each service's on_gateway_gone hook
    runs, on the pool, with what it needs to forget them. One handler thread
    (capacity 1): the hook and the jobs run in the order they came."""

    def service(self):
        self.gone = Recorder()
        self.then = None  # what the hook does after it records its call
        svc = Service("svc", capacity=1)
        svc.on("work", lambda req: "ran")

        @svc.on_gateway_gone
        def forget(gone):
            self.gone.put(gone)
            if self.then is not None:
                self.then(gone)

        return svc

    def announce(self, sid_prefix, reason="silent", gateway="gwT"):
        env = pb.Envelope()
        g = env.gateway_gone
        g.gateway, g.sid_prefix, g.reason = gateway, sid_prefix, reason
        self.broker.send(env)

    def test_the_hook_hears_which_sockets_are_gone(self):
        self.broker.welcome(self.worker, 10000)
        self.announce("gwT.Xy12_-Qz", "restarted")
        gone = self.gone.get("the hook's call")
        self.assertEqual((gone.gateway, gone.sid_prefix, gone.reason), ("gwT", "gwT.Xy12_-Qz", "restarted"))
        self.assertTrue(gone.owns("gwT.Xy12_-QzAbCdEfGh"))
        self.assertFalse(gone.owns("gwT.Other00AbCdEfGh"), "a sid of the gateway's new prefix")
        self.assertFalse(gone.owns("gwU.Xy12_-QzAbCdEfGh"))
        self.assertEqual(self.worker.stats().gateways_gone, 1)

    def test_a_prefix_that_names_no_gateways_sockets_is_ignored(self):
        # "" would own every sid: a hook that forgets by it would forget all.
        self.broker.welcome(self.worker, 10000)
        with self.assertLogs("sidecast_worker", "WARNING") as logs:
            for prefix in ("", "gwT", "gwT."):
                self.announce(prefix)
            self.announce("gwT.ok", "goodbye")
            # Had one of them reached the hook, it would have come first.
            self.assertEqual(self.gone.get("the hook's call").sid_prefix, "gwT.ok")
        self.assertEqual(sum("no sid prefix" in line for line in logs.output), 3, logs.output)
        self.assertEqual(self.worker.stats().gateways_gone, 1)

    def test_a_hook_that_raises_is_counted_and_the_worker_serves_on(self):
        def fail(gone):
            raise RuntimeError("the hook failed")
        self.then = fail
        self.broker.welcome(self.worker, 10000)
        with self.assertLogs("sidecast_worker", "ERROR") as logs:
            self.announce("gwT.a")
            self.job("c:1", "[]", 1)
            reply = self.broker.next()
        self.assertEqual(reply.WhichOneof("kind"), "reply")
        self.assertEqual((reply.reply.id, reply.reply.code, args_of(reply.reply)), ("c:1", pb.OK, ["ran"]))
        self.assertIn("on_gateway_gone", "\n".join(logs.output))
        self.assertEqual((self.worker.stats().handler_errors, self.worker.stats().gateways_gone), (1, 1))

    def test_the_hook_tells_a_room_who_left(self):
        self.then = lambda gone: gone.emit_to_room("lobby", "left", gone.sid_prefix, nsp="/chat",
                                                   except_sids=["gwU.x"])
        self.broker.welcome(self.worker, 10000)
        self.broker.xsub.send(b"\x01")  # subscribes to every topic
        # The subscription reaches the worker's PUB in its own time: until
        # it does, what the PUB sends is dropped, so the announcement goes
        # again until an emit arrives.
        until = time.monotonic() + WAIT
        while not self.broker.xsub.poll(100, zmq.POLLIN):
            self.assertLess(time.monotonic(), until, "no room emit reached the broker's XSUB")
            self.announce("gwT.a")
        topic, data = self.broker.xsub.recv_multipart()
        env = pb.Envelope()
        env.ParseFromString(data)
        self.assertEqual(topic, room_topic("/chat", "lobby"))
        e = env.emit
        self.assertEqual((e.room, e.nsp, e.event, e.origin, list(e.except_sids), args_of(e)),
                         ("lobby", "/chat", "left", "wd", ["gwU.x"], ["gwT.a"]))


class GatewayGoneFromTheBrokerTest(BrokerTest):
    """The real broker announces a gateway that said Goodbye to the workers,
    and a room emit from the hook reaches the broker's subscribers."""

    def test_a_gateway_that_says_goodbye_is_announced(self):
        seen = Recorder()
        svc = Service("chat", capacity=2)

        @svc.on_gateway_gone
        def forget(gone):
            seen.put((gone.gateway, gone.sid_prefix, gone.reason))
            gone.emit_to_room("lobby", "left", gone.sid_prefix, nsp="/chat")

        w = self.start_worker(svc)
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, room_topic("/chat", "lobby"))
        sub.connect(self.broker.xpub)
        self.addCleanup(sub.close, 0)
        # The subscription takes a moment to reach the worker: the worker's
        # own room emits go until one arrives, then the hook's takes that path.
        until = time.monotonic() + WAIT
        while True:
            w.emit_to_room("lobby", "probe", nsp="/chat")
            if sub.poll(100, zmq.POLLIN):
                break
            self.assertLess(time.monotonic(), until, "no room emit reached the subscriber")
        gw = Peer(self.ctx, self.broker.router, "gwG", pb.ROLE_GATEWAY)
        self.peers.append(gw)
        hello = pb.Envelope()
        hello.hello.role, hello.hello.id, hello.hello.protocol_version = pb.ROLE_GATEWAY, "gwG", 1
        hello.hello.sid_prefix = "gwG.t1"
        gw.send(hello)
        self.assertIsNotNone(gw.next("welcome"), "no Welcome for the gateway")
        goodbye = pb.Envelope()
        goodbye.goodbye.SetInParent()
        gw.send(goodbye)
        self.assertEqual(seen.get("the hook's call"), ("gwG", "gwG.t1", "goodbye"))
        self.assertEqual(w.stats().gateways_gone, 1)
        until = time.monotonic() + WAIT
        while True:
            self.assertTrue(sub.poll(max(0, int((until - time.monotonic()) * 1000)), zmq.POLLIN),
                            "the hook's room emit did not arrive")
            env = pb.Envelope()
            env.ParseFromString(sub.recv_multipart()[1])
            if env.emit.event == "left":
                break
        self.assertEqual((env.emit.room, env.emit.nsp, args_of(env.emit), env.emit.origin),
                         ("lobby", "/chat", ["gwG.t1"], "pyw"))


class WelcomingBrokerTest(FakeBrokerTest):
    """A fake broker that welcomes the worker with a short heartbeat
    interval and liveness (the welcome hooks run 1 s after a Welcome),
    and heartbeats while the test waits."""
    interval_ms, liveness = 250, 2  # the Welcome's: the hook runs 1 s after it (the worker's own: 6 s)

    @property
    def delay(self):
        return 2 * self.liveness * self.interval_ms / 1000.0

    def welcome(self, incarnation):
        """Welcomes the worker's next Hello as broker ``incarnation``; returns
        the time just before it was sent."""
        sent = time.monotonic()
        self.broker.welcome(self.worker, self.interval_ms, incarnation=incarnation,
                            heartbeat_liveness=self.liveness)
        return sent

    def welcome_hello(self, hello, incarnation, previous_hello):
        """Welcomes ``hello`` (read already) as broker ``incarnation``."""
        env = pb.Envelope()
        w = env.welcome
        w.protocol_version, w.heartbeat_interval_ms, w.heartbeat_liveness = \
            hello.protocol_version, self.interval_ms, self.liveness
        w.hello, w.incarnation, w.previous_hello = hello.hello, incarnation, previous_hello
        self.broker.send(env)

    def hello_again(self):
        """Error NOT_REGISTERED: the worker sends Hello again on its socket."""
        env = pb.Envelope()
        env.error.code = pb.NOT_REGISTERED
        self.broker.send(env)

    def beating(self, seconds):
        """Heartbeats to the worker for ``seconds`` (it would find the fake
        broker silent after a liveness, and wait for a new Welcome)."""
        until = time.monotonic() + seconds
        beat = pb.Envelope()
        beat.heartbeat.SetInParent()
        while time.monotonic() < until:
            self.broker.send(beat)
            time.sleep(0.05)


class WelcomeHookTest(WelcomingBrokerTest):
    """A service's on_welcome hook runs at each Welcome from a broker that
    did not know the worker's link (previous_hello 0): the first, one from a
    broker it had not met (another incarnation: the DISCONNECTs the old one
    held are lost), and one from the same broker after it had dropped the
    worker (NOT_REGISTERED: what it queued for the worker meanwhile may have
    expired); not at a Welcome from a broker that knew the link (a replaced
    socket: previous_hello not 0). Twice the heartbeat liveness (interval x
    liveness, as the Welcome says them) after it, and once for several
    within that delay. The fake broker heartbeats while the test waits: the
    hook runs only while a broker welcomes the link."""

    def service(self):
        self.heard = Recorder()  # (welcome.first, when) of each call
        self.then = None  # what the hook does after it records its call
        svc = Service("svc", capacity=1)
        svc.on("work", lambda req: "ran")

        @svc.on_welcome
        def welcomed(welcome):
            self.heard.put((welcome.first, time.monotonic()))
            if self.then is not None:
                self.then(welcome)

        return svc

    def next_call(self, limit):
        """The hook's next call within ``limit`` seconds of heartbeats, or None."""
        until = time.monotonic() + limit
        while time.monotonic() < until:
            try:
                return self.heard.q.get_nowait()
            except queue.Empty:
                self.beating(0.05)
        return None

    def assert_called_after_welcome(self, incarnation, first, what):
        """Welcomes the worker as broker ``incarnation``; the hook runs once, after the delay."""
        sent = self.welcome(incarnation)
        call = self.next_call(self.delay + 2)
        self.assertIsNotNone(call, f"no call after {what}")
        self.assertEqual(call[0], first, f"welcome.first after {what}")
        self.assertGreaterEqual(call[1] - sent, self.delay, "the hook did not wait for the gateways' Hellos")

    def test_the_hook_runs_at_each_welcome_of_a_broker_that_did_not_know_the_link(self):
        self.assert_called_after_welcome(7, True, "the first Welcome")
        # The same broker had dropped the worker: NOT_REGISTERED, and its
        # Welcome to the Hello again says previous_hello 0. A call.
        self.hello_again()
        self.assert_called_after_welcome(7, False, "the Welcome of a broker that had dropped the worker")
        # A broker this worker had not met: a call, after the delay again.
        self.hello_again()
        self.assert_called_after_welcome(8, False, "a new broker's Welcome")
        self.assertIsNone(self.next_call(self.delay + 1), "a fourth call")
        self.assertEqual(self.worker.stats().handler_errors, 0)

    def test_a_welcome_of_a_broker_that_knew_the_link_runs_nothing(self):
        self.welcome(7)
        self.assertIsNotNone(self.next_call(self.delay + 2), "no call after the first Welcome")
        # The fake goes silent: after a liveness the worker replaces its
        # socket, and the broker, which knew the link, says what it read
        # after Hello 1.
        hello, _ = self.broker.until_hello()
        self.assertEqual(hello.hello, 2, "a new socket's Hello")
        self.welcome_hello(hello, 7, previous_hello=1)
        self.assertIsNone(self.next_call(self.delay + 1), "a Welcome of a broker that knew the link ran the hook")
        self.assertTrue(self.worker.connected, "the worker did not take the Welcome")

    def test_welcomes_within_the_delay_give_one_call(self):
        self.welcome(7)
        self.beating(self.delay / 4)
        self.hello_again()
        sent = self.welcome(8)  # before the first Welcome's call was due
        call = self.next_call(self.delay + 2)
        self.assertIsNotNone(call, "no call")
        self.assertTrue(call[0], "the first Welcome's call lost its first")
        self.assertGreaterEqual(call[1] - sent, self.delay, "not counted from the last Welcome")
        self.assertIsNone(self.next_call(self.delay + 1), "a second call")

    def test_the_hook_checks_a_socket_and_a_hook_that_raises_is_counted(self):
        states = Recorder()

        def check(welcome):
            self.assertTrue(welcome.check_socket("/chat", "gwT.a", states.put, timeout=WAIT))
            raise RuntimeError("the hook failed")

        self.then = check
        with self.assertLogs("sidecast_worker", "ERROR") as logs:
            self.welcome(7)
            self.assertIsNotNone(self.next_call(self.delay + 2), "no call")
            c = self.broker.next()
        self.assertIn("on_welcome", "\n".join(logs.output))
        self.assertEqual((c.WhichOneof("kind"), c.control.action, c.control.sid, c.control.nsp, c.control.origin),
                         ("control", pb.Control.CHECK, "gwT.a", "/chat", "wd"))
        report = pb.Envelope()
        r = report.report
        r.status, r.sid, r.ref, r.to = pb.DeliveryReport.DELIVERED, "gwT.a", c.control.ref, "wd"
        self.broker.send(report)
        self.assertEqual(states.get("the check's answer"), SocketState.PRESENT)
        # The job after it still runs: the thread served on.
        self.job("c:1", "[]", 1)
        reply = self.broker.next()
        self.assertEqual((reply.reply.id, args_of(reply.reply)), ("c:1", ["ran"]))
        self.assertEqual(self.worker.stats().handler_errors, 1)


class VmExampleWelcomeTest(WelcomingBrokerTest):
    """The vm example (examples/vm_worker.py) checks the socket of each task
    it runs after a Welcome from a broker that did not know its link: the
    tasks of a socket whose gateway does not have it, or that no gateway
    has, end (vm_response, cancelled), as they would at its DISCONNECT,
    which died with the broker that held it; one whose socket is there
    runs on."""

    def service(self):
        spec = importlib.util.spec_from_file_location("vm_worker", os.path.join(EXAMPLES, "vm_worker.py"))
        example = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)
        return example.vm_service(capacity=4, launch_time=60.0, failure_rate=0)

    def beating_until(self, accept, what, limit=WAIT):
        """The worker's next message that ``accept`` takes, read while
        heartbeating (the fake broker must not go silent)."""
        beat = pb.Envelope()
        beat.heartbeat.SetInParent()
        until = time.monotonic() + limit
        while time.monotonic() < until:
            self.broker.send(beat)
            if self.broker.router.poll(50):
                _, data = self.broker.router.recv_multipart()
                env = pb.Envelope()
                env.ParseFromString(data)
                if accept(env):
                    return env
        raise AssertionError(f"no {what} within {limit} s")

    def open_vm(self, sid):
        env = pb.Envelope()
        r = env.request
        r.id, r.service, r.event, r.sid, r.nsp = f"c:{sid}", "vm", "open_vm", sid, "/vm"
        r.args, r.wants_reply, r.timeout_ms, r.attempt = b'[{"count": 1}]', True, 60000, 1
        self.broker.send(env)
        ack = self.beating_until(lambda env: env.WhichOneof("kind") == "reply", "ack")
        self.assertEqual((ack.reply.id, ack.reply.partial), (f"c:{sid}", True), ack)

    def test_the_tasks_of_a_socket_that_is_gone_end(self):
        self.welcome(7)
        self.beating(self.delay + 0.3)  # the first Welcome's hook: no task yet, nothing checked
        sids = ["gwT.gone", "gwT.here", "gwX.nogw"]
        for sid in sids:
            self.open_vm(sid)
        self.hello_again()
        self.welcome(8)  # a broker that did not know the worker
        is_check = lambda env: env.WhichOneof("kind") == "control"  # noqa: E731
        checks = [self.beating_until(is_check, "check", self.delay + 2).control for _ in sids]
        self.assertEqual(sorted(c.sid for c in checks), sids)
        self.assertEqual({(c.action, c.nsp, c.origin) for c in checks}, {(pb.Control.CHECK, "", "wd")})
        status = {"gwT.gone": pb.DeliveryReport.CLIENT_GONE, "gwT.here": pb.DeliveryReport.DELIVERED,
                  "gwX.nogw": pb.DeliveryReport.GATEWAY_GONE}
        for c in checks:
            env = pb.Envelope()
            env.report.status, env.report.sid, env.report.ref, env.report.to = status[c.sid], c.sid, c.ref, "wd"
            self.broker.send(env)
        ended = {}
        is_response = lambda env: env.WhichOneof("kind") == "emit" and env.emit.event == "vm_response"  # noqa: E731
        while len(ended) < 2:
            e = self.beating_until(is_response, "vm_response").emit
            ended[e.sid] = args_of(e)[0]["cancelled"]
        self.assertEqual(ended, {"gwT.gone": True, "gwX.nogw": True})
        with self.assertRaises(AssertionError, msg="the task of a socket that is there ended"):
            self.beating_until(is_response, "vm_response", 0.5)


class CheckSocketTest(FakeBrokerTest):
    """check_socket sends a Control CHECK whose delivery report, matched by
    its ref, says what became of the socket; a REJECTED one, or none in
    time, reads unknown. These reports do not reach on_report. One handler
    thread: callbacks run in the order their reports came."""

    def service(self):
        return Service("svc", capacity=1)

    def setUp(self):
        super().setUp()
        self.reports = Recorder()
        self.worker.on_report(self.reports.put)
        self.broker.welcome(self.worker, 10000)

    def report(self, status, sid, ref):
        env = pb.Envelope()
        r = env.report
        r.status, r.sid, r.ref, r.to = status, sid, ref, "wd"
        self.broker.send(env)

    def check(self, sid, found, timeout=WAIT):
        """Checks ``sid`` (its state goes to ``found``); returns its Control."""
        self.assertTrue(self.worker.check_socket("/chat", sid, lambda state: found.put((sid, state)), timeout))
        c = self.broker.next()
        self.assertEqual(c.WhichOneof("kind"), "control")
        return c.control

    def test_each_report_settles_its_check_and_silence_reads_unknown(self):
        found = Recorder()
        answers = [("gwT.here", pb.DeliveryReport.DELIVERED, SocketState.PRESENT),
                   ("gwT.left", pb.DeliveryReport.CLIENT_GONE, SocketState.GONE),
                   ("nogw.x", pb.DeliveryReport.GATEWAY_GONE, SocketState.NO_GATEWAY),
                   ("gwT.other", pb.DeliveryReport.REJECTED, SocketState.UNKNOWN)]
        controls = [self.check(sid, found) for sid, _, _ in answers]
        for c, (sid, _, _) in zip(controls, answers):
            self.assertEqual((c.action, c.sid, c.nsp, c.origin), (pb.Control.CHECK, sid, "/chat", "wd"))
        refs = [c.ref for c in controls]
        self.assertNotIn("", refs)
        self.assertEqual(len(set(refs)), len(refs), "two checks under one ref")
        # Answered in another order than asked: each by its ref.
        for c, (sid, status, _) in reversed(list(zip(controls, answers))):
            self.report(status, sid, c.ref)
        self.assertEqual([found.get("a check's answer") for _ in answers],
                         [(sid, state) for sid, _, state in reversed(answers)])
        asked = time.monotonic()
        self.check("gwT.silent", found, timeout=0.3)  # never answered
        self.assertEqual(found.get("the silent check's answer"), ("gwT.silent", SocketState.UNKNOWN))
        self.assertGreaterEqual(time.monotonic() - asked, 0.3, "settled before its timeout")
        # A report that settles no check goes to on_report, the first there:
        # none of the checks' went before it.
        self.report(pb.DeliveryReport.CLIENT_GONE, "gwT.y", "mine")
        stray = self.reports.get("the report that settles no check")
        self.assertEqual((stray.status, stray.sid, stray.ref), ("CLIENT_GONE", "gwT.y", "mine"))
        self.assertTrue(self.reports.empty_for(0.2))
        self.assertTrue(found.empty_for(0.2), "a check answered twice")

    def test_a_report_for_an_awaited_ack_is_not_taken_for_a_check(self):
        # An emit_with_ack's id is no check's ref: its report goes to on_report.
        future = self.worker._core.emit_with_ack("/chat", "gwT.z", "ask", [], WAIT, None)
        ack_id = self.broker.next().emit.ack_id
        self.report(pb.DeliveryReport.CLIENT_GONE, "gwT.z", ack_id)
        self.assertEqual(self.reports.get("the report").ref, ack_id)
        self.assertFalse(future.done())


class CheckSocketRefusedTest(FakeBrokerTest):
    """Checks count against pending_acks_limit with the acks: past it
    check_socket returns False and never calls back (acks_refused). One
    awaited when the worker stops hears unknown; after, it is refused."""
    worker_options = {"pending_acks_limit": 2}

    def service(self):
        return Service("svc", capacity=1)

    def test_past_the_limit_and_after_a_stop_a_check_is_refused(self):
        self.broker.welcome(self.worker, 10000)
        found = Recorder()
        self.assertIsNotNone(self.worker._core.emit_with_ack("/", "gwT.a", "ask", [], WAIT, None))
        self.assertTrue(self.worker.check_socket("/", "gwT.b", found.put))
        self.assertFalse(self.worker.check_socket("/", "gwT.c", found.put), "awaited past the limit")
        self.assertEqual(self.worker.stats().acks_refused, 1)
        kinds = [self.broker.next().WhichOneof("kind") for _ in range(2)]
        self.assertEqual(kinds, ["emit", "control"])
        self.assertTrue(found.empty_for(0.2), "a refused check called back")
        self.worker.stop()
        self.assertEqual(found.get("the awaited check's answer"), SocketState.UNKNOWN)
        self.assertTrue(found.empty_for(0.2), "the refused check called back")
        self.assertFalse(self.worker.check_socket("/", "gwT.d", found.put), "a check after stop()")


class AwaitedAtAnIoFailureTest(FakeBrokerTest):
    """An I/O thread that fails (no stop()) answers what was awaited at
    once, an ack CANCELLED and a check UNKNOWN: no report, ack or deadline
    can settle them now. From then on nothing more is awaited: a check or
    an emit with an ack is refused, and leaves no entry behind."""

    def service(self):
        return Service("svc", capacity=1)

    def test_what_was_awaited_is_answered_and_nothing_more_is_awaited(self):
        self.broker.welcome(self.worker, 10000)
        core = self.worker._core
        found, acked = Recorder(), Recorder()
        self.assertTrue(self.worker.check_socket("/", "gwT.a", found.put, timeout=60))
        future = core.emit_with_ack("/", "gwT.b", "ask", [], 60, acked.put)
        self.assertIsNotNone(future)
        self.assertEqual(sorted(self.broker.next().WhichOneof("kind") for _ in range(2)), ["control", "emit"])

        def fail(now):
            raise RuntimeError("the I/O loop failed")

        with self.assertLogs("sidecast_worker", "CRITICAL"):
            core.expire = fail  # the loop calls it each turn
            core.wake.signal()
            core.io_thread.join(WAIT)
        self.assertFalse(core.io_thread.is_alive(), "the I/O thread did not end")
        self.assertFalse(core.stopping.is_set())
        self.assertEqual(found.get("the awaited check's answer"), SocketState.UNKNOWN)
        self.assertEqual(acked.get("the awaited ack's callback").code, Code.CANCELLED)
        self.assertEqual(future.result(WAIT).code, Code.CANCELLED)
        self.assertFalse(self.worker.check_socket("/", "gwT.c", found.put), "a check after the I/O thread ended")
        self.assertIsNone(core.emit_with_ack("/", "gwT.d", "ask", [], 60, None), "an ack after it")
        # Awaited, an entry would never expire.
        self.assertIsNone(core.register_ack((concurrent.futures.Future(), None), 60))
        self.assertEqual(core.acks, {})
        self.assertTrue(found.empty_for(0.2), "a refused check called back")


class CheckSocketThroughTheBrokerTest(BrokerTest):
    """The real broker carries a check to the sid's gateway (a fake one
    here), and that gateway's report back; it answers GATEWAY_GONE itself
    for a sid no live gateway has."""

    def test_the_gateway_or_the_broker_answers(self):
        found, reports = Recorder(), Recorder()
        w = self.start_worker(Service("plain"))
        w.on_report(reports.put)
        gw = self.gateway("gwT")
        for sid, status in (("gwT.here", pb.DeliveryReport.DELIVERED), ("gwT.left", pb.DeliveryReport.CLIENT_GONE)):
            self.assertTrue(w.check_socket("/chat", sid, found.put))
            c = gw.next("control")
            self.assertIsNotNone(c, "the check did not reach the gateway")
            self.assertEqual((c.control.action, c.control.sid, c.control.nsp, c.control.origin),
                             (pb.Control.CHECK, sid, "/chat", "pyw"))
            answer = pb.Envelope()
            r = answer.report
            r.status, r.sid, r.ref, r.to = status, sid, c.control.ref, c.control.origin
            gw.send(answer)
        self.assertEqual([found.get("a check's answer") for _ in range(2)], [SocketState.PRESENT, SocketState.GONE])
        self.assertTrue(w.check_socket("/chat", "gwGone.x", found.put))
        self.assertEqual(found.get("the broker's answer"), SocketState.NO_GATEWAY)
        self.assertTrue(reports.empty_for(0.3), "a check's report went to on_report")


class GatewayTrafficTest(BrokerTest):
    def test_early_ack_then_progress_to_the_sid(self):
        done = Recorder()
        svc = Service("vmish", capacity=2)

        @svc.on("launch")
        def launch(req):
            req.ack({"task_id": "t1"})
            for percent in (0, 50, 100):
                req.emit("vm_progress", {"task_id": "t1", "percent": percent})
            # Past the request's 500 ms deadline: after ack() it no longer applies.
            slept = req.sleep(1.0)
            req.emit("vm_response", {"task_id": "t1", "data": []})
            done.put((slept, req.cancelled.is_set()))

        self.start_worker(svc)
        gw = self.gateway("gwT")
        rid = gw.submit("vmish", "launch", "[{}]", timeout_ms=500, sid="gwT.x", nsp="/vm")
        ack = gw.reply_to(rid, final=False)
        self.assertIsNotNone(ack, "no early ack")
        self.assertTrue(ack.reply.partial)
        self.assertEqual((ack.reply.code, args_of(ack.reply)), (pb.OK, [{"task_id": "t1"}]))
        emits = []
        while len(emits) < 4:
            env = gw.receive()
            self.assertIsNotNone(env, f"only {len(emits)} emits arrived")
            kind = env.WhichOneof("kind")
            self.assertEqual(kind, "emit", f"unexpected {kind}: {env}")
            emits.append(env.emit)
        for e in emits:
            self.assertEqual((e.sid, e.nsp, e.origin), ("gwT.x", "/vm", "pyw"))
        self.assertEqual([(e.event, args_of(e)[0].get("percent")) for e in emits],
                         [("vm_progress", 0), ("vm_progress", 50), ("vm_progress", 100),
                          ("vm_response", None)])
        self.assertEqual(done.get(), (True, False))
        # The final (silent) reply only frees the capacity: the requester sees nothing more.
        self.assertEqual([e for e in gw.collect(0.3) if e.WhichOneof("kind") == "reply"], [])
        self.assertTrue(eventually(lambda: self.broker.metric("sidecast_broker_in_flight") == 0))

    def test_emit_with_ack_round_trip(self):
        svc = Service("ask", capacity=2)

        @svc.on("ask")
        def ask(req):
            result = req.emit_with_ack("question", "ready?", timeout=2).result(WAIT)
            req.reply(result.code.name, *result.args)

        @svc.on("ask-cb")
        def ask_cb(req):
            results = Recorder()
            req.emit_with_ack("question", timeout=0.3, callback=results.put)
            req.reply(results.get("the ack callback").code.name)

        self.start_worker(svc)
        gw = self.gateway("gwT")
        rid = gw.submit("ask", "ask", sid="gwT.x")
        q = gw.next("emit")
        self.assertIsNotNone(q)
        self.assertEqual((q.emit.sid, q.emit.event, args_of(q.emit)), ("gwT.x", "question", ["ready?"]))
        self.assertTrue(q.emit.ack_id.startswith("pyw:"))
        answer = pb.Envelope()
        answer.reply.id = q.emit.ack_id
        answer.reply.args = b'["yes",2]'
        gw.send(answer)
        self.assertEqual(args_of(gw.reply_to(rid).reply), ["OK", "yes", 2])
        # No ack from the client: TIMEOUT, here through the callback.
        rid = gw.submit("ask", "ask-cb", sid="gwT.y")
        self.assertIsNotNone(gw.next("emit"))
        self.assertEqual(args_of(gw.reply_to(rid).reply), ["TIMEOUT"])

    def test_emits_awaiting_an_ack_are_bounded_and_the_refusals_counted(self):
        svc = Service("ask", capacity=1)

        @svc.on("ask")
        def ask(req):
            futures = [req.emit_with_ack("question", i, timeout=10) for i in range(3)]
            req.reply([f is not None for f in futures])

        w = self.start_worker(svc, pending_acks_limit=2)
        gw = self.gateway("gwT")
        rid = gw.submit("ask", "ask", sid="gwT.x")
        self.assertEqual(args_of(gw.reply_to(rid).reply), [[True, True, False]])
        self.assertEqual(w.stats().acks_refused, 1)

    def test_join_leave_disconnect(self):
        svc = Service("chat", capacity=2)

        @svc.on("enter")
        def enter(req):
            req.join("lobby")
            req.leave("lobby")
            req.disconnect()

        w = self.start_worker(svc)
        gw = self.gateway("gwT")
        gw.submit("chat", "enter", sid="gwT.x", nsp="/chat")
        controls = [gw.next("control") for _ in range(3)]
        self.assertNotIn(None, controls)
        self.assertEqual([(c.control.action, c.control.sid, c.control.nsp, c.control.room,
                           c.control.origin) for c in controls],
                         [(pb.Control.JOIN, "gwT.x", "/chat", "lobby", "pyw"),
                          (pb.Control.LEAVE, "gwT.x", "/chat", "lobby", "pyw"),
                          (pb.Control.DISCONNECT, "gwT.x", "/chat", "", "pyw")])
        # The same from outside a request.
        w.join("gwT.z", "room2", nsp="/chat")
        c = gw.next("control")
        self.assertEqual((c.control.action, c.control.sid, c.control.room),
                         (pb.Control.JOIN, "gwT.z", "room2"))
        w.emit_to_sid("gwT.z", "hello", 1, "two", nsp="/chat")
        e = gw.next("emit")
        self.assertEqual((e.emit.sid, e.emit.nsp, e.emit.event, args_of(e.emit)),
                         ("gwT.z", "/chat", "hello", [1, "two"]))

    def test_lifecycle_hooks(self):
        disconnects = Recorder()
        svc = Service("life", capacity=2)

        @svc.on_connect
        def connect(req):
            if req.auth.get("token") != "ok":
                req.refuse("forbidden")
                return None
            return {"user": "ann"}

        @svc.on_disconnect
        def disconnect(req):
            disconnects.put((req.kind, req.sid, req.reason))

        self.start_worker(svc, Service("plain"))
        gw = self.gateway("gwT")
        rid = gw.lifecycle("life", pb.Lifecycle.CONNECT, "gwT.a", auth=b'{"token":"ok"}')
        r = gw.reply_to(rid).reply
        self.assertEqual((r.code, json.loads(r.args)), (pb.OK, {"user": "ann"}))
        rid = gw.lifecycle("life", pb.Lifecycle.CONNECT, "gwT.b", auth=b'{"token":"bad"}')
        r = gw.reply_to(rid).reply
        self.assertEqual((r.code, r.message), (pb.REFUSED, "forbidden"))
        rid = gw.lifecycle("plain", pb.Lifecycle.CONNECT, "gwT.c")
        r = gw.reply_to(rid).reply
        self.assertEqual((r.code, json.loads(r.args)), (pb.OK, {}))  # no hook: accepted
        gw.lifecycle("life", pb.Lifecycle.DISCONNECT, "gwT.a", reason="client namespace disconnect")
        self.assertEqual(disconnects.get(), ("disconnect", "gwT.a", "client namespace disconnect"))

    def test_a_connect_hook_returning_false_refuses(self):
        # As in Flask-SocketIO; before, False accepted the socket with the
        # data false: an auth check written that way let everyone in.
        svc = Service("gate", capacity=2)
        svc.on_connect(lambda req: req.auth.get("token") == "ok")
        self.start_worker(svc)
        gw = self.gateway("gwT")
        r = gw.reply_to(gw.lifecycle("gate", pb.Lifecycle.CONNECT, "gwT.a", auth=b'{"token":"bad"}')).reply
        self.assertEqual((r.code, r.message), (pb.REFUSED, "refused"))
        r = gw.reply_to(gw.lifecycle("gate", pb.Lifecycle.CONNECT, "gwT.b", auth=b'{"token":"ok"}')).reply
        self.assertEqual((r.code, json.loads(r.args)), (pb.OK, {}))

    def test_delivery_report_for_a_gone_gateway(self):
        reports = Recorder()
        w = self.start_worker(Service("plain"))
        w.on_report(reports.put)
        w.emit_to_sid("gwGone.x", "hello", nsp="/", ref="r1")
        report = reports.get("a delivery report")
        self.assertEqual((report.status, report.sid, report.ref), ("GATEWAY_GONE", "gwGone.x", "r1"))
        w.disconnect("nodot")
        report = reports.get("a delivery report")
        self.assertEqual((report.status, report.sid), ("GATEWAY_GONE", "nodot"))


class PublishTest(BrokerTest):
    def subscriber(self, *topics):
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        for t in topics:
            sub.setsockopt(zmq.SUBSCRIBE, t)
        sub.connect(self.broker.xpub)
        self.addCleanup(sub.close, 0)
        return sub

    def until_received(self, sub, send, timeout=WAIT):
        """Calls send() every 100 ms until the SUB gets a message (the
        subscription takes a moment to reach the broker's XPUB)."""
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            send()
            if sub.poll(100, zmq.POLLIN):
                frames = sub.recv_multipart()
                # [topic][envelope][stamp]: the broker numbers each topic's
                # events (16 bytes: stream, number; docs/protocol.md).
                self.assertEqual(len(frames), 3, frames)
                stream, number = struct.unpack("<QQ", frames[2])
                self.assertNotEqual(stream, 0)
                self.assertGreater(number, 0)
                env = pb.Envelope()
                env.ParseFromString(frames[1])
                return frames[0], env
        self.fail("nothing arrived on the SUB")

    def test_room_emit_reaches_a_subscriber(self):
        svc = Service("chat", capacity=2)

        @svc.on("say")
        def say(req):
            req.emit_to_room(req.args[0], "said", {"text": req.args[1], "from": req.sid},
                             except_sids=[req.sid])

        self.start_worker(svc)
        c = self.gateway("gwT")
        sub = self.subscriber(room_topic("/chat", "lobby"))

        def send():
            # A room whose name starts with "lobby" must not match (trailing NUL).
            c.submit("chat", "say", '["lobbyist","no"]', sid="gwT.x", nsp="/chat", wants_reply=False)
            c.submit("chat", "say", '["lobby","hi"]', sid="gwT.x", nsp="/chat", wants_reply=False)

        topic, env = self.until_received(sub, send)
        self.assertEqual(topic, b"r/chat\0lobby\0")
        e = env.emit
        self.assertEqual((e.room, e.nsp, e.event, e.origin, list(e.except_sids)),
                         ("lobby", "/chat", "said", "pyw", ["gwT.x"]))
        self.assertEqual(args_of(e), [{"text": "hi", "from": "gwT.x"}])
        while sub.poll(300, zmq.POLLIN):
            self.assertEqual(sub.recv_multipart()[0], b"r/chat\0lobby\0")

    def test_broadcast_reaches_a_namespace_subscriber(self):
        w = self.start_worker(Service("plain"))
        sub = self.subscriber(namespace_topic("/news"))
        topic, env = self.until_received(
            sub, lambda: w.broadcast("flash", {"n": 1}, b"\x07", nsp="/news", except_sids=["gw1.a"]))
        self.assertEqual(topic, b"n/news\0")
        e = env.emit
        self.assertTrue(e.broadcast)
        self.assertEqual((e.nsp, e.event, list(e.except_sids)), ("/news", "flash", ["gw1.a"]))
        self.assertEqual(args_of(e), [{"n": 1}, {"_placeholder": True, "num": 0}])
        self.assertEqual(list(e.attachments), [b"\x07"])


class ReconnectTest(BrokerTest):
    def echo_service(self):
        svc = Service("echo", capacity=2)
        svc.on("echo", lambda req: req.reply(*req.args))
        return svc

    def restart_broker(self):
        self.broker.kill()
        self.broker = self.start_broker(ports=self.broker.ports)

    def assert_serves(self, peer_id):
        c = self.peer(peer_id)
        reply = c.call("echo", "echo", '["again"]')
        self.assertIsNotNone(reply)
        self.assertEqual((reply.code, args_of(reply)), (pb.OK, ["again"]))


class BrokerRestartTest(ReconnectTest):
    heartbeat_ms = 1000  # silence detection needs 3 s: the restart is quicker

    def test_restarted_broker_gets_hello_again(self):
        w = self.start_worker(self.echo_service())
        self.assert_serves("c1")
        self.restart_broker()
        # The new broker answers the worker's next heartbeat with
        # NOT_REGISTERED; the worker sends Hello on the same socket.
        self.assertTrue(eventually(lambda: self.broker.workers("echo") == 1, 5))
        self.assert_serves("c2")
        self.assertEqual(w.stats().reconnects, 0)


class DrainAcrossBrokerRestartTest(ReconnectTest):
    """A draining worker that announces itself to a restarted broker says so
    in its Hello: the new broker gives it nothing either."""
    heartbeat_ms = 1000

    def status(self):
        return json.loads(http_get(self.broker.http_port, "/status")[1])

    def test_the_new_broker_knows_the_worker_drains(self):
        release = threading.Event()
        self.addCleanup(release.set)
        w1 = self.start_worker(job_service(release), worker_id="pyA")
        c = self.peer()
        c.submit("job", "work", '["hold"]', timeout_ms=10000)
        self.assertTrue(eventually(lambda: w1.stats().requests == 1, WAIT))
        drained = queue.Queue()
        threading.Thread(target=lambda: drained.put(w1.drain(WAIT)), daemon=True).start()
        self.assertTrue(eventually(
            lambda: self.broker.metric("sidecast_broker_messages_received_total", kind="drain") == 1, WAIT))
        self.restart_broker()
        peer = lambda: next((p for p in self.status()["peers"] if p["id"] == "pyA"), None)
        self.assertTrue(eventually(lambda: peer() is not None, 10), "the worker never announced itself again")
        self.assertTrue(peer()["draining"], peer())
        self.start_worker(job_service(None), worker_id="pyB")
        c2 = self.peer("c2")
        for _ in range(3):
            reply = c2.call("job", "work", "[]")
            self.assertEqual((reply.code, args_of(reply)), (pb.OK, ["pyB", 1]))
        release.set()
        self.assertTrue(drained.get(timeout=WAIT))


class BrokerSilenceTest(ReconnectTest):
    heartbeat_ms = 200

    def test_silent_broker_means_new_socket_and_hello(self):
        w = self.start_worker(self.echo_service())
        self.broker.process.signal(signal.SIGSTOP)
        try:
            self.assertTrue(eventually(lambda: w.stats().reconnects >= 1, 3),
                            "the worker did not notice the broker's silence")
            self.assertFalse(w.connected)
        finally:
            self.broker.process.signal(signal.SIGCONT)
        self.assertTrue(w.wait_connected(WAIT))
        self.assert_serves("c2")

    def test_a_job_running_through_the_broker_stall_runs_once(self):
        # The broker does not count the stall against the worker; the worker,
        # back on a new socket, gets the job again and does not run it again.
        release = threading.Event()
        self.addCleanup(release.set)
        w = self.start_worker(job_service(release))
        c = self.peer()
        request_id = c.submit("job", "work", '["hold"]', timeout_ms=10000)
        self.assertTrue(eventually(lambda: w.stats().requests == 1, WAIT))
        self.broker.process.signal(signal.SIGSTOP)
        try:
            self.assertTrue(eventually(lambda: w.stats().reconnects >= 1, 3))
            time.sleep(0.5)  # longer than the liveness of the client, which keeps its socket
        finally:
            self.broker.process.signal(signal.SIGCONT)
        self.assertTrue(eventually(lambda: w.stats().jobs_again == 1, WAIT), w.stats())
        release.set()
        reply = c.receive()
        self.assertIsNotNone(reply)
        self.assertEqual((reply.reply.id, reply.reply.code, args_of(reply.reply)), (request_id, pb.OK, ["pyw", 1]))
        self.assertEqual(w.stats().requests, 1)
        self.assertEqual(self.broker.metric("sidecast_broker_stalls_total"), 1)
        self.assertEqual(self.broker.metric("sidecast_broker_peer_reconnects_total"), 1)

    def test_what_a_worker_emits_through_the_broker_stall_all_arrives(self):
        # The emits the worker sent into the socket it replaced that the
        # broker had not read died there; the Welcome on the new socket says
        # how many it read, and the worker sends the rest again.
        svc = Service("progress", capacity=1)
        stalled, replaced = threading.Event(), threading.Event()
        self.addCleanup(stalled.set)
        self.addCleanup(replaced.set)

        @svc.on("run")
        def run(req):
            for part, wait in ((range(0, 10), stalled), (range(10, 20), replaced), (range(20, 30), None)):
                for i in part:
                    req.emit("n", i)
                if wait is not None:
                    wait.wait(WAIT)
            return "done"

        w = self.start_worker(svc)
        gw = self.gateway("gwT")
        gw.submit("progress", "run", sid="gwT.x", timeout_ms=20000)
        got = [args_of(gw.next("emit").emit)[0] for _ in range(10)]
        self.broker.process.signal(signal.SIGSTOP)
        try:
            stalled.set()  # 10 more into the socket the broker does not read
            self.assertTrue(eventually(lambda: w.stats().reconnects >= 1, 3), "the worker never found the broker silent")
            replaced.set()  # and 10 on the new socket, before the Welcome
            time.sleep(0.2)
        finally:
            self.broker.process.signal(signal.SIGCONT)
        deadline = time.monotonic() + WAIT
        while len(got) < 30 and time.monotonic() < deadline:
            env = gw.receive(0.2)
            if env is not None and env.WhichOneof("kind") == "emit":
                got.append(args_of(env.emit)[0])
        self.assertEqual(sorted(got), list(range(30)), "each emit arrives once")
        self.assertEqual([i for i in got if 10 <= i < 20], list(range(10, 20)), "those sent again in their order")
        print(f"sent again by the worker: {w.stats().notices_resent} of the 10 emitted during the stall")

    def test_broker_restart_slower_than_liveness(self):
        w = self.start_worker(self.echo_service())
        self.broker.kill()
        self.assertTrue(eventually(lambda: w.stats().reconnects >= 1, 3))
        self.broker = self.start_broker(ports=self.broker.ports)
        self.assertTrue(eventually(lambda: self.broker.workers("echo") == 1, 5))
        self.assertTrue(w.wait_connected(WAIT))
        self.assert_serves("c2")


class CurveTest(BrokerTest):
    def setUp(self):
        broker_public, self.broker_secret = zmq.curve_keypair()
        self.server_key = broker_public.decode()
        self.worker_public, self.worker_secret = zmq.curve_keypair()
        super().setUp()

    def start_broker(self, **options):
        return super().start_broker(extra=["--curve-secret", self.broker_secret.decode(),
                                           "--curve-allow", self.worker_public.decode()], **options)

    def test_encrypted_worker_registers_and_publishes(self):
        w = self.start_worker(Service("sealed"), curve_secret=self.worker_secret.decode(),
                              curve_server_key=self.server_key)
        self.assertTrue(eventually(lambda: self.broker.workers("sealed") == 1))
        # Its PUB socket is encrypted too: the broker forwards what it publishes.
        before = self.broker.metric("sidecast_broker_events_total") or 0
        self.assertTrue(eventually(lambda: w.broadcast("x") and
                                   (self.broker.metric("sidecast_broker_events_total") or 0) > before))

    def test_worker_without_keys_is_refused(self):
        w = Worker(self.broker.router, self.broker.xsub, worker_id="plain").add(Service("sealed"))
        self.workers.append(w.start())
        self.assertFalse(w.wait_connected(1.0))


def edits(a, b):
    """Optimal string alignment distance, as core/config.cpp's edits()."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


class ConfigVariablesTest(unittest.TestCase):
    """A SIDECAST_* variable one or two edits from one of a program's is
    warned of at start (core::near_miss_warnings), unless it is another
    Sidecast program's: one environment may serve several."""

    PROGRAMS = ("sidecast-broker", "sidecast-gateway", "sidecast-worker")
    SHARED_NEAR_MISSES = {"SIDECAST_ROUTE", "SIDECAST_ROUTER"}  # core/config.cpp's shared_near_misses

    @staticmethod
    def variables(program):
        import subprocess
        out = subprocess.run([os.path.join(BIN, program), "--help"], capture_output=True, text=True).stdout
        return set(re.findall(r"Env:(SIDECAST_[A-Z0-9_]+)", out))

    def test_every_near_miss_between_programs_is_listed(self):
        names = {p: self.variables(p) for p in self.PROGRAMS}
        for p, own in names.items():
            self.assertIn("SIDECAST_LOG_LEVEL", own, f"{p} --help lists no variables")
        near = set()
        for p, own in names.items():
            for other in set().union(*(v for q, v in names.items() if q != p)) - own:
                rest = other[len("SIDECAST_"):]
                allowed = 2 if len(rest) >= 8 else 1
                if any(0 < edits(rest, mine[len("SIDECAST_"):]) <= allowed for mine in own):
                    near.add(other)
        self.assertEqual(near, self.SHARED_NEAR_MISSES,
                         "a program's variable is a near miss of another's: add it to core/config.cpp's "
                         "shared_near_misses, or it is warned of in an environment both share")

    def test_a_misspelt_variable_is_warned_of_and_another_programs_is_not(self):
        env = dict(os.environ, SIDECAST_HEARTBEAT_INTERVALL="500", SIDECAST_ROUTE="[/=demo]",
                   SIDECAST_BACKUP_EVENTS="tcp://127.0.0.1:1")
        b = Broker(extra=[])
        b.stop()
        p = Process([os.path.join(BIN, "sidecast-broker"), "--router", b.router, "--xsub", b.xsub, "--xpub", b.xpub,
                     "--http", ""], "broker-env", env=env)
        self.addCleanup(p.cleanup)
        self.assertTrue(eventually(lambda: "listening" in p.output(), WAIT), p.output())
        out = p.output()
        self.assertIn("warning: SIDECAST_HEARTBEAT_INTERVALL is set, but sidecast-broker has no such variable: "
                      "not SIDECAST_HEARTBEAT_INTERVAL (--heartbeat-interval)? It is ignored", out)
        self.assertNotIn("SIDECAST_ROUTE ", out)
        self.assertNotIn("SIDECAST_BACKUP_EVENTS", out)


class StoppedSubscriberTest(BrokerTest):
    """A gateway whose process stopped (SIGSTOP, a paused VM) keeps its TCP
    connection to the broker's XPUB open: every event for it piled up in
    its queue at the broker, up to --hwm events of any size (400 broadcasts
    of 500 KB: 200 MB). The broker's ZMTP pings, which a stopped process
    does not answer, now drop that connection after a heartbeat liveness,
    with its queue; the subscriber reconnects when it runs again."""

    SUB = (
        "import sys, zmq\n"
        "s = zmq.Context().socket(zmq.SUB)\n"
        "s.setsockopt(zmq.SUBSCRIBE, b'')\n"
        "s.connect(sys.argv[1])\n"
        "while True:\n"
        "    frames = s.recv_multipart()\n"
        "    body = b''.join(frames)\n"
        "    print('last' if b'last' in body else 'big' if b'big' in body else 'other', flush=True)\n"
    )

    def test_a_stopped_subscribers_queue_goes_with_its_connection(self):
        import subprocess
        w = self.start_worker(Service("pub"))
        sub = subprocess.Popen([sys.executable, "-c", self.SUB, self.broker.xpub], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        self.addCleanup(lambda: (sub.send_signal(signal.SIGCONT), sub.kill(), sub.wait(), sub.stdout.close()))
        # Subscribed once an event reaches it.
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line.strip()) for line in sub.stdout], daemon=True).start()

        seen = collections.Counter()

        def heard(word, timeout):
            until = time.monotonic() + timeout
            while time.monotonic() < until:
                w.broadcast(word, 1)
                try:
                    while True:
                        line = lines.get(timeout=0.1)
                        seen[line] += 1
                        if line == word:
                            return True
                except queue.Empty:
                    pass
            return False
        self.assertTrue(heard("other", WAIT), "the subscriber never heard an event")

        sub.send_signal(signal.SIGSTOP)
        # 200 events of 100 KB over 2 s, past the liveness of 600 ms: far
        # more than the kernel's socket buffers hold.
        payload = "x" * 100_000
        for _ in range(200):
            self.assertTrue(w.broadcast("big", payload))
            time.sleep(0.01)
        sub.send_signal(signal.SIGCONT)
        self.assertTrue(heard("last", WAIT), "the subscriber heard nothing after it ran again")
        print(f"heard {seen['big']} of the 200 events published while it was stopped")
        self.assertLess(seen["big"], 200, "the broker kept every event for a stopped subscriber")


class BrokerPairTest(BrokerTest):
    """A primary/backup broker pair (docs/deployment.md, "A broker pair"):
    the worker knows both, uses the active one, and moves when it dies; its
    room emits follow, since only the active broker subscribes to them."""

    def start_broker(self):
        primary_pair, backup_pair = free_ports(2)
        self.primary = super().start_broker(extra=pair_args("primary", primary_pair, backup_pair))
        self.backup = super().start_broker(extra=pair_args("backup", backup_pair, primary_pair))
        return self.primary

    def peer_at(self, broker, peer_id, role=pb.ROLE_CLIENT):
        p = Peer(self.ctx, broker.router, peer_id, role)
        self.peers.append(p)
        return p

    def served_at(self, broker, peer_id):
        """A client welcomed by ``broker`` whose echo the worker answers, within WAIT."""
        c = self.peer_at(broker, peer_id)

        def echo():
            if not c.registered and not c.hello(0.5):
                return False
            reply = c.call("t", "echo", "[1]", timeout_ms=500)
            return reply is not None and reply.code == pb.OK
        return c if eventually(echo, WAIT * 2) else None

    def test_the_worker_moves_to_the_backup_and_its_room_emits_follow(self):
        svc = Service("t", capacity=2)
        svc.on("echo", lambda req: req.reply(*req.args))
        svc.on("say", lambda req: req.emit_to_room("lobby", "said", req.args[0]))
        w = Worker(self.primary.router, self.primary.xsub, worker_id="pyp",
                   backup_broker=self.backup.router, backup_publish=self.backup.xsub)
        w.add(svc)
        self.workers.append(w.start())
        self.assertTrue(w.wait_connected(WAIT))
        self.assertIsNotNone(self.served_at(self.primary, "c1"), "the primary did not serve")

        # The passive backup refuses a peer, and says so. (Passive: it has
        # heard the primary active; a backup that never did never takes over.)
        self.assertTrue(eventually(
            lambda: json.loads(http_get(self.backup.http_port, "/status")[1])["pair"]["state"] == "passive"))
        refused = self.peer_at(self.backup, "c2")
        self.assertFalse(refused.hello(0.5))
        self.assertIsNotNone(refused.next("error", 0.1, lambda e: e.error.code == Code.STANDBY))
        # A one-way message comes back whole, for its sender to send again
        # where it is served (a request is named by its id instead).
        emit = pb.Envelope()
        emit.emit.room = "lobby"
        emit.emit.event = "said"
        emit.emit.args = b'["refused"]'
        refused.send(emit)
        back = refused.next("error", WAIT, lambda e: e.error.code == Code.STANDBY)
        self.assertIsNotNone(back)
        self.assertEqual(back.error.refused, emit.SerializeToString())
        self.assertEqual(back.error.id, "")

        # A gateway's SUB subscribed at both brokers, as a gateway's is.
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, room_topic("/", "lobby"))
        sub.connect(self.primary.xpub)
        sub.connect(self.backup.xpub)
        self.addCleanup(sub.close, 0)

        streams = []

        def said(client, text):
            """True once `text` comes over the SUB, the say sent again until
            then; its stamp's stream goes to `streams`."""
            def once():
                client.submit("t", "say", json.dumps([text]), sid=f"{client.id}.x", wants_reply=False)
                while sub.poll(100, zmq.POLLIN):
                    topic, body, stamp = sub.recv_multipart()
                    env = pb.Envelope()
                    env.ParseFromString(body)
                    if args_of(env.emit) == [text]:
                        streams.append(struct.unpack("<QQ", stamp)[0])
                        return True
                return False
            return eventually(once, WAIT)

        gw = self.peer_at(self.primary, "gwP", pb.ROLE_GATEWAY)
        self.assertTrue(gw.hello())
        self.assertTrue(said(gw, "before"), "a room emit did not come through the primary")
        self.assertEqual(self.backup.metric("sidecast_broker_events_total") or 0, 0,
                         "the passive backup was sent the worker's emits")

        primary_term = json.loads(http_get(self.primary.http_port, "/status")[1])["pair"]["term"]
        self.primary.kill()
        c3 = self.served_at(self.backup, "c3")
        self.assertIsNotNone(c3, "the worker did not move to the backup")
        gw2 = self.peer_at(self.backup, "gwB", pb.ROLE_GATEWAY)
        self.assertTrue(gw2.hello())
        self.assertTrue(said(gw2, "after"), "a room emit did not come through the backup")
        # The backup numbers the room's events in a stream of its own: a
        # gateway counts no gap across the failover (docs/protocol.md).
        self.assertNotEqual(streams[0], streams[1])
        status = json.loads(http_get(self.backup.http_port, "/status")[1])
        self.assertEqual(status["pair"]["state"], "active")
        self.assertGreater(status["pair"]["term"], primary_term, "the failover's term is not the later one")


    def test_a_resumed_primary_has_no_event_of_the_worker_to_deliver_late(self):
        """The active primary stops (SIGSTOP), the backup takes over, the
        primary resumes, sees the backup active and steps down. The worker's
        PUB left the primary when its link did, so what it published since
        (on the backup) never reached the primary: a gateway still
        subscribed there would get none of it late, and one on the backup
        gets each event once."""
        svc = Service("t", capacity=2)
        svc.on("echo", lambda req: req.reply(*req.args))
        w = Worker(self.primary.router, self.primary.xsub, worker_id="pys",
                   backup_broker=self.backup.router, backup_publish=self.backup.xsub)
        w.add(svc)
        self.workers.append(w.start())
        self.assertTrue(w.wait_connected(WAIT))
        self.assertIsNotNone(self.served_at(self.primary, "c1"))
        self.assertTrue(eventually(
            lambda: json.loads(http_get(self.backup.http_port, "/status")[1])["pair"]["state"] == "passive"))

        def sub_at(broker):
            sub = self.ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, room_topic("/", "lobby"))
            sub.connect(broker.xpub)
            self.addCleanup(sub.close, 0)
            return sub

        streams = {}  # text -> the stream its stamp named

        def texts(sub, duration):
            got, until = [], time.monotonic() + duration
            while (left := until - time.monotonic()) > 0:
                if sub.poll(int(left * 1000) + 1, zmq.POLLIN):
                    _, body, stamp = sub.recv_multipart()
                    env = pb.Envelope()
                    env.ParseFromString(body)
                    got.append(args_of(env.emit)[0])
                    streams[got[-1]] = struct.unpack("<QQ", stamp)[0]
            return got

        at_primary = sub_at(self.primary)
        self.assertTrue(eventually(lambda: w.emit_to_room("lobby", "said", "first") and
                                   "first" in texts(at_primary, 0.1)), "no event through the primary")
        self.primary.process.signal(signal.SIGSTOP)
        try:
            self.assertIsNotNone(self.served_at(self.backup, "c3"), "no failover to the backup")
            at_backup = sub_at(self.backup)
            self.assertTrue(eventually(lambda: w.emit_to_room("lobby", "said", "probe") and
                                       "probe" in texts(at_backup, 0.1)), "no event through the backup")
            for i in range(20):
                w.emit_to_room("lobby", "said", f"moved-{i}")
        finally:
            self.primary.process.signal(signal.SIGCONT)
        self.assertTrue(eventually(
            lambda: json.loads(http_get(self.primary.http_port, "/status")[1])["pair"]["state"] == "passive"),
            "the resumed primary did not step down")
        late = [t for t in texts(at_primary, 1.0) if t.startswith("moved-")]
        self.assertEqual(late, [], "the resumed primary delivered what the worker published after it moved")
        moved = [t for t in texts(at_backup, 0.5) if t.startswith("moved-")]
        self.assertEqual(moved, [f"moved-{i}" for i in range(20)])

        # The backup dies: the primary, passive since it resumed, takes over
        # again, and numbers the room's events in a new stream, not on from
        # its first activation's (a gateway would count what the backup
        # published meanwhile as lost).
        self.backup.kill()
        self.assertIsNotNone(self.served_at(self.primary, "c4"), "the primary did not take over again")
        self.assertTrue(eventually(lambda: w.emit_to_room("lobby", "said", "again") and
                                   "again" in texts(at_primary, 0.1)), "no event through the primary again")
        self.assertNotEqual(streams["again"], streams["first"])

if __name__ == "__main__":
    main()
