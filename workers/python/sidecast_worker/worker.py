"""The worker: serves services behind the broker (workers/sdk/worker.cpp in Python).

Threads: one I/O thread owns every ZeroMQ socket (the DEALER to the broker's
ROUTER and the PUB to its XSUB) and runs the poll loop: heartbeats, broker
liveness, deadlines, dispatch. Handlers run on a thread pool; everything
they send goes through a bounded outbox plus an eventfd wake-up to the I/O
thread, so a handler that sleeps for a minute never delays a heartbeat.
"""
import collections
import concurrent.futures
import heapq
import inspect
import itertools
import logging
import math
import numbers
import os
import queue
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import zmq

from . import codec
from ._proto import Code, code_of, pb
from .link import PeerLink, RateLimitedLog, apply_curve
from .request import CONNECT, DISCONNECT, EVENT, GatewayGone, Request, SocketState, Welcome, as_text
from .service import Service

log = logging.getLogger("sidecast_worker")

# Seconds the last messages (replies, the Goodbye) may take to leave once the
# link is closed: a broker that is gone costs stop() that long.
GOODBYE_LINGER = 0.5

# A deadline heap is rebuilt from its live entries once it holds more than
# twice as many as are live plus this many (see compact_heap).
COMPACT_FLOOR = 1024


def compact_heap(heap, live, keep):
    """A heap of deadlines whose items are settled before their deadline
    (a request answered, an emit acked) keeps their entries until then: it
    would grow with the rate times the timeout, not with what is live. Once
    it holds more than ``2 * live + COMPACT_FLOOR`` entries it is rebuilt,
    in place, from those ``keep(entry)`` says are live; a rebuild leaves at
    most ``live``, so its cost spreads over the many pushes before the next."""
    if len(heap) > 2 * live + COMPACT_FLOOR:
        heap[:] = [entry for entry in heap if keep(entry)]
        heapq.heapify(heap)


@dataclass(frozen=True)
class AckResult:
    """A client's ack of ``emit_with_ack``, or Code.TIMEOUT when none came in time.
    ``message``: why, when the gateway answered for the client (code not OK)."""

    code: Code
    args: list = field(default_factory=list)
    args_json: str = "[]"
    attachments: list = field(default_factory=list)
    message: str = ""


@dataclass(frozen=True)
class DeliveryReport:
    """Addressed traffic (an emit to a sid, a join...) that could not be delivered,
    or was, when ``report_delivery`` asked for it; or an answer (a handler's
    reply) the broker could not pass to the requester (``ref`` = the request id).

    ``status``: "DELIVERED", "CLIENT_GONE", "GATEWAY_GONE", "REJECTED" or
    "REQUESTER_GONE".
    """

    status: str
    sid: str
    ref: str = ""
    detail: str = ""


@dataclass(frozen=True)
class WorkerStats:
    requests: int = 0
    replies: int = 0
    cancels: int = 0
    outbox_dropped: int = 0
    handler_errors: int = 0
    reconnects: int = 0
    acks_refused: int = 0  # emit_with_ack and check_socket calls refused: pending_acks_limit awaited already
    requests_refused: int = 0  # answered BUSY: queue_limit requests already waited for a handler thread
    jobs_again: int = 0  # jobs the broker sent again (after a new socket) that were held or answered here: not run again
    replies_resent: int = 0  # kept answers sent again for those
    running: int = 0  # requests taken and not yet finally answered
    draining: bool = False  # drain() has begun
    kept_bytes: int = 0  # what the kept answers hold now (kept_reply_bytes bounds it)
    notices_resent: int = 0  # one-way messages that died in a replaced socket, sent again
    kept_notice_bytes: int = 0  # what the kept one-way messages hold now (kept_notice_bytes bounds it)
    held: int = 0  # messages held until the broker welcomes a new socket (hwm bounds it)
    recalled: int = 0  # final answers the broker asked for again (Recall; the kept ones count in replies_resent)
    gateways_gone: int = 0  # GatewayGone announcements taken (one naming no sid prefix is ignored, not counted)
    requests_expired: int = 0  # cancelled or past their deadline while they waited for a handler thread: not run


class _Wakeup:
    """A file descriptor the I/O thread polls next to its sockets; any thread
    signals it. An eventfd on Linux, a non-blocking pipe elsewhere."""

    def __init__(self):
        if hasattr(os, "eventfd"):
            self.fd = self._write_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - not Linux
            self.fd, self._write_fd = os.pipe()
            os.set_blocking(self.fd, False)
            os.set_blocking(self._write_fd, False)

    def signal(self):
        try:
            os.write(self._write_fd, (1).to_bytes(8, sys.byteorder))
        except BlockingIOError:
            pass  # saturated: a wake-up is pending anyway

    def drain(self):
        try:
            os.read(self.fd, 4096)
        except BlockingIOError:
            pass

    def __del__(self):
        # Only once nothing can signal it any more: a closed fd number could
        # be reused by another file before a late signal() wrote to it.
        for fd in {getattr(self, "fd", None), getattr(self, "_write_fd", None)} - {None}:
            os.close(fd)


class _Check:
    """A check_socket awaited (an entry of _Core.acks, beside the
    emit_with_ack ones): settled by the delivery report its Control asks
    for, whose ref is the entry's id, or as unknown at its timeout or stop."""

    __slots__ = ("callback",)

    def __init__(self, callback):
        self.callback = callback


def state_of(status):
    """What a check_socket's report says of the socket."""
    if status == pb.DeliveryReport.DELIVERED:
        return SocketState.PRESENT
    if status == pb.DeliveryReport.CLIENT_GONE:
        return SocketState.GONE
    if status == pb.DeliveryReport.GATEWAY_GONE:
        return SocketState.NO_GATEWAY
    return SocketState.UNKNOWN  # REJECTED: another namespace, a full pipe, a gateway of an earlier build


def reply_in(data):
    """The Reply ``data`` holds as an envelope, or None."""
    env = pb.Envelope()
    try:
        env.ParseFromString(data)
    except Exception:  # protobuf's DecodeError: not a Reply either
        return None
    return env.reply if env.WhichOneof("kind") == "reply" else None


