#!/usr/bin/python3
"""Unit tests of the Python worker SDK: codecs, the request's answer rules,
what a gateway-gone hook gets, and socket checks.

No sockets, no threads beyond the caller's, no sleeps.

    PYTHONPATH=<build>/python:workers/python /usr/bin/python3 tests/python/test_sdk_unit.py -v
"""
import heapq
import json
import time
import unittest

from sidecast.v1 import envelope_pb2 as pb
from sidecast_worker import (CONNECT, DISCONNECT, EVENT, Code, GatewayGone, Request, Service, SocketState, Welcome,
                             Worker, codec)
from sidecast_worker import worker as worker_module


class TopicTest(unittest.TestCase):
    def test_topics_end_with_nul(self):
        self.assertEqual(codec.room_topic("/chat", "lobby"), b"r/chat\0lobby\0")
        self.assertEqual(codec.namespace_topic("/"), b"n/\0")
        self.assertEqual(codec.room_topic("/", "é"), b"r/\0\xc3\xa9\0")

    def test_topic_for_emit(self):
        e = pb.Emit(nsp="/a", room="r")
        self.assertEqual(codec.topic_for(e), b"r/a\0r\0")
        e = pb.Emit(nsp="/a", broadcast=True)
        self.assertEqual(codec.topic_for(e), b"n/a\0")
        self.assertEqual(codec.topic_for(pb.Emit(nsp="/a", sid="gw.x")), b"")
        self.assertEqual(codec.topic_for(pb.Emit(nsp="/a")), b"")


    def test_topic_for_a_room_wide_control(self):
        self.assertEqual(codec.topic_for(pb.Control(nsp="/a", in_room="r")), b"r/a\0r\0")
        self.assertEqual(codec.topic_for(pb.Control(nsp="/a", in_namespace=True)), b"n/a\0")
        self.assertEqual(codec.topic_for(pb.Control(nsp="/a", sid="gw.x")), b"")
        self.assertEqual(codec.topic_for(pb.Control(nsp="/a", in_namespace=False)), b"")
        self.assertEqual(codec.topic_for(pb.Control(in_room="r")), b"", "no namespace, no topic")


class IdTest(unittest.TestCase):
    def test_valid_peer_id(self):
        for good in ("w1", "gw-A_b", "x" * 64):
            self.assertTrue(codec.valid_peer_id(good), good)
        for bad in ("", "a.b", "a:b", "a\0b", "x" * 65, "é" * 33):
            self.assertFalse(codec.valid_peer_id(bad), bad)

    def test_default_worker_id_is_valid(self):
        wid = codec.default_worker_id()
        self.assertTrue(wid.startswith("w-"))
        self.assertTrue(codec.valid_peer_id(wid))

    def test_sid_owner(self):
        self.assertEqual(codec.sid_owner("gw1.abc"), "gw1")
        self.assertEqual(codec.sid_owner("nodot"), "")

    def test_worker_refuses_bad_id(self):
        with self.assertRaises(ValueError):
            Worker(worker_id="has.dot")


class ArgsTest(unittest.TestCase):
    def test_plain_json_round_trip(self):
        args = [1, "two", {"three": [3.5, None, True]}, "é✓"]
        text, att = codec.pack_args(args)
        self.assertEqual(att, [])
        self.assertEqual(text, '[1,"two",{"three":[3.5,null,true]},"é✓"]')
        self.assertEqual(codec.unpack_args(text), args)

    def test_binary_becomes_placeholders_in_order(self):
        text, att = codec.pack_args([b"a", {"x": bytearray(b"b"), "y": [memoryview(b"c")]}, (b"d",)])
        self.assertEqual(json.loads(text), [
            {"_placeholder": True, "num": 0},
            {"x": {"_placeholder": True, "num": 1}, "y": [{"_placeholder": True, "num": 2}]},
            [{"_placeholder": True, "num": 3}]])
        self.assertEqual(att, [b"a", b"b", b"c", b"d"])
        self.assertEqual(codec.unpack_args(text, att), [b"a", {"x": b"b", "y": [b"c"]}, [b"d"]])

    def test_bad_input_gives_empty_args(self):
        for text in ("", "{", '{"a":1}', "3", b"\xff"):
            self.assertEqual(codec.unpack_args(text), [], text)

    def test_bad_placeholders_stay(self):
        for ph in ({"_placeholder": True, "num": 5}, {"_placeholder": True, "num": True},
                   {"_placeholder": 1, "num": 0}):
            self.assertEqual(codec.unpack_args(json.dumps([ph]), [b"x"]), [ph])


