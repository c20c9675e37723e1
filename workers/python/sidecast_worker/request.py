"""What a handler sees: one request, a gateway lost with its sockets, or a Welcome."""
import enum
import threading
import time

from . import codec
from ._proto import Code, pb

EVENT = "event"
CONNECT = "connect"
DISCONNECT = "disconnect"


def as_text(message):
    """An answer's message as text: a str as it is, bytes decoded (invalid
    UTF-8 replaced), anything else (an exception, a dict...) by ``str()``;
    never raises (a ``__str__`` that does gives the type's name)."""
    if isinstance(message, str):
        return message
    if isinstance(message, (bytes, bytearray, memoryview)):
        return bytes(message).decode("utf-8", "replace")
    try:
        return str(message)
    except Exception:
        return type(message).__name__


class Request:
    """An event (or a connect / disconnect) for a service, handed to its handler.

    Read-only data: ``kind`` ("event", "connect" or "disconnect"), ``id``,
    ``service``, ``sid``, ``nsp``, ``event``, ``user``, ``args`` (the
    arguments, parsed, binary placeholders replaced by ``bytes``),
    ``args_json`` (the JSON text, untouched), ``attachments``, ``auth`` (the
    socket's CONNECT auth payload, parsed; ``{}`` when none), ``auth_json``,
    ``wants_reply`` (the client asked for an ack), ``attempt``, ``worker_id``.

    Cancellation: ``cancelled`` is a ``threading.Event`` set when the broker
    cancels the request (deadline passed, requester gave up), when its own
    deadline passes, or when the worker stops; ``cancel_reason`` then says
    why (Code.TIMEOUT or Code.CANCELLED). Long handlers wait on it or call
    ``sleep()``.

    Answers: every request gets exactly one final answer. ``reply()`` /
    ``fail()`` give it; a handler that returns without answering gives a
    silent one (the client gets no ack; the broker learns the worker is
    free); a handler that returns a value other than None replies with it.
    ``ack()`` answers early and keeps the job: see its docstring.

    Every method is thread-safe and returns False instead of raising when
    the message could not be queued (worker stopping, outbox full).
    """

    __slots__ = ("kind", "id", "service", "sid", "nsp", "event", "user", "args_json",
                 "attachments", "auth_json", "wants_reply", "attempt", "cancelled",
                 "cancel_reason", "_core", "_deadline", "_lock", "_answered", "_acked",
                 "_args", "_auth")

    def __init__(self, core, kind, rid, service, sid="", nsp="/", event="", user="",
                 args_json="[]", attachments=(), auth_json="{}", wants_reply=True, attempt=1,
                 deadline=None):
        self._core = core
        self.kind = kind
        self.id = rid
        self.service = service
        self.sid = sid
        self.nsp = nsp
        self.event = event
        self.user = user
        self.args_json = args_json
        self.attachments = list(attachments)
        self.auth_json = auth_json
        self.wants_reply = wants_reply
        self.attempt = attempt
        self.cancelled = threading.Event()
        self.cancel_reason = None
        self._deadline = deadline  # time.monotonic() value; None once acked
        self._lock = threading.Lock()
        self._answered = False
        self._acked = False
        self._args = None
        self._auth = None

    def __repr__(self):
        return f"<Request {self.id} {self.service}/{self.event} sid={self.sid!r}>"

    # ---- data ----

    @property
    def args(self):
        if self._args is None:
            self._args = codec.unpack_args(self.args_json, self.attachments)
        return self._args

    @property
    def auth(self):
        if self._auth is None:
            auth = codec.parse_json(self.auth_json, {})
            self._auth = auth if isinstance(auth, dict) else {}
        return self._auth

    @property
    def reason(self):
        """Why the socket disconnected (disconnect requests only)."""
        args = self.args
        return args[0] if self.kind == DISCONNECT and args else ""

    @property
    def worker_id(self):
        return self._core.worker_id

    @property
    def answered(self):
        """True once the final answer is given."""
        return self._answered

    @property
    def deadline(self):
        """``time.monotonic()`` value after which the request is void; None once acked."""
        return self._deadline

    def time_left(self):
        """Seconds until the deadline (never negative); None once acked."""
        deadline = self._deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def sleep(self, seconds):
        """Sleeps up to ``seconds``; returns False if cancelled (or the deadline passed) first."""
        left = self.time_left()
        if left is not None and left < seconds:
            self.cancelled.wait(left)
            if not self.cancelled.is_set():
                self._cancel(Code.TIMEOUT)
            return False
        return not self.cancelled.wait(seconds)

    # ---- answers ----

    def reply(self, *args):
        """Answers with ``args`` as the ack's arguments (a connect: accepts, see ``accept``)."""
        if self.kind == CONNECT:
            if len(args) > 1:
                raise TypeError("a connect is accepted with at most one argument (an object)")
            return self.accept(args[0] if args else None)
        args_json, att = codec.pack_args(args)
        return self._answer(Code.OK, "", args_json, att, silent=False)

    def fail(self, code, message=""):
        """Answers with an error (``Code.REFUSED`` refuses a connect with ``message``).
        ``message`` that is not a str is sent as text (``as_text``: an exception
        as ``str(exception)``)."""
        return self._answer(Code(code), as_text(message), "[]", [], silent=False)

    def accept(self, data=None):
        """Accepts a connect; ``data`` (an object) may name the user: ``{"user": "ann"}``."""
        return self._answer(Code.OK, "", codec.dumps({} if data is None else data), [], silent=False)

    def refuse(self, message="refused"):
        """Refuses a connect: the client gets connect_error ``{"message": message}``."""
        return self.fail(Code.REFUSED, message)

    def ack(self, *args):
        """Answers now and keeps working.

        The client gets its ack at once; this worker keeps the request's
        capacity until the handler returns (or ``reply()`` is called, which
        then only frees it), and the request's deadline no longer applies:
        for long tasks that report progress with ``emit()``.
        """
        args_json, att = codec.pack_args(args)
        if not self._answer(Code.OK, "", args_json, att, silent=False, partial=True):
            return False
        self._deadline = None
        return True

    def _answer(self, code, message, args_json, attachments, silent, partial=False):
        # Queued under the lock too: an ack and the reply made on two threads
        # reach the outbox in the order they were decided (the final one
        # first would end the job at the broker, which would drop the ack).
        with self._lock:
            if self._answered or (partial and self._acked):
                return False
            if not partial and self._acked:
                # The requester has its answer: this only frees the capacity.
                code, message, args_json, attachments, silent = Code.OK, "", "[]", [], True
            # Built before the request counts as answered: an answer that
            # cannot be built raises here and leaves the request unanswered
            # (a handler's exception then answers INTERNAL, a return the
            # silent default), never answered with nothing sent, which would
            # keep its capacity at the broker for good.
            reply = self._core.build_reply(self, code, message, args_json, attachments, silent, partial)
            if partial:
                self._acked = True
            else:
                self._answered = True
            return self._core.send_reply(self, reply, partial)

    def _finish(self):
        """The handler returned: give the default answer if none was given."""
        if self._answered:
            return
        if self.kind == CONNECT:
            self.accept()
        else:
            self._answer(Code.OK, "", "[]", [], silent=True)

    def _cancel(self, reason):
        with self._lock:
            if self.cancelled.is_set():
                return
            self.cancel_reason = reason
            self.cancelled.set()

    # ---- traffic for the asking socket ----

    def emit(self, event, *args):
        """Emits ``event(*args)`` to the socket that asked."""
        return self._core.emit_to_sid(self.nsp, self.sid, event, args)

    def emit_with_ack(self, event, *args, timeout=5.0, callback=None):
        """Emits to the asking socket, asking the client for an ack.

        Returns a ``concurrent.futures.Future`` of an ``AckResult`` (code
        Code.OK with the client's ``args``, Code.TIMEOUT after ``timeout``
        seconds, Code.CANCELLED when the worker stops first, or
        Code.INTERNAL at once when the emit is larger than the broker
        takes and is not sent), or None if
        it could not be sent or the worker is stopping. ``callback``,
        if given, is called with the AckResult on a handler thread. The
        future is resolved on the I/O thread (CANCELLED: on the thread that
        calls stop()), so waiting on it from a handler is safe; done-callbacks
        added to it run there too: keep them short.
        """
        return self._core.emit_with_ack(self.nsp, self.sid, event, args, timeout, callback)

    def join(self, room):
        return self._core.control(pb.Control.JOIN, self.nsp, self.sid, room)

    def leave(self, room):
        return self._core.control(pb.Control.LEAVE, self.nsp, self.sid, room)

    def disconnect(self):
        """Disconnects the asking socket from this namespace."""
        return self._core.control(pb.Control.DISCONNECT, self.nsp, self.sid, "")

    def sockets_join(self, room, in_room=None):
        """Every socket of this namespace in ``in_room`` (None: all of them)
        joins ``room``, on every gateway (Worker.sockets_join)."""
        return self._core.publish_control(pb.Control.JOIN, self.nsp, in_room, room)

    def sockets_leave(self, room, in_room=None):
        """Every socket of this namespace in ``in_room`` (None: all of them)
        leaves ``room``."""
        return self._core.publish_control(pb.Control.LEAVE, self.nsp, in_room, room)

    def disconnect_sockets(self, in_room=None):
        """Every socket of this namespace in ``in_room`` (None: all of them)
        is disconnected from it."""
        return self._core.publish_control(pb.Control.DISCONNECT, self.nsp, in_room)

    def close_room(self, room):
        """Every socket in ``room`` (of this namespace) leaves it."""
        return self._core.publish_control(pb.Control.LEAVE, self.nsp, room, room)

    def emit_to_room(self, room, event, *args, except_sids=()):
        """Emits to every socket in a room of this namespace."""
        return self._core.publish(self.nsp, room, event, args, except_sids)

    def broadcast(self, event, *args, except_sids=()):
        """Emits to every socket of this namespace."""
        return self._core.publish(self.nsp, None, event, args, except_sids)