class _Core:
    """State shared by the I/O thread, the handler threads and the Worker facade."""

    def __init__(self, broker, publish, worker_id, heartbeat_interval, heartbeat_liveness,
                 threads, outbox_limit, outbox_wait, pending_acks_limit, hwm, default_timeout,
                 curve, context, queue_limit, kept_replies, kept_reply_bytes, kept_notices,
                 kept_notice_bytes, backup=(None, None)):
        self.worker_id = worker_id or codec.default_worker_id()
        if not codec.valid_peer_id(self.worker_id):
            raise ValueError(f"worker id {self.worker_id!r} must be 1-64 bytes without '.' or ':'")
        self.broker = broker
        self.publish_endpoint = publish
        self.backup_broker, self.backup_publish = backup  # a broker pair's other ROUTER and XSUB
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_liveness = heartbeat_liveness
        self.threads = threads
        self.outbox_limit = outbox_limit
        self.outbox_wait = outbox_wait
        self.pending_acks_limit = pending_acks_limit
        self.queue_limit = queue_limit
        self.kept_replies = kept_replies
        self.kept_reply_bytes = kept_reply_bytes
        # The answers sent last, (request id, bytes), oldest first.
        self.kept = collections.deque()
        self.kept_bytes = 0
        self.kept_lock = threading.Lock()
        # The one-way messages sent that the broker has not said it read,
        # (Hello number, number after it, bytes), oldest first: I/O thread
        # only (see resend_lost, forget_read).
        self.kept_notices = kept_notices
        self.kept_notice_bytes = kept_notice_bytes
        self.notices = collections.deque()
        self.notice_bytes = 0
        self.hwm = hwm
        self.default_timeout = default_timeout
        self.curve = curve
        self.context = context
        self.own_context = context is None

        self.services = {}
        self.outbox = queue.Queue(maxsize=outbox_limit)
        # Answers that found the outbox full: never refused (each frees a
        # credit at the broker), so bounded by the requests running, each
        # answered at most twice. Taken before the outbox is drained (flush).
        self.answers_beside = []
        self.answers_lock = threading.Lock()
        # What the handlers queued while the link waited for the broker's
        # Welcome of a new socket (see flush), and what a standby gave back
        # meanwhile (see on_message), which goes ahead of it: I/O thread only.
        self.held = []
        self.given_back = []
        self.wake = _Wakeup()
        self.io_thread = None
        self.pool = None
        self.started = False
        self.stopping = threading.Event()
        self.stopped = threading.Event()
        self.io_failure = None  # the exception that ended the I/O thread
        self.connected = threading.Event()
        self.stop_lock = threading.Lock()
        self.local = threading.local()  # .in_pool on handler threads

        self.in_flight = {}  # request id -> Request, until its final answer
        self.in_flight_lock = threading.Condition()  # notified when in_flight empties (drain)
        # Requests whose handler runs (pool threads, under in_flight_lock):
        # stop() cancels them even after they answered.
        self.running = set()
        self.drain_asked = False  # the I/O thread tells the broker (PeerLink.drain)
        # The broker confirmed the Drain, or there is no broker to send more:
        # nothing new will arrive. Set by the I/O thread, under in_flight_lock.
        self.drain_settled = False
        self.deadlines = []  # heap of (deadline, seq, Request): I/O thread only
        self.seq = itertools.count()
        self.acks = {}  # ack id -> (Future, callback) of an emit_with_ack, or a _Check
        self.ack_heap = []  # heap of (deadline, ack id), under acks_lock; acked ones stay until compact_heap
        self.acks_lock = threading.Lock()
        # Under acks_lock: the I/O loop has ended (stop, or a failure), and
        # nothing would expire an entry of acks: none is awaited any more.
        self.io_closed = False
        # Ack ids "<worker id>:<n>" from a random point at each start: a
        # client's ack to an emit of an earlier start under the same id must
        # not answer one of this start's (as the C++ SDK).
        self.next_ack = itertools.count(secrets.randbits(48) + 1)
        self.report_callback = None
        self.backlog = 0  # report callbacks waiting for a handler thread
        self.waiting = 0  # requests waiting for a handler thread (bound: queue_limit)
        self.stats_lock = threading.Lock()
        self.counts = dict.fromkeys(set(WorkerStats.__dataclass_fields__)
                                    - {"running", "draining", "kept_bytes", "kept_notice_bytes", "held"}, 0)
        self.log_limit = RateLimitedLog()
        # The welcome hooks (see on_welcomed), I/O thread only: a Welcome came
        # since start; the link's fresh_welcomes at the last one acted on;
        # when the hooks run (None: not due); and whether for the first Welcome.
        self.ever_welcomed = False
        self.fresh_welcomes_seen = 0
        self.broker_restarts_seen = 0  # and its broker_restarts
        self.welcome_due = None
        self.welcome_first = False

    def count(self, what, n=1):
        with self.stats_lock:
            self.counts[what] += n

    # ---- the outbox: any thread -> the I/O thread ----

    def enqueue(self, topic, data, notice=False):
        """Queues ``data`` for the PUB socket under ``topic``, or (``topic``
        None) for the broker link: a one-way message if ``notice`` (kept once
        sent, see resend_lost), else an answer."""
        if self.stopping.is_set() or self.io_failure is not None:
            return False
        try:
            if topic is None and not notice:
                # An answer never waits for room, nor is dropped. Past a full
                # outbox it waits beside it, as every answer after it does
                # until flush takes them (answers leave in the order they
                # came: an early ack before its reply).
                with self.answers_lock:
                    if self.answers_beside:
                        self.answers_beside.append((topic, data, notice))
                    else:
                        try:
                            self.outbox.put_nowait((topic, data, notice))
                        except queue.Full:
                            self.answers_beside.append((topic, data, notice))
            elif threading.current_thread() is self.io_thread:
                # The I/O thread drains the outbox, so it must never wait for room.
                self.outbox.put_nowait((topic, data, notice))
            else:
                self.outbox.put((topic, data, notice), timeout=self.outbox_wait)
        except queue.Full:
            self.count("outbox_dropped")
            return False
        self.wake.signal()
        return True

    def send(self, env):
        """A one-way message on the broker link (an emit to a sid, a control)."""
        return self.enqueue(None, env.SerializeToString(), notice=True)

    def make_emit(self, env, nsp, event, args):
        args_json, att = codec.pack_args(args)
        e = env.emit
        e.nsp = nsp
        e.event = event
        e.args = args_json.encode()
        e.attachments.extend(att)
        e.origin = self.worker_id
        return e

    def emit_to_sid(self, nsp, sid, event, args, ack_id="", report_delivery=False, ref=""):
        env = pb.Envelope()
        e = self.make_emit(env, nsp, event, args)
        e.sid = sid
        e.ack_id = ack_id
        e.report_delivery = report_delivery
        e.ref = ref
        return self.send(env)

    def publish(self, nsp, room, event, args, except_sids=()):
        """A room (room is not None) or namespace emit, over the PUB socket."""
        env = pb.Envelope()
        e = self.make_emit(env, nsp, event, args)
        if room is None:
            e.broadcast = True
        else:
            e.room = room
        e.except_sids.extend(except_sids)
        return self.enqueue(codec.topic_for(e), env.SerializeToString())

    def publish_control(self, action, nsp, in_room, room=""):
        """A room-wide Control (in_room None: the whole namespace), over the
        PUB socket, behind this worker's room emits."""
        env = pb.Envelope()
        c = env.control
        c.action = action
        c.nsp = nsp
        c.room = room
        if in_room is None:
            c.in_namespace = True
        else:
            c.in_room = in_room
        c.origin = self.worker_id
        topic = codec.topic_for(c)
        if not topic:  # no namespace: the broker would drop it
            log.warning("worker %s: a room-wide join, leave or disconnect names no namespace: not sent",
                        self.worker_id)
            return False
        return self.enqueue(topic, env.SerializeToString())

    def control(self, action, nsp, sid, room, ref=""):
        env = pb.Envelope()
        c = env.control
        c.action = action
        c.nsp = nsp
        c.sid = sid
        c.room = room
        c.origin = self.worker_id
        c.ref = ref
        return self.send(env)

    def build_reply(self, req, code, message, args_json, attachments, silent, partial):
        """An answer to ``req`` as the bytes of its Reply envelope. May raise;
        nothing is sent or changed here (Request._answer builds the answer
        before it counts the request answered, then send_reply sends it)."""
        env = pb.Envelope()
        r = env.reply
        r.id = req.id
        r.code = int(code)
        # Text that UTF-8 cannot carry (a lone surrogate, as in a str made with
        # surrogateescape) must not stop the answer: it frees the capacity,
        # and the requester would wait for its deadline.
        r.message = as_text(message).encode("utf-8", "replace").decode("utf-8")
        try:
            r.args = args_json.encode() if isinstance(args_json, str) else args_json
        except UnicodeEncodeError:
            r.code = int(Code.INTERNAL)
            r.message = "the handler's answer is not valid UTF-8"
            r.args = b"[]"
        r.attachments.extend(attachments)
        r.silent = silent
        r.partial = partial
        return env.SerializeToString()

    def send_reply(self, req, data, partial):
        """Sends an answer build_reply made; a final one takes ``req`` out of in_flight."""
        try:
            # Never refused for a full outbox (enqueue): it also frees the capacity.
            # Queued before the request leaves in_flight: a drain() woken by that
            # stops the worker, whose last flush must find the reply there.
            self.enqueue(None, data)
            # Kept before the request leaves in_flight: a job sent again finds it
            # in one or the other (had_before).
            self.keep_reply(req.id, data)
        finally:
            # Even if that raised: the request is answered now, and one left
            # in in_flight would hold a drain() for its whole timeout.
            if not partial:
                self.count("replies")
                with self.in_flight_lock:
                    if self.in_flight.get(req.id) is req:
                        del self.in_flight[req.id]
                        if not self.in_flight:
                            self.in_flight_lock.notify_all()
        return True

    def emit_with_ack(self, nsp, sid, event, args, timeout, callback):
        future = concurrent.futures.Future()
        # Built before the ack is awaited: arguments that are no JSON raise
        # here, and leave no ack awaited (it would hold a pending_acks_limit
        # place, then call the callback TIMEOUT, for an emit never sent).
        env = pb.Envelope()
        e = self.make_emit(env, nsp, event, args)
        e.sid = sid
        ack_id = self.register_ack((future, callback), timeout)
        if ack_id is None:
            return None
        e.ack_id = ack_id
        if not self.send(env):
            with self.acks_lock:
                taken = self.acks.pop(ack_id, None)
            if taken is not None:
                return None
            # A stop() (or the deadline) answered it meanwhile: the callback
            # runs, so the caller must get the future, not "not sent".
        return future

    def register_ack(self, entry, timeout):
        """Awaits ``entry`` (an emit_with_ack's (Future, callback), or a
        _Check) for ``timeout`` seconds under a new id, returned; None when
        the worker is stopping, its I/O loop has ended (nothing would expire
        it), or pending_acks_limit are awaited already. A timeout that is
        no finite number of seconds >= 0 raises (before anything is awaited:
        an entry awaited with no deadline would hold its place for good)."""
        if (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
                or not math.isfinite(timeout) or timeout < 0):
            raise ValueError(f"timeout must be a finite number of seconds >= 0, not {timeout!r}")
        with self.acks_lock:
            if self.stopping.is_set() or self.io_closed:
                return None
            if len(self.acks) >= self.pending_acks_limit:
                self.count("acks_refused")
                return None
            ack_id = f"{self.worker_id}:{next(self.next_ack)}"
            self.acks[ack_id] = entry
            heapq.heappush(self.ack_heap, (time.monotonic() + timeout, ack_id))
            # An ack that comes (on_ack) leaves its entry here until its deadline.
            compact_heap(self.ack_heap, len(self.acks), lambda item: item[1] in self.acks)
        return ack_id

    def check_socket(self, nsp, sid, callback, timeout):
        """A Control CHECK for ``sid``, its ref the id of an awaited _Check
        that its delivery report settles (or its timeout, or a stop)."""
        if not callable(callback):
            raise TypeError("check_socket needs a callback")
        # Built before the check is awaited: what protobuf refuses raises
        # here, and leaves nothing awaited.
        env = pb.Envelope()
        c = env.control
        c.action = pb.Control.CHECK
        c.nsp = nsp
        c.sid = sid
        c.origin = self.worker_id
        ref = self.register_ack(_Check(callback), timeout)
        if ref is None:
            return False
        c.ref = ref
        if self.send(env):
            return True
        with self.acks_lock:
            taken = self.acks.pop(ref, None)
        # Not sent: False, and no call, unless a stop() (or the timeout)
        # settled it meanwhile: the callback runs then.
        return taken is None

    # ---- the handler pool ----

    def submit(self, fn, *args):
        if self.pool is None:
            # Never started (stop() answering an ack awaited before start()):
            # no pool to run it on, so here, as the pool would, errors logged.
            try:
                fn(*args)
            except BaseException:
                log.exception("sidecast worker callback failed")
            return True
        try:
            self.pool.submit(self.in_pool, fn, *args)
            return True
        except RuntimeError:  # the pool is shut down: the worker is stopping
            return False

    def in_pool(self, fn, *args):
        self.local.in_pool = True
        try:
            fn(*args)
        except BaseException:  # SystemExit too: the pool would drop it unsaid
            log.exception("sidecast worker callback failed")

    def run_handler(self, handler, req):
        with self.stats_lock:
            self.waiting -= 1
        if self.stopping.is_set():
            return  # queued when the worker stopped: the request is cancelled
        # Cancelled, or past its deadline, while it waited for a thread (a
        # pool busy with longer jobs, or with callbacks the broker's credits
        # do not count): its requester has had its answer, and a handler run
        # now would act on a request the client was told failed. A
        # DISCONNECT always runs: it is the service's cleanup.
        if req.kind != DISCONNECT:
            deadline = req._deadline
            if deadline is not None and time.monotonic() >= deadline:
                code, why = Code.TIMEOUT, "the deadline passed before a handler thread was free"
            elif req.cancelled.is_set():
                code, why = Code.CANCELLED, "cancelled before a handler thread was free"
            else:
                code = None
            if code is not None:
                self.count("requests_expired")
                req._cancel(code)
                req.fail(code, why)
                return
        with self.in_flight_lock:
            # Running: a stop() cancels it even after it replied (the reply
            # takes it out of in_flight, and the pool's shutdown waits for it).
            self.running.add(req)
        try:
            result = handler(req)
            if result is not None and not req.answered and not req._acked:
                if req.kind == CONNECT and isinstance(result, bool):
                    # As in Flask-SocketIO: a connect hook's False refuses
                    # (never "accepted, with data false"), True accepts.
                    req.accept() if result else req.refuse()
                else:
                    req.reply(result)
        except BaseException as e:
            # Anything a handler raises answers INTERNAL, as in the C++ SDK:
            # SystemExit and KeyboardInterrupt too (sys.exit() in a handler).
            # Not raised again: on a pool thread it would only vanish into a
            # future no one reads (it never stops the process), and the
            # thread serves the next request.
            self.count("handler_errors")
            if self.log_limit.allow():
                log.exception("handler for %s/%s (%s) failed", req.service, req.event, req.id)
            text = as_text(e)
            if not isinstance(e, Exception):
                text = f"{type(e).__name__}: {text}" if text else type(e).__name__
            req.fail(Code.INTERNAL, text or type(e).__name__)
        finally:
            with self.in_flight_lock:
                self.running.discard(req)
                if not self.running:
                    self.in_flight_lock.notify_all()  # a drain may wait for it
            req._finish()

    # ---- lifecycle ----

    def start(self):
        # Under stop()'s lock, as in the C++ SDK: a stop() from another thread
        # sees either nothing started or all of it, and after a stop() there
        # is nothing to start (no threads, no ZeroMQ context left behind).
        with self.stop_lock:
            if self.started:
                raise RuntimeError("worker already started")
            if not self.services:
                raise RuntimeError("add a service before start()")
            self.started = True
            if self.stopping.is_set():
                return
            capacity = sum(s.capacity for s in self.services.values())
            threads = self.threads or min(max(capacity, 1), 256)
            self.pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=threads, thread_name_prefix=f"sidecast-{self.worker_id}")
            if self.context is None:
                self.context = zmq.Context()
            self.io_thread = threading.Thread(target=self.io_loop, name=f"sidecast-io-{self.worker_id}",
                                              daemon=True)
            self.io_thread.start()

    def drain(self, timeout):
        if self.io_thread is threading.current_thread() or getattr(self.local, "in_pool", False):
            raise RuntimeError("Worker.drain() from a handler: it would wait for itself")
        self.drain_asked = True
        self.wake.signal()  # the I/O thread sends the Drain
        # Done when nothing runs and nothing more can come: a job the broker
        # dispatched just before it read the Drain may still be on its way.
        # (Not connected: not started, or no broker now.) A handler that
        # runs on after its final answer (progress, cleanup) runs too, as
        # in the C++ SDK.
        def done():
            return not self.in_flight and not self.running and (self.drain_settled or not self.connected.is_set())
        with self.in_flight_lock:
            settled = self.in_flight_lock.wait_for(
                lambda: done() or self.stopping.is_set() or self.io_failure is not None, timeout)
            idle = not self.in_flight and not self.running
            left = len(self.running | set(self.in_flight.values()))
        if not idle:
            log.warning("worker %s: drain timed out with %d requests running; they are cancelled",
                        self.worker_id, left)
        elif not settled:
            log.warning("worker %s: drain timed out before the broker confirmed it", self.worker_id)
        self.stop()
        return idle

    def stop(self):
        on_io_thread = self.io_thread is threading.current_thread()
        in_pool = getattr(self.local, "in_pool", False)
        with self.stop_lock:
            first = not self.stopping.is_set()
            self.stopping.set()
        if not first:
            if not (on_io_thread or in_pool):
                self.stopped.wait()
            return
        self.wake.signal()
        if self.io_thread is not None and not on_io_thread:
            self.io_thread.join()
        if on_io_thread:
            # From a future's done-callback: the I/O loop's exit, which tells
            # handlers, comes only after this returns. Tell them now, or the
            # pool's shutdown below waits for their deadlines.
            self.cancel_in_flight()
        # Client acks still awaited will not come now: each is answered
        # CANCELLED (its future resolved, its callback queued on the pool,
        # which runs what it holds before it stops), as in the C++ SDK.
        # emit_with_ack refuses from here on (it looks at self.stopping
        # under this lock).
        # A socket check still awaited hears SocketState.UNKNOWN.
        with self.acks_lock:
            pending, self.acks, self.ack_heap = self.acks, {}, []
        for entry in pending.values():
            self.settle(entry, AckResult(Code.CANCELLED, message="the worker stopped"))
        if self.pool is not None:
            # Handlers were told (req.cancelled); those not yet started never
            # start (run_handler). Wait for the rest unless one is the caller.
            self.pool.shutdown(wait=not in_pool)
        if not on_io_thread and self.own_context and self.context is not None:
            self.context.term()
        self.stopped.set()

    # ---- the I/O thread ----

    def io_loop(self):
        link = pub = None
        try:
            link = PeerLink(self.context, self.broker, self.worker_id, pb.ROLE_WORKER,
                            [(s.name, s.capacity) for s in self.services.values()],
                            self.heartbeat_interval, self.heartbeat_liveness, self.hwm, self.curve,
                            backup_endpoint=self.backup_broker)
            pub = self.context.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 0)
            pub.setsockopt(zmq.SNDHWM, self.hwm)
            apply_curve(pub, *self.curve)
            if self.publish_endpoint:
                pub.connect(self.publish_endpoint)
            # Of a broker pair, the PUB publishes to the broker the link is on
            # (only the active one takes events), and leaves the other, so that
            # one that stopped and comes back has nothing of ours to deliver late.
            pub_on_backup = False
            poller, polled, seen_reconnects, seen_received, seen_read = None, None, 0, 0, (0, 0)
            while not self.stopping.is_set():
                if link.socket is not polled:
                    polled = link.socket
                    poller = zmq.Poller()
                    poller.register(polled, zmq.POLLIN)
                    poller.register(self.wake.fd, zmq.POLLIN)
                now = time.monotonic()
                wake_at = min(link.next_tick(), self.next_timer())
                if self.welcome_due is not None and link.welcomed:
                    # Not while no broker welcomes the link: a due time
                    # passed then would make the loop spin until one does.
                    wake_at = min(wake_at, self.welcome_due)
                timeout_ms = 0 if link.has_released else max(0, int((wake_at - now) * 1000)) + 1
                try:
                    ready = dict(poller.poll(timeout_ms))
                except zmq.ZMQError as e:
                    if e.errno == zmq.EINTR:
                        continue
                    raise
                if self.wake.fd in ready:
                    self.wake.drain()
                if self.drain_asked and not link.draining:
                    link.drain()
                    log.info("worker %s draining: the broker sends it nothing new", self.worker_id)
                for _ in range(1024):
                    env = link.receive()
                    if env is None:
                        break
                    self.on_message(env)
                # The lost one-way messages go before what the handlers queued since.
                if link.received_by_broker.count != seen_received:
                    seen_received = link.received_by_broker.count
                    self.resend_lost(link)
                    seen_read = None  # what waited behind those the Welcome settled
                if link.read_by_broker != seen_read:
                    seen_read = link.read_by_broker
                    self.forget_read(seen_read, link.welcomed_hello)
                self.flush(link, pub)
                now = time.monotonic()
                if now >= link.next_tick():
                    link.tick(now)
                if link.welcomed:
                    self.connected.set()
                    if (link.fresh_welcomes != self.fresh_welcomes_seen
                            or link.broker_restarts != self.broker_restarts_seen):
                        self.on_welcomed(link, now)
                else:
                    self.connected.clear()
                self.run_welcome_hooks(link, now)
                if (link.draining and not self.drain_settled
                        and (link.drain_confirmed or not link.welcomed)):
                    with self.in_flight_lock:
                        self.drain_settled = True
                        self.in_flight_lock.notify_all()
                if link.on_backup != pub_on_backup and self.publish_endpoint and self.backup_publish:
                    pub.disconnect(self.backup_publish if pub_on_backup else self.publish_endpoint)
                    pub_on_backup = link.on_backup
                    pub.connect(self.backup_publish if pub_on_backup else self.publish_endpoint)
                if link.reconnects != seen_reconnects:
                    self.count("reconnects", link.reconnects - seen_reconnects)
                    seen_reconnects = link.reconnects
                self.expire(now)
        except Exception as e:
            log.critical("worker %s I/O thread failed", self.worker_id, exc_info=True)
            self.io_failure = e
        finally:
            self.connected.clear()
            if link is not None:
                # What the handlers queued, then Goodbye: the broker gives what
                # this worker still holds to another at once, instead of after
                # its heartbeats stop.
                try:
                    if self.io_failure is None:
                        self.flush(link, pub, last=True)
                        link.goodbye(GOODBYE_LINGER)
                except Exception:
                    log.warning("worker %s: its last messages were not sent", self.worker_id, exc_info=True)
                link.close()
            if pub is not None:
                pub.close(linger=0)
            self.cancel_in_flight()
            self.close_acks()

    def close_acks(self):
        """The I/O loop has ended: no ack or report comes now, and no
        deadline expires. From here on nothing more is awaited (register_ack
        refuses). At a stop(), stop() answers what was awaited; at a failure
        (no stop()), it is answered here: Code.CANCELLED, a check UNKNOWN."""
        with self.acks_lock:
            self.io_closed = True
            if self.stopping.is_set():
                return  # stop() answers them, on its own thread
            pending, self.acks, self.ack_heap = self.acks, {}, []
        for entry in pending.values():
            self.settle(entry, AckResult(Code.CANCELLED, message="the worker stopped: its I/O thread failed"))

    def cancel_in_flight(self):
        """Whatever still runs learns that the worker is going away: the
        requests not finally answered, and the handlers still running after
        they answered."""
        with self.in_flight_lock:
            running, self.in_flight = list(self.in_flight.values()) + list(self.running), {}
            self.in_flight_lock.notify_all()
        for req in running:
            req._cancel(Code.CANCELLED)

    def flush(self, link, pub, last=False):
        """Sends what the handlers queued, after what was held. While the
        link waits for the broker's Welcome of a new socket (its
        ``holding``), which messages died in the old one is not known yet,
        and they go again first: what the handlers queue is held meanwhile,
        up to ``hwm`` messages, past which it goes at once. ``last``: the
        worker stops, and everything goes."""
        holding = link.holding and not last
        if not holding and (self.given_back or self.held):
            held, self.given_back, self.held = self.given_back + self.held, [], []
            for item in held:
                self.send_one(link, pub, *item)
        # The answers beside the outbox are taken with what it holds, at
        # once for enqueue (the lock): each came after its handler's emits,
        # in the outbox then, and before any answer the outbox takes after.
        taken = []
        with self.answers_lock:
            beside, self.answers_beside = self.answers_beside, []
            for _ in range(self.outbox_limit):
                try:
                    taken.append(self.outbox.get_nowait())
                except queue.Empty:
                    break
        for item in taken + beside:
            self.hold_or_send(link, pub, holding, item)

    def hold_or_send(self, link, pub, holding, item):
        if holding and self.held_count() < self.hwm:
            self.held.append(item)
        else:
            self.send_one(link, pub, *item)

    def held_count(self):
        """Messages held (``held`` and ``given_back``): at most ``hwm``."""
        return len(self.held) + len(self.given_back)

    def send_one(self, link, pub, topic, data, notice):
        if link.max_message_bytes and len(data) > link.max_message_bytes:
            data = self.shrink(data, link.max_message_bytes, topic is None and not notice)
            if data is None:
                self.count("outbox_dropped")
                return
        if topic is None:
            if notice:
                self.send_notice(link, data)
            elif not link.send_bytes(data):
                self.count("outbox_dropped")
        else:
            try:
                pub.send_multipart([topic, data], zmq.NOBLOCK)
            except zmq.Again:
                self.count("outbox_dropped")

    def shrink(self, data, limit, answer):
        """A message larger than the broker takes would cost the worker its
        connection, and every message in flight on it. An answer goes as an
        INTERNAL error instead (its client hears why, and the broker gets
        the capacity back); anything else is dropped (None), counted."""
        if self.log_limit.allow():
            log.error("worker %s: a message of %d bytes is more than the broker takes (%d, its "
                      "--max-message-bytes): %s", self.worker_id, len(data), limit,
                      "answered INTERNAL instead" if answer else "dropped")
        env = pb.Envelope()
        env.ParseFromString(data)
        kind = env.WhichOneof("kind")
        if not answer:
            if kind == "emit" and env.emit.ack_id:
                # An emit_with_ack's callback hears so now, not at its timeout.
                refused = pb.Reply(id=env.emit.ack_id, code=int(Code.INTERNAL), args=b"[]",
                                   message=f"the emit is {len(data)} bytes, more than the broker takes ({limit})")
                self.on_ack(refused)
            return None
        if kind != "reply":
            return None  # cannot happen: every answer is a Reply this SDK made
        r = env.reply
        r.code = int(Code.INTERNAL)
        r.message = f"the answer is {len(data)} bytes, more than the broker takes ({limit})"
        r.args = b"[]"
        del r.attachments[:]
        r.silent = False
        smaller = env.SerializeToString()
        if len(data) > self.kept_reply_bytes:
            # Too large to be kept (keep_reply): the error is, so that a job
            # sent again gets it instead of running again. (A kept original
            # is made this error again when it goes.)
            self.keep_reply(r.id, smaller)
        return smaller

    def send_notice(self, link, data):
        """Sends a one-way message, kept (at most ``kept_notices`` of them
        and ``kept_notice_bytes`` bytes) with where it went on the link."""
        if not link.send_bytes(data):
            self.count("outbox_dropped")
            return False
        if self.kept_notices > 0 and len(data) <= self.kept_notice_bytes:
            self.notices.append((link.hellos, link.sent_since_hello, data))
            self.notice_bytes += len(data)
            while len(self.notices) > self.kept_notices or self.notice_bytes > self.kept_notice_bytes:
                self.notice_bytes -= len(self.notices.popleft()[2])
        return True

    def resend_lost(self, link):
        """The broker's Welcome on a new socket said how much of what the old
        one sent it read; the rest died with the old socket. The kept one-way
        messages among it go again, in the order they were first sent: the
        broker never read them, so none acts twice. (Answers are not among
        them: the broker sends their jobs again, and had_before answers from
        the kept ones.) Those the broker read are forgotten."""
        received = link.received_by_broker
        lost, unknown = [], collections.deque()
        for epoch, sent, data in self.notices:
            if received.lost(epoch, sent):
                lost.append(data)
            elif epoch >= received.current:  # sent since that Hello: a later Welcome tells
                unknown.append((epoch, sent, data))
        self.notices = unknown
        self.notice_bytes = sum(len(data) for _, _, data in unknown)
        if not lost:
            return
        if self.log_limit.allow():
            log.warning("worker %s: %d messages died in the socket to the broker it replaced; sending them again",
                        self.worker_id, len(lost))
        for data in lost:
            if self.send_notice(link, data):
                self.count("notices_resent")

    def forget_read(self, read, settled_below):
        """A broker heartbeat said it read up to message ``read[1]`` after
        Hello ``read[0]``: the kept one-way messages among those can no
        longer die in a socket the link replaces, nor can those sent before
        Hello ``settled_below`` (the one the last Welcome answered, which
        resend_lost() has acted on: it sent them again or let them go, or
        that Welcome came from a broker that never knew them). One sent
        after that Welcome's Hello but before the heartbeat's may still be
        named lost by a Welcome not acted on yet: it stays, and so does
        everything behind it."""
        hello, count = read
        while self.notices:
            epoch, sent, data = self.notices[0]
            if not (epoch < settled_below or (epoch == hello and sent <= count)):
                break
            self.notice_bytes -= len(data)
            self.notices.popleft()

    def next_timer(self):
        at = float("inf")
        if self.deadlines:
            at = self.deadlines[0][0]
        with self.acks_lock:
            if self.ack_heap:
                at = min(at, self.ack_heap[0][0])
        return at

    def expire(self, now):
        while self.deadlines and self.deadlines[0][0] <= now:
            _, _, req = heapq.heappop(self.deadlines)
            deadline = req.deadline
            if not req.answered and deadline is not None and deadline <= now:
                req._cancel(Code.TIMEOUT)
        expired = []
        with self.acks_lock:
            while self.ack_heap and self.ack_heap[0][0] <= now:
                _, ack_id = heapq.heappop(self.ack_heap)
                entry = self.acks.pop(ack_id, None)
                if entry is not None:
                    expired.append(entry)
        for entry in expired:
            self.settle(entry, AckResult(Code.TIMEOUT, message="no ack in time"))

    def settle(self, entry, result, state=SocketState.UNKNOWN):
        """Ends what was awaited: an emit_with_ack's future and callback with
        ``result``, a socket check's callback (on the pool) with ``state``."""
        if isinstance(entry, _Check):
            self.submit(entry.callback, state)
        else:
            self.resolve_ack(*entry, result)

    def resolve_ack(self, future, callback, result):
        if future.set_running_or_notify_cancel():
            future.set_result(result)
        if callback is not None:
            self.submit(callback, result)

    def on_message(self, env):
        kind = env.WhichOneof("kind")
        if kind in ("request", "lifecycle"):
            self.on_request(env, kind)
        elif kind == "cancel":
            with self.in_flight_lock:
                req = self.in_flight.get(env.cancel.id)
            if req is not None:
                self.count("cancels")
                reason = code_of(env.cancel.reason)
                req._cancel(reason if reason != Code.OK else Code.CANCELLED)
        elif kind == "recall":
            self.on_recall(env.recall.ids)
        elif kind == "reply":
            self.on_ack(env.reply)
        elif kind == "report":
            self.on_report(env.report)
        elif kind == "gateway_gone":
            self.on_gateway_gone(env.gateway_gone)
        elif kind == "error":
            # A pair's standby, or a restarted broker before our Hello,
            # gives back a one-way message (an emit, a control, a report) it
            # did not act on: held, it goes to
            # whichever broker welcomes the link next (else the link logged
            # it). It was sent before anything held now (the link holds from
            # the standby's first STANDBY on), and the standby gives back in
            # the order it read: it goes ahead of what is held, behind what
            # it gave back before, so the order the worker sent in holds.
            # Not a job's answer: no other broker holds that job (one that
            # has it sends it again, and the kept answer goes then).
            if (env.error.code in (Code.STANDBY, Code.NOT_REGISTERED) and env.error.refused
                    and reply_in(env.error.refused) is None):
                if self.held_count() < self.hwm:
                    self.given_back.append((None, bytes(env.error.refused), True))
                else:
                    self.count("outbox_dropped")
        elif self.log_limit.allow():
            log.warning("unexpected %s from the broker", kind)

    def keep_reply(self, request_id, data):
        """Keeps an answer queued to be sent (any thread); the oldest go past
        the count or the bytes allowed."""
        if self.kept_replies <= 0 or len(data) > self.kept_reply_bytes:
            return
        with self.kept_lock:
            self.kept.append((request_id, data))
            self.kept_bytes += len(data)
            while len(self.kept) > self.kept_replies or self.kept_bytes > self.kept_reply_bytes:
                self.kept_bytes -= len(self.kept.popleft()[1])

    def had_before(self, request_id):
        """A job sent again (attempt > 1): after a worker comes back on a new
        socket the broker sends it every job it holds again, since one may
        have died on the old socket. One running here is not run twice (its
        early answer, if it gave one, goes again); one answered here gets its
        kept answer again. True when it was one of those: not to be run."""
        with self.in_flight_lock:
            running = request_id in self.in_flight
        with self.kept_lock:
            kept = [data for rid, data in self.kept if rid == request_id]  # the oldest first
        for data in kept:
            self.enqueue(None, data)
            self.count("replies_resent")
        resent = bool(kept)
        if not running and not resent:
            return False
        self.count("jobs_again")
        if self.log_limit.allow():
            log.info("worker %s: %s came again; %s", self.worker_id, request_id,
                     "it still runs here" if running else "its answer went again")
        return True

    def on_recall(self, ids):
        """After this worker came back on a new socket, the broker asks again
        for the final answers of jobs it holds here but does not send again
        (answered early, or ended while held): they may have died in the old
        socket, and each keeps capacity until its answer comes. One still
        running answers when it ends; one answered here gets its kept final
        answer again; one unknown here (never received, or its answer no
        longer kept) is answered CANCELLED, silently: the broker only gives
        its capacity back (docs/protocol.md "Answers owed")."""
        for request_id in ids:
            self.count("recalled")
            # A reply is kept before its request leaves in_flight: one of
            # the two finds it.
            with self.in_flight_lock:
                if request_id in self.in_flight:
                    continue
            with self.kept_lock:
                kept = [data for rid, data in self.kept if rid == request_id]
            final = next((data for data in reversed(kept) if not reply_in(data).partial), None)
            if final is not None:
                self.count("replies_resent")
            else:
                env = pb.Envelope()
                env.reply.id = request_id
                env.reply.code = int(Code.CANCELLED)
                env.reply.message = "this worker holds no answer for the job"
                env.reply.silent = True
                final = env.SerializeToString()
            self.enqueue(None, final)
        if self.log_limit.allow():
            log.info("worker %s: the broker asked again for %d answers", self.worker_id, len(ids))

    def on_request(self, env, kind):
        body = env.request if kind == "request" else env.lifecycle
        if body.attempt > 1 and self.had_before(body.id):
            return
        self.count("requests")
        if kind == "request":
            r = env.request
            req = Request(self, EVENT, r.id, r.service, sid=r.sid, nsp=r.nsp, event=r.event,
                          user=r.user, args_json=r.args.decode("utf-8", "replace") or "[]",
                          attachments=list(r.attachments),
                          auth_json=r.auth.decode("utf-8", "replace") or "{}",
                          wants_reply=r.wants_reply, attempt=max(r.attempt, 1))
            timeout_ms = r.timeout_ms
        else:
            lc = env.lifecycle
            connect = lc.kind == pb.Lifecycle.CONNECT
            req = Request(self, CONNECT if connect else DISCONNECT, lc.id, lc.service, sid=lc.sid,
                          nsp=lc.nsp, event="connect" if connect else "disconnect", user=lc.user,
                          args_json="[]" if connect else codec.dumps([lc.reason]),
                          auth_json=lc.auth.decode("utf-8", "replace") or "{}",
                          wants_reply=connect, attempt=max(lc.attempt, 1))
            timeout_ms = lc.timeout_ms
        now = time.monotonic()
        req._deadline = now + (timeout_ms / 1000.0 if timeout_ms else self.default_timeout)
        service = self.services.get(req.service)
        if service is None:
            req.fail(Code.BAD_REQUEST, f"service not served here: {req.service}")
            return
        handler = service.handler_for(req.kind, req.event)
        if handler is None:
            # Defaults: accept connects, ignore disconnects and unknown events.
            req._finish()
            return
        # The broker's credits keep the pool's queue to the capacity
        # announced; this bound holds when they do not (a restarted broker
        # hands out fresh credits while the old requests still run).
        with self.stats_lock:
            full = self.waiting >= self.queue_limit
            if full:
                self.counts["requests_refused"] += 1
            else:
                self.waiting += 1
        if full:
            req.fail(Code.BUSY, "the worker's handler queue is full")
            return
        with self.in_flight_lock:
            self.in_flight[req.id] = req
            live = len(self.in_flight)
        heapq.heappush(self.deadlines, (req._deadline, next(self.seq), req))
        # Answered requests leave entries behind until their deadline.
        compact_heap(self.deadlines, live, lambda entry: not entry[2].answered)
        if not self.submit(self.run_handler, handler, req):
            with self.stats_lock:
                self.waiting -= 1
            req._cancel(Code.CANCELLED)

    def on_ack(self, reply):
        with self.acks_lock:
            entry = self.acks.pop(reply.id, None)
        if entry is None:
            return  # late: already timed out
        args_json = reply.args.decode("utf-8", "replace") or "[]"
        attachments = list(reply.attachments)
        result = AckResult(code_of(reply.code), codec.unpack_args(args_json, attachments), args_json,
                           attachments, reply.message)
        self.settle(entry, result)

    def on_report(self, report):
        # A check_socket's answer settles it, and goes nowhere else.
        if report.ref:
            with self.acks_lock:
                check = self.acks.get(report.ref)
                if isinstance(check, _Check):
                    del self.acks[report.ref]  # its deadline entry goes at expiry or a rebuild
                else:
                    check = None
            if check is not None:
                self.settle(check, None, state_of(report.status))
                return
        callback = self.report_callback
        if callback is None:
            return
        # Reports are advisory: past the outbox bound they are dropped, counted.
        with self.stats_lock:
            if self.backlog >= self.outbox_limit:
                self.counts["outbox_dropped"] += 1
                return
            self.backlog += 1
        status = pb.DeliveryReport.Status.Name(report.status) \
            if report.status in pb.DeliveryReport.Status.values() else str(report.status)
        self.submit(self.run_report, callback,
                    DeliveryReport(status, report.sid, report.ref, report.detail))

    def run_report(self, callback, report):
        with self.stats_lock:
            self.backlog -= 1
        callback(report)

    def on_gateway_gone(self, gone):
        """Each service's hook, on the pool: a gateway's sockets are gone.
        Not bounded by the outbox, as reports are: the broker announces at
        most one per gateway it lost, and a hook left out would leave that
        gateway's sockets behind for good. A prefix that names no gateway's
        sockets (no '.', or ending in one) is not passed on: "" would own every
        sid."""
        prefix = gone.sid_prefix
        if "." not in prefix or prefix.endswith("."):
            if self.log_limit.allow():
                log.warning("worker %s: a GatewayGone with no sid prefix ignored", self.worker_id)
            return
        self.count("gateways_gone")
        log.info("worker %s: gateway %s is gone (%s): its sockets %s* are forgotten",
                 self.worker_id, gone.gateway, gone.reason, prefix)
        event = GatewayGone(self, gone.gateway, prefix, gone.reason)
        self.post_hooks("_on_gateway_gone", event, f"on_gateway_gone of gateway {gone.gateway}")

    def on_welcomed(self, link, now):
        """At each Welcome from a broker that did not know this worker's link
        (Welcome.previous_hello 0: the first; a restarted broker's, the
        other of a pair's, one that had dropped the worker: the DISCONNECTs
        held for it, or queued for its services meanwhile, may be lost;
        not one on a replaced socket of a link the same broker knew), and
        from one of another incarnation than the last (the other of a pair,
        even one that knew the link), each service's welcome hook runs on the pool twice the
        heartbeat liveness later, once the gateways have had time to say
        Hello to a broker that just started (until they do, it answers a
        check of their sockets GATEWAY_GONE). Several within that delay
        give one run, at the last one's time. I/O thread only."""
        self.welcome_first = self.welcome_first or not self.ever_welcomed
        self.ever_welcomed = True
        self.fresh_welcomes_seen = link.fresh_welcomes
        self.broker_restarts_seen = link.broker_restarts
        self.welcome_due = now + 2 * link.liveness * link.interval

    def run_welcome_hooks(self, link, now):
        """The welcome hooks, once they are due and a broker welcomes the
        link (one due while none does waits for the next Welcome)."""
        if self.welcome_due is None or now < self.welcome_due or not link.welcomed:
            return
        self.welcome_due = None
        welcome = Welcome(self, self.welcome_first)
        self.welcome_first = False
        self.post_hooks("_on_welcome", welcome, f"on_welcome of worker {self.worker_id}")

    def post_hooks(self, attribute, arg, what):
        """Runs hook ``attribute`` of every service that has one with ``arg``,
        on the pool, taking no capacity."""
        for service in self.services.values():
            hook = getattr(service, attribute)
            if hook is not None:
                self.submit(self.run_hook, hook, arg, what)

    def run_hook(self, hook, arg, what):
        try:
            hook(arg)
        except BaseException:
            # As a handler's exception: logged and counted, not raised again
            # (the pool thread serves on; there is no request to answer).
            self.count("handler_errors")
            if self.log_limit.allow():
                log.exception("%s failed", what)