class CodeTest(unittest.TestCase):
    def test_codes_match_the_proto(self):
        proto = {v.name: v.number for v in pb.DESCRIPTOR.enum_types_by_name["Code"].values}
        self.assertEqual({c.name: c.value for c in Code}, proto)


class FakeCore:
    """Records what a Request would send."""

    worker_id = "w1"

    def __init__(self):
        self.replies = []
        self.sent = []

    def build_reply(self, req, code, message, args_json, attachments, silent, partial):
        return {"code": code, "message": message, "args": json.loads(args_json),
                "attachments": list(attachments), "silent": silent, "partial": partial}

    def send_reply(self, req, reply, partial):
        self.replies.append(reply)
        return True

    def emit_to_sid(self, *a, **kw):
        self.sent.append(("emit", a))
        return True


def make(kind=EVENT, deadline_in=30.0, **kw):
    core = FakeCore()
    return core, Request(core, kind, "c:1", "svc", deadline=time.monotonic() + deadline_in, **kw)


class RequestTest(unittest.TestCase):
    def test_one_final_answer(self):
        core, req = make()
        self.assertTrue(req.reply(1, "a"))
        self.assertFalse(req.reply(2))
        self.assertFalse(req.fail(Code.INTERNAL, "late"))
        req._finish()
        self.assertEqual(core.replies, [{"code": Code.OK, "message": "", "args": [1, "a"],
                                         "attachments": [], "silent": False, "partial": False}])

    def test_no_answer_is_silent(self):
        core, req = make()
        req._finish()
        self.assertEqual([(r["code"], r["silent"], r["partial"]) for r in core.replies],
                         [(Code.OK, True, False)])

    def test_ack_then_silent_final_reply(self):
        core, req = make()
        self.assertTrue(req.ack({"task_id": "t1"}))
        self.assertIsNone(req.deadline)
        self.assertFalse(req.ack("again"))
        self.assertTrue(req.fail(Code.INTERNAL, "ignored: the requester has its answer"))
        req._finish()
        self.assertEqual([(r["code"], r["args"], r["silent"], r["partial"]) for r in core.replies],
                         [(Code.OK, [{"task_id": "t1"}], False, True), (Code.OK, [], True, False)])

    def test_ack_then_return_frees_capacity(self):
        core, req = make()
        req.ack()
        req._finish()
        self.assertEqual([(r["silent"], r["partial"]) for r in core.replies], [(False, True), (True, False)])

    def test_fail(self):
        core, req = make()
        req.fail(Code.BAD_REQUEST, "count must be 1..20")
        self.assertEqual((core.replies[0]["code"], core.replies[0]["message"]),
                         (Code.BAD_REQUEST, "count must be 1..20"))

    def test_connect_answers_are_objects(self):
        core, req = make(CONNECT)
        req._finish()
        self.assertEqual(core.replies[-1]["args"], {})
        core, req = make(CONNECT)
        req.reply({"user": "ann"})
        self.assertEqual(core.replies[-1]["args"], {"user": "ann"})
        core, req = make(CONNECT)
        req.refuse("forbidden")
        self.assertEqual((core.replies[-1]["code"], core.replies[-1]["message"]), (Code.REFUSED, "forbidden"))

    def test_disconnect_reason(self):
        _, req = make(DISCONNECT, args_json='["transport close"]')
        self.assertEqual(req.reason, "transport close")

    def test_data_is_parsed(self):
        _, req = make(args_json='[{"_placeholder":true,"num":0},2]', attachments=[b"z"],
                      auth_json='{"token":"t"}')
        self.assertEqual(req.args, [b"z", 2])
        self.assertEqual(req.auth, {"token": "t"})
        _, req = make(auth_json="[1]")
        self.assertEqual(req.auth, {})

    def test_binary_reply(self):
        core, req = make()
        req.reply(b"\x00", {"k": b"\x01"})
        self.assertEqual(core.replies[0]["attachments"], [b"\x00", b"\x01"])

    def test_sleep_and_cancellation(self):
        _, req = make()
        self.assertTrue(req.sleep(0))
        req._cancel(Code.CANCELLED)
        req._cancel(Code.TIMEOUT)  # the first reason stays
        self.assertFalse(req.sleep(1))
        self.assertEqual(req.cancel_reason, Code.CANCELLED)

    def test_sleep_stops_at_the_deadline(self):
        _, req = make(deadline_in=0.0)
        self.assertFalse(req.sleep(5))
        self.assertEqual(req.cancel_reason, Code.TIMEOUT)
        self.assertTrue(req.cancelled.is_set())