class GatewayGone:
    """A gateway the broker lost, with every socket it had, handed to each
    service's ``on_gateway_gone`` hook.

    No DISCONNECT will come for any of those sockets: the service forgets
    what it keeps for them. Every worker hears it, whether or not it served
    those sockets, so the hook must not mind sids it never saw.

    ``gateway`` is its id; every sid of its sockets begins with
    ``sid_prefix`` (``owns(sid)``). ``reason``: "silent" (lost to silence),
    "goodbye" (drained and stopped), "restarted" (back as a new process
    under its id), "replaced" (it ended its sockets and took a new prefix)
    or "replayed" (announced in the last 10 minutes, sent again as this
    worker registered).
    """

    __slots__ = ("gateway", "sid_prefix", "reason", "_core")

    def __init__(self, core, gateway, sid_prefix, reason):
        self._core = core
        self.gateway = gateway
        self.sid_prefix = sid_prefix
        self.reason = reason

    def __repr__(self):
        return f"<GatewayGone {self.gateway} {self.reason} sids={self.sid_prefix!r}*>"

    def owns(self, sid):
        """True for a sid of that gateway's sockets."""
        return sid.startswith(self.sid_prefix)

    def emit_to_room(self, room, event, *args, nsp="/", except_sids=()):
        """Emits to every socket in a room of ``nsp`` (to say who left), as
        Worker.emit_to_room does."""
        return self._core.publish(nsp, room, event, args, except_sids)