class Worker:
    """Serves one or more services behind a Sidecast broker.

        worker = Worker(broker="tcp://127.0.0.1:7700", publish="tcp://127.0.0.1:7701")
        worker.add(svc)
        worker.run()            # blocks until stop() or SIGINT/SIGTERM
        # or: worker.start(); ...; worker.stop()   or:  with worker: ...

    ``broker`` is the broker's ROUTER endpoint, ``publish`` its XSUB (room
    and broadcast emits; empty: none). Times are in seconds. ``threads`` is
    the handler pool size (0: the total capacity, at most 256). Handlers
    queue what they send in an outbox of ``outbox_limit`` messages; a
    handler finding it full waits ``outbox_wait`` seconds, then the message
    is dropped and counted (an emit; an answer never waits nor is dropped: it
    frees the request's capacity at the broker). At most ``queue_limit`` requests wait for a
    handler thread; one past it is answered ``BUSY`` at once and counted
    (``requests_refused``). The last ``kept_replies`` answers sent (at most
    ``kept_reply_bytes`` bytes) are kept: a job the broker sends again after
    this worker came back on a new socket is answered again from them
    instead of run twice (one still running is never run twice); 0: none
    kept. The last ``kept_notices`` one-way messages sent on the broker link
    (emits to a sid, joins, leaves; at most ``kept_notice_bytes`` bytes) are
    kept too: those that died in a socket this worker replaced go again
    once the broker says what it read; 0: none kept. ``context``: a zmq.Context to share (inproc).
    ``backup_broker`` and ``backup_publish``: the other broker of a
    primary/backup pair (its ROUTER and XSUB endpoints); the worker uses
    whichever of the two is active (docs/deployment.md, "A broker pair").
    """

    def __init__(self, broker="tcp://127.0.0.1:7700", publish="tcp://127.0.0.1:7701", *,
                 worker_id=None, heartbeat_interval=1.0, heartbeat_liveness=3, threads=0,
                 outbox_limit=10000, outbox_wait=5.0, pending_acks_limit=10000, hwm=100000,
                 default_timeout=30.0, curve_secret=None, curve_server_key=None, context=None,
                 queue_limit=10000, kept_replies=1024, kept_reply_bytes=4 << 20,
                 kept_notices=16384, kept_notice_bytes=8 << 20, backup_broker=None, backup_publish=None):
        if queue_limit < 1:
            raise ValueError("queue_limit must be at least 1")
        if outbox_limit < 1:
            raise ValueError("outbox_limit must be at least 1")
        if bool(backup_broker) != bool(backup_publish):
            raise ValueError("backup_broker and backup_publish go together (a broker pair's other ROUTER and XSUB)")
        self._core = _Core(broker, publish, worker_id, heartbeat_interval, heartbeat_liveness,
                           threads, outbox_limit, outbox_wait, pending_acks_limit, hwm,
                           default_timeout, (curve_secret, curve_server_key), context, queue_limit,
                           kept_replies, kept_reply_bytes, kept_notices, kept_notice_bytes,
                           (backup_broker, backup_publish))

    def __repr__(self):
        return f"<Worker {self.id} services={sorted(self._core.services)} connected={self.connected}>"

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def id(self):
        """This worker's peer id (its ZeroMQ routing id)."""
        return self._core.worker_id

    @property
    def connected(self):
        """True while the broker has welcomed this worker."""
        return self._core.connected.is_set()

    def wait_connected(self, timeout=None):
        """Waits until the broker welcomes this worker; False on timeout."""
        return self._core.connected.wait(timeout)

    def stats(self):
        with self._core.in_flight_lock:
            running = len(self._core.in_flight)
        with self._core.stats_lock:
            return WorkerStats(**self._core.counts, running=running, draining=self._core.drain_asked,
                               kept_bytes=self._core.kept_bytes,
                               kept_notice_bytes=self._core.notice_bytes, held=self._core.held_count())

    def add(self, service):
        """Adds a service (before start() only); returns the worker."""
        if self._core.started:
            raise RuntimeError("Worker.add after start()")
        if not isinstance(service, Service):
            raise TypeError("Worker.add takes a Service")
        for handler in [*service._events.values(), service._on_connect, service._on_disconnect,
                        service._on_gateway_gone, service._on_welcome]:
            if handler is not None and inspect.iscoroutinefunction(handler):
                raise TypeError(f"{handler.__qualname__}: handlers are plain functions, not async def")
        self._core.services[service.name] = service
        return self

    def start(self):
        """Starts the I/O thread and the handler pool; returns at once."""
        self._core.start()
        return self

    def stop(self):
        """Cancels what runs (req.cancelled), sends what handlers queued and a
        Goodbye (the broker re-dispatches what this worker held at once), stops
        the threads. Idempotent, thread-safe."""
        self._core.stop()

    def drain(self, timeout=10.0):
        """Stops gracefully: the broker sends this worker nothing new from now on
        (other workers of its services get it), what it holds runs to its end for
        up to ``timeout`` seconds (replies, progress emits and all), then stop():
        what still runs is cancelled, and the broker gives it to another worker at
        once. True when nothing was left running. Not from a handler."""
        return self._core.drain(timeout)

    def run(self, handle_signals=True, drain_timeout=10.0):
        """start(), then blocks until stop(). From the main thread, SIGINT or
        SIGTERM drains (``drain(drain_timeout)``) and then stops; a signal while a
        drain runs (the first signal's, or one the application started) stops at
        once: what runs is cancelled, and if a handler has not returned
        ``STOP_GRACE`` seconds later the process ends without it
        (``os._exit(128 + signal)``): a handler that ignores
        ``req.cancelled`` would otherwise hold it for as long as it runs."""
        self._drain_timeout = drain_timeout
        if not self._core.started:
            self.start()
        restore = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                restore[sig] = signal.signal(sig, self._on_signal)
        try:
            while not self._core.stopped.wait(0.5):
                if self._core.io_failure is not None:
                    raise RuntimeError(f"worker {self.id}: I/O thread failed") from self._core.io_failure
        finally:
            for sig, previous in restore.items():
                signal.signal(sig, previous)
            self.stop()

    def _on_signal(self, signum, _frame):
        # Not from the signal handler itself: drain() waits and stop() joins threads.
        if self._core.drain_asked:  # a second signal: no more waiting
            log.info("signal %d: stopping now", signum)
            threading.Thread(target=self._exit_if_held, args=(signum,), name="sidecast-exit", daemon=True).start()
            threading.Thread(target=self.stop, name="sidecast-stop").start()
            return
        log.info("signal %d: draining (up to %s s), then stopping", signum, self._drain_timeout)
        self._core.drain_asked = True
        threading.Thread(target=self.drain, args=(self._drain_timeout,), name="sidecast-drain").start()

    STOP_GRACE = 2.0

    def _exit_if_held(self, signum):
        # The broker has had the Goodbye by then, and sends the jobs to
        # another worker.
        if not self._core.stopped.wait(self.STOP_GRACE):
            log.critical("handlers still running %s s after a second signal: exiting", self.STOP_GRACE)
            logging.shutdown()
            os._exit(128 + signum)

    def on_report(self, callback=None):
        """Calls ``callback(DeliveryReport)`` on a handler thread for every delivery
        report: failures always, successes for emits with ``report_delivery``.
        Usable as a decorator."""
        if callback is None:
            def decorator(fn):
                self._core.report_callback = fn
                return fn
            return decorator
        self._core.report_callback = callback
        return callback

    # Traffic not tied to a request. Thread-safe; False when it could not be queued.

    def emit_to_sid(self, sid, event, *args, nsp="/", report_delivery=False, ref=""):
        """Emits ``event(*args)`` to one socket (over the broker, to the sid's gateway).
        ``ref`` comes back in the delivery report."""
        return self._core.emit_to_sid(nsp, sid, event, args, report_delivery=report_delivery, ref=ref)

    def emit_to_room(self, room, event, *args, nsp="/", except_sids=()):
        return self._core.publish(nsp, room, event, args, except_sids)

    def broadcast(self, event, *args, nsp="/", except_sids=()):
        return self._core.publish(nsp, None, event, args, except_sids)

    def join(self, sid, room, nsp="/"):
        return self._core.control(pb.Control.JOIN, nsp, sid, room)

    def leave(self, sid, room, nsp="/"):
        return self._core.control(pb.Control.LEAVE, nsp, sid, room)

    def disconnect(self, sid, nsp="/"):
        return self._core.control(pb.Control.DISCONNECT, nsp, sid, "")

    # Room-wide, on every gateway (Socket.IO's io.in(room).socketsJoin(),
    # socketsLeave(), disconnectSockets()): every socket of ``nsp`` in room
    # ``in_room`` (None: every socket of ``nsp``). Published as a room emit
    # is: behind this worker's room emits, applied by each gateway to the
    # members it has when it arrives; no delivery report.

    def sockets_join(self, room, in_room=None, nsp="/"):
        """Every socket in ``in_room`` joins ``room``."""
        return self._core.publish_control(pb.Control.JOIN, nsp, in_room, room)

    def sockets_leave(self, room, in_room=None, nsp="/"):
        """Every socket in ``in_room`` leaves ``room``."""
        return self._core.publish_control(pb.Control.LEAVE, nsp, in_room, room)

    def disconnect_sockets(self, in_room=None, nsp="/"):
        """Every socket in ``in_room`` is disconnected from ``nsp``."""
        return self._core.publish_control(pb.Control.DISCONNECT, nsp, in_room)

    def close_room(self, room, nsp="/"):
        """Every socket in ``room`` leaves it (Flask-SocketIO's close_room)."""
        return self._core.publish_control(pb.Control.LEAVE, nsp, room, room)

    def check_socket(self, nsp, sid, callback, timeout=10.0):
        """Asks the gateway of socket ``sid`` whether it still has it (a
        Control CHECK, answered by a delivery report): ``callback(state)``
        runs on a handler thread with a SocketState, PRESENT, GONE or
        NO_GATEWAY as the report said, or UNKNOWN after ``timeout`` seconds
        or when the worker stops first (or its I/O thread fails). ``nsp``
        may be "" (the socket's own); a socket of another namespace than a
        named one reads UNKNOWN. False (and no call) when the outbox stayed
        full, pending_acks_limit acks and checks are awaited already
        (counted in ``acks_refused``), or the worker is stopping or its I/O
        thread has ended. on_report does not see these reports.
        Thread-safe."""
        return self._core.check_socket(nsp, sid, callback, timeout)