class AnswerOnTheCoreTest(unittest.TestCase):
    """Answers through the worker's own _Core, not started: what it sends
    stays in its outbox. An answer either goes (and the request leaves
    in_flight: its capacity at the broker comes back) or raises and leaves
    the request unanswered; never answered with nothing sent."""

    def setUp(self):
        worker = Worker(worker_id="w1")
        self.addCleanup(worker.stop)
        self.core = worker._core

    def request(self, rid, kind=EVENT):
        req = Request(self.core, kind, rid, "svc", deadline=time.monotonic() + 30.0)
        with self.core.in_flight_lock:
            self.core.in_flight[rid] = req
        return req

    def sent(self):
        replies = []
        while not self.core.outbox.empty():
            r = worker_module.reply_in(self.core.outbox.get_nowait()[1])
            replies.append((r.id, Code(r.code), r.message, r.silent, r.partial))
        return replies

    def test_a_message_that_is_not_text_is_sent_as_text(self):
        self.assertTrue(self.request("c:1").fail(Code.BAD_REQUEST, ValueError("count must be 1..20")))
        self.assertTrue(self.request("c:2", CONNECT).refuse({"why": "banned"}))
        self.assertTrue(self.request("c:3").fail(Code.BAD_REQUEST, b"bad \xff"))
        self.assertEqual(self.sent(), [("c:1", Code.BAD_REQUEST, "count must be 1..20", False, False),
                                       ("c:2", Code.REFUSED, "{'why': 'banned'}", False, False),
                                       ("c:3", Code.BAD_REQUEST, "bad \ufffd", False, False)])
        self.assertEqual(self.core.in_flight, {}, "an answered request still holds its capacity")

    def test_an_answer_that_cannot_be_built_leaves_the_request_unanswered(self):
        req = self.request("c:1")
        real = self.core.build_reply

        def broken(*args):
            raise RuntimeError("cannot build")
        self.core.build_reply = broken
        with self.assertRaises(RuntimeError):
            req.fail(Code.BAD_REQUEST, "no")
        with self.assertRaises(RuntimeError):
            req.ack()
        self.core.build_reply = real
        self.assertFalse(req.answered)
        self.assertIsNotNone(req.deadline, "counted as acked")
        self.assertEqual(self.sent(), [])
        self.assertIn("c:1", self.core.in_flight)
        # No JSON: raises before anything is decided, too.
        with self.assertRaises(TypeError):
            req.ack(object())
        with self.assertRaises(ValueError):
            req.reply(float("nan"))
        self.assertTrue(req.fail(Code.BAD_REQUEST, "no"))
        self.assertEqual(self.sent(), [("c:1", Code.BAD_REQUEST, "no", False, False)])
        self.assertEqual(self.core.in_flight, {})

    def test_a_handler_raising_any_base_exception_answers_internal(self):
        for n, (exc, message) in enumerate([(SystemExit(3), "SystemExit: 3"),
                                            (KeyboardInterrupt(), "KeyboardInterrupt"),
                                            (ValueError("bad"), "bad")]):
            req = self.request(f"c:{n}")

            def handler(_req, exc=exc):
                raise exc
            with self.core.stats_lock:
                self.core.waiting += 1
            with self.assertLogs("sidecast_worker", "ERROR"):  # logged, not only answered
                try:
                    self.core.run_handler(handler, req)
                except BaseException as e:  # the old code let it out (a KeyboardInterrupt would end the run)
                    self.fail(f"run_handler let {e!r} out")
            self.assertEqual(self.sent(), [(f"c:{n}", Code.INTERNAL, message, False, False)], exc)
        self.assertEqual(self.core.counts["handler_errors"], 3)
        self.assertEqual(self.core.in_flight, {})

    def test_an_emit_with_ack_of_no_json_awaits_no_ack(self):
        req = self.request("c:1")
        results = []
        with self.assertRaises(TypeError):
            req.emit_with_ack("ask", object(), callback=results.append)
        with self.assertRaises(ValueError):
            req.emit_with_ack("ask", float("nan"))
        self.assertEqual((self.core.acks, self.core.ack_heap), ({}, []), "an ack awaited for an emit never sent")
        self.assertTrue(self.core.outbox.empty())
        future = req.emit_with_ack("ask", 1)
        self.assertIsNotNone(future)
        self.assertEqual(len(self.core.acks), 1)

    def test_stop_before_start_answers_an_awaited_ack_cancelled(self):
        # No pool yet to run its callback on: stop() raised AttributeError.
        results = []
        future = self.request("c:1").emit_with_ack("ask", 1, callback=results.append)
        self.core.stop()
        self.assertEqual(future.result(0).code, Code.CANCELLED)
        self.assertEqual([r.code for r in results], [Code.CANCELLED])


