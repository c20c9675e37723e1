"""A service: a name, a capacity, and its handlers."""
from .request import CONNECT, DISCONNECT


class Service:
    """Handlers for one service (one or more Socket.IO namespaces route to it).

    ``capacity`` is how many of its requests this worker runs at once; the
    broker never sends more. Handlers are plain functions taking a Request;
    they run on the worker's thread pool.

        svc = Service("vm", capacity=8)

        @svc.on("open_vm")
        def open_vm(req): ...

        svc.on("ping", lambda req: req.reply("pong"))   # also chains: .on(...).on(...)
    """

    def __init__(self, name, capacity=16):
        if not name:
            raise ValueError("a service needs a name")
        if int(capacity) < 1:
            raise ValueError("capacity must be at least 1")
        self.name = name
        self.capacity = int(capacity)
        self._events = {}
        self._on_connect = None
        self._on_disconnect = None
        self._on_gateway_gone = None
        self._on_welcome = None

    def __repr__(self):
        return f"<Service {self.name} capacity={self.capacity} events={sorted(self._events)}>"

    def on(self, event, handler=None):
        """Handles ``event`` ("*": every event without its own handler).

        Events with no handler are answered silently. Used as a decorator it
        returns the function; called with a handler it returns the service.
        """
        return self._register(handler, lambda h: self._events.__setitem__(event, h))

    def on_connect(self, handler=None):
        """Connect hook: returning (or ``req.accept()``) accepts, ``req.refuse(msg)`` refuses.

        Returning ``False`` refuses too (connect_error "refused"), as in
        Flask-SocketIO; ``True`` or ``None`` accepts; an object accepts with
        it as the connect's data (``{"user": "ann"}`` names the user)."""
        return self._register(handler, lambda h: setattr(self, "_on_connect", h))

    def on_disconnect(self, handler=None):
        """Disconnect notice: ``req.reason`` says why; no answer reaches anyone."""
        return self._register(handler, lambda h: setattr(self, "_on_disconnect", h))

    def on_gateway_gone(self, handler=None):
        """A gateway is lost with all its sockets: ``handler(GatewayGone)``.

        No DISCONNECT comes for those sockets, so the hook forgets what the
        service keeps for each (``gone.owns(sid)``). It runs on the pool,
        once per announcement, on every worker of the service, without
        taking capacity, past the outbox bound (at most one per gateway
        lost, and the last 10 minutes' again as the worker registers: the
        hook must not mind a prefix it forgot already). What it raises is
        logged and counted in ``handler_errors``."""
        return self._register(handler, lambda h: setattr(self, "_on_gateway_gone", h))

    def on_welcome(self, handler=None):
        """The broker welcomed this worker: ``handler(Welcome)``.

        At each Welcome from a broker that did not know the worker's link
        (Welcome.previous_hello 0): the worker's first, and one from a
        broker that restarted, the other of a pair, or one that had
        dropped the worker (NOT_REGISTERED; the DISCONNECTs the broker
        held, or queued for the service meanwhile, may be lost), what the
        service keeps per socket may name sockets that are gone; the hook
        checks them (``welcome.check_socket``) and forgets those gone. It
        runs on the pool twice the heartbeat liveness (interval x
        liveness, as the broker's Welcome says them) after the Welcome,
        once the gateways have had time to say Hello to a broker that just
        started: once per such Welcome, once for several within that
        delay, without taking capacity. A Welcome on a socket the worker replaced, from a broker
        that knew its link, runs nothing. ``welcome.first`` is True for the
        first. What it raises is logged and counted in ``handler_errors``."""
        return self._register(handler, lambda h: setattr(self, "_on_welcome", h))

    def _register(self, handler, store):
        if handler is None:
            def decorator(fn):
                store(fn)
                return fn
            return decorator
        store(handler)
        return self

    def handler_for(self, kind, event):
        """The handler for a request, or None (default answer)."""
        if kind == CONNECT:
            return self._on_connect
        if kind == DISCONNECT:
            return self._on_disconnect
        return self._events.get(event) or self._events.get("*")