class SocketState(str, enum.Enum):
    """What ``check_socket`` learned of a socket (a ``str``:
    ``SocketState.GONE == "gone"``)."""

    #: Its gateway has it.
    PRESENT = "present"
    #: Its gateway has no such socket (it disconnected): it never comes back.
    GONE = "gone"
    #: No live gateway has its sid's prefix: its gateway is lost, or, just
    #: after a broker restart, not back yet. (One the broker dropped for its
    #: silence, still in its --gateway-gone-after grace, reads UNKNOWN.)
    NO_GATEWAY = "no_gateway"
    #: No answer in time (lost on the way, or a gateway of an earlier build),
    #: a refusal (a socket of another namespace than the one named, or of a
    #: gateway in its grace), or the worker stopped first (or its I/O
    #: thread failed).
    UNKNOWN = "unknown"

    def __str__(self):
        return self.value


class Welcome:
    """The broker welcomed this worker, handed to each service's
    ``on_welcome`` hook: at each Welcome from a broker that did not know
    this worker's link (Welcome.previous_hello 0): its first, and one from
    a broker that restarted, the other of a pair, or one that had dropped
    the worker (it answered NOT_REGISTERED). Not at a Welcome on a socket
    the worker replaced, of a broker that knew it.

    What a service keeps per socket may be stale then: a socket that ended
    while no worker of the service ran, or whose DISCONNECT died with the
    broker that held it (or expired there while the broker had dropped the
    worker), sends no DISCONNECT again. The hook checks the sockets it
    keeps (``check_socket``) and forgets those gone. It runs twice the
    heartbeat liveness (interval x liveness) after the Welcome: gateways
    say Hello to a broker that just started within that, and until one
    does, the broker answers a check of its sockets ``NO_GATEWAY``.

    ``first`` is True for the first Welcome this worker had since it started.
    """

    __slots__ = ("first", "_core")

    def __init__(self, core, first):
        self._core = core
        self.first = first

    def __repr__(self):
        return f"<Welcome first={self.first}>"

    def check_socket(self, nsp, sid, callback, timeout=10.0):
        """As Worker.check_socket."""
        return self._core.check_socket(nsp, sid, callback, timeout)

    def emit_to_room(self, room, event, *args, nsp="/", except_sids=()):
        """Emits to every socket in a room of ``nsp``, as Worker.emit_to_room does."""
        return self._core.publish(nsp, room, event, args, except_sids)