class GatewayGoneOnTheCoreTest(unittest.TestCase):
    """A GatewayGone envelope through the worker's own _Core, not started:
    with no pool yet, the hooks run on the caller's thread, and what they
    send stays in the outbox."""

    def setUp(self):
        self.calls = []
        svc = Service("a")
        svc.on_gateway_gone(self.calls.append)
        self.worker = Worker(worker_id="w1").add(svc).add(Service("plain"))
        self.addCleanup(self.worker.stop)
        self.core = self.worker._core

    def announce(self, sid_prefix, reason="silent", gateway="gw1"):
        env = pb.Envelope()
        env.gateway_gone.gateway, env.gateway_gone.sid_prefix, env.gateway_gone.reason = gateway, sid_prefix, reason
        self.core.on_message(env)

    def test_the_hook_gets_the_gateway_its_prefix_and_why(self):
        with self.assertNoLogs("sidecast_worker", "WARNING"):  # not an "unexpected" kind any more
            self.announce("gw1.Xy12_-Qz", "replaced")
        self.assertEqual([(g.gateway, g.sid_prefix, g.reason) for g in self.calls],
                         [("gw1", "gw1.Xy12_-Qz", "replaced")])
        self.assertEqual(self.worker.stats().gateways_gone, 1)

    def test_a_prefix_that_would_own_other_gateways_sids_is_ignored(self):
        for prefix in ("", "gw1", "gw1."):
            with self.assertLogs("sidecast_worker", "WARNING"):
                self.announce(prefix)
        self.assertEqual((self.calls, self.worker.stats().gateways_gone), ([], 0))

    def test_a_hook_that_raises_anything_is_counted_not_raised(self):
        def fail(gone):
            raise SystemExit(3)
        self.core.services["a"].on_gateway_gone(fail)
        with self.assertLogs("sidecast_worker", "ERROR"):
            self.announce("gw1.a")
        stats = self.worker.stats()
        self.assertEqual((stats.handler_errors, stats.gateways_gone), (1, 1))

    def test_emit_to_room_publishes_as_the_worker_does(self):
        self.core.services["a"].on_gateway_gone(
            lambda gone: gone.emit_to_room("lobby", "left", gone.sid_prefix, nsp="/chat", except_sids=["gw2.x"]))
        self.announce("gw1.a")
        topic, data, notice = self.core.outbox.get_nowait()
        env = pb.Envelope()
        env.ParseFromString(data)
        self.assertEqual((topic, notice), (b"r/chat\0lobby\0", False))
        e = env.emit
        self.assertEqual((e.room, e.nsp, e.event, json.loads(e.args), list(e.except_sids), e.origin),
                         ("lobby", "/chat", "left", ["gw1.a"], ["gw2.x"], "w1"))

    def test_owns_is_a_prefix_match(self):
        gone = GatewayGone(self.core, "gw1", "gw1.ab", "silent")
        self.assertTrue(gone.owns("gw1.abXYZ"))
        self.assertFalse(gone.owns("gw1.aXYZ"))
        self.assertFalse(gone.owns("gw10.abXYZ"))
        self.assertFalse(gone.owns(""))


class CheckSocketOnTheCoreTest(unittest.TestCase):
    """Socket checks and the welcome hook's object through the worker's own
    _Core, not started: with no pool yet, callbacks run on the caller's
    thread, and what is sent stays in the outbox."""

    def setUp(self):
        self.worker = Worker(worker_id="w1").add(Service("a"))
        self.addCleanup(self.worker.stop)
        self.core = self.worker._core
        self.reports = []
        self.worker.on_report(self.reports.append)

    def sent(self):
        topic, data, notice = self.core.outbox.get_nowait()
        env = pb.Envelope()
        env.ParseFromString(data)
        return topic, env, notice

    def report(self, status, ref, sid="gw1.a"):
        env = pb.Envelope()
        env.report.status, env.report.sid, env.report.ref, env.report.to = status, sid, ref, "w1"
        self.core.on_message(env)

    def test_a_check_is_a_control_whose_report_settles_it(self):
        found = []
        self.assertTrue(self.worker.check_socket("/chat", "gw1.a", found.append))
        topic, env, notice = self.sent()
        c = env.control
        self.assertEqual((topic, notice), (None, True), "not a one-way message on the broker link")
        self.assertEqual((c.action, c.nsp, c.sid, c.origin, c.room), (pb.Control.CHECK, "/chat", "gw1.a", "w1", ""))
        self.assertTrue(c.ref.startswith("w1:"), c.ref)
        self.assertIn(c.ref, self.core.acks)
        self.report(pb.DeliveryReport.CLIENT_GONE, c.ref)
        self.assertEqual((found, self.reports, self.core.acks), ([SocketState.GONE], [], {}))

    def test_each_status_reads_as_a_state(self):
        self.assertEqual({name: worker_module.state_of(number) for name, number in pb.DeliveryReport.Status.items()},
                         {"STATUS_UNSPECIFIED": SocketState.UNKNOWN, "DELIVERED": SocketState.PRESENT,
                          "CLIENT_GONE": SocketState.GONE, "GATEWAY_GONE": SocketState.NO_GATEWAY,
                          "REJECTED": SocketState.UNKNOWN, "REQUESTER_GONE": SocketState.UNKNOWN})
        self.assertEqual(SocketState.NO_GATEWAY, "no_gateway")
        self.assertEqual(f"{SocketState.PRESENT}", "present")

    def test_a_check_needs_a_callback_and_awaits_nothing_without(self):
        with self.assertRaises(TypeError):
            self.worker.check_socket("/", "gw1.a", None)
        self.assertEqual((self.core.acks, self.core.ack_heap), ({}, []))
        self.assertTrue(self.core.outbox.empty())

    def test_stop_settles_an_awaited_check_unknown_and_refuses_later_ones(self):
        found = []
        self.assertTrue(self.worker.check_socket("/", "gw1.a", found.append))
        self.core.stop()
        self.assertEqual(found, [SocketState.UNKNOWN])
        self.assertFalse(self.worker.check_socket("/", "gw1.b", found.append))
        self.assertEqual(found, [SocketState.UNKNOWN])

    def test_the_welcome_checks_and_emits_to_a_room_as_the_worker_does(self):
        found = []
        welcome = Welcome(self.core, True)
        self.assertTrue(welcome.first)
        self.assertTrue(welcome.check_socket("", "gw1.a", found.append, timeout=5.0))
        _, env, _ = self.sent()
        self.assertEqual((env.control.action, env.control.nsp, env.control.sid), (pb.Control.CHECK, "", "gw1.a"))
        self.report(pb.DeliveryReport.DELIVERED, env.control.ref)
        self.assertEqual(found, [SocketState.PRESENT])
        self.assertTrue(welcome.emit_to_room("lobby", "back", 1, nsp="/chat", except_sids=["gw2.x"]))
        topic, env, notice = self.sent()
        self.assertEqual((topic, notice), (b"r/chat\0lobby\0", False))
        e = env.emit
        self.assertEqual((e.room, e.nsp, e.event, json.loads(e.args), list(e.except_sids), e.origin),
                         ("lobby", "/chat", "back", [1], ["gw2.x"], "w1"))


class ServiceTest(unittest.TestCase):
    def test_registration(self):
        svc = Service("s", capacity=2)

        @svc.on("a")
        def a(req):
            return 1

        def star(req):
            return 2

        self.assertIs(svc.on("*", star), svc)  # direct calls chain
        self.assertIs(svc.handler_for(EVENT, "a"), a)  # decorators return the function
        self.assertIs(svc.handler_for(EVENT, "other"), star)
        self.assertIsNone(svc.handler_for(CONNECT, "connect"))
        hook = svc.on_connect(lambda req: None)
        self.assertIs(hook, svc)
        self.assertIsNotNone(svc.handler_for(CONNECT, "connect"))

        def forget(gone):
            pass

        self.assertIs(svc.on_gateway_gone(forget), svc)
        self.assertIs(svc._on_gateway_gone, forget)
        self.assertIs(svc.on_gateway_gone()(print), print)
        self.assertIs(svc._on_gateway_gone, print)
        self.assertIs(svc.on_welcome(forget), svc)
        self.assertIs(svc._on_welcome, forget)
        self.assertIs(svc.on_welcome()(print), print)
        self.assertIs(svc._on_welcome, print)

    def test_bad_services(self):
        with self.assertRaises(ValueError):
            Service("s", capacity=0)
        with self.assertRaises(ValueError):
            Service("")

    def test_async_handlers_are_refused(self):
        svc = Service("s")

        async def handler(req):
            pass

        svc.on("x", handler)
        with self.assertRaises(TypeError):
            Worker().add(svc)
        hook = Service("s").on_gateway_gone(handler)
        with self.assertRaises(TypeError):
            Worker().add(hook)
        with self.assertRaises(TypeError):
            Worker().add(Service("s").on_welcome(handler))


class CompactHeapTest(unittest.TestCase):
    """worker.compact_heap: a deadline heap whose entries are settled early
    is rebuilt from the live ones past twice as many plus COMPACT_FLOOR."""

    def test_rebuilt_past_the_bound_with_the_live_entries_only(self):
        live = {3, 500, 1000}
        heap = []
        for n in range(2 * len(live) + worker_module.COMPACT_FLOOR):
            heapq.heappush(heap, (n % 97, n))
            worker_module.compact_heap(heap, len(live), lambda entry: entry[1] in live)
        self.assertEqual(len(heap), 2 * len(live) + worker_module.COMPACT_FLOOR, "rebuilt before the bound")
        heapq.heappush(heap, (0, -1))
        worker_module.compact_heap(heap, len(live), lambda entry: entry[1] in live)
        self.assertEqual(sorted(n for _, n in heap), sorted(live))
        self.assertEqual([heapq.heappop(heap)[1] for _ in range(3)], [3, 500, 1000], "not a heap")


if __name__ == "__main__":
    unittest.main()
