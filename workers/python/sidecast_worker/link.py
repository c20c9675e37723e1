"""The DEALER side of the broker protocol (core/peer_link.cpp in Python).

Announces the peer (Hello), keeps heartbeats both ways, notices a dead or
restarted broker and announces itself again. It owns no thread: the owning
loop polls ``socket``, calls ``receive()`` while it returns messages, and
calls ``tick()`` at ``next_tick()``. Only the thread that made it may use it.
"""
import collections
import logging
import secrets
import time
from typing import NamedTuple

import zmq

from ._proto import PROTOCOL_VERSION, Code, code_name, pb

log = logging.getLogger("sidecast_worker")


class RateLimitedLog:
    """Lets through at most ``burst`` lines per ``period`` seconds."""

    def __init__(self, burst=10, period=1.0):
        self.burst, self.period = burst, period
        self.window_start, self.count, self.suppressed = 0.0, 0, 0

    def allow(self):
        now = time.monotonic()
        if now - self.window_start >= self.period:
            self.window_start, self.count = now, 0
        self.count += 1
        if self.count > self.burst:
            self.suppressed += 1
            return False
        return True


def apply_curve(sock, secret_key, server_key):
    """CURVE client keys on a socket; nothing when either key is empty."""
    if not secret_key or not server_key:
        return
    sock.curve_serverkey = server_key.encode()
    sock.curve_publickey = zmq.curve_public(secret_key.encode())
    sock.curve_secretkey = secret_key.encode()


class BrokerReceived(NamedTuple):
    """What the broker said it read of what this link sent before the Hello
    it last welcomed (Welcome.previous_hello, .received; taken only from a
    Welcome of the incarnation that welcomed the link before): a message sent
    after Hello ``previous`` beyond the first ``received``, or after a Hello
    between ``previous`` and ``current``, died in a socket the link replaced
    and may be sent again. ``count`` goes up with each such Welcome."""
    count: int = 0
    previous: int = 0
    received: int = 0
    current: int = 0

    def lost(self, epoch, sent):
        """Whether the message sent as number ``sent`` after Hello ``epoch`` died."""
        return (epoch == self.previous and sent > self.received) or self.previous < epoch < self.current


class PeerLink:
    def __init__(self, context, endpoint, peer_id, role=pb.ROLE_WORKER, services=(),
                 heartbeat_interval=1.0, heartbeat_liveness=3, hwm=100000, curve=(None, None),
                 backup_endpoint=None):
        self.context = context
        # The other broker of a primary/backup pair, if any: the link moves
        # between the two when the one it is on goes silent for its
        # liveness, or keeps saying it is the standby (Error STANDBY) for a
        # liveness. `endpoint` is the one it is on.
        self.endpoints = [endpoint] + ([backup_endpoint] if backup_endpoint else [])
        self._at = 0
        self._standby = False
        self._standby_expiry = 0.0
        self._refused_since_welcome = False  # a STANDBY or NOT_REGISTERED came after the last Welcome (holding)
        self.peer_id = peer_id
        self.role = role
        self.services = list(services)  # (name, capacity)
        self.interval = heartbeat_interval  # seconds; the Welcome's value wins
        self.liveness = heartbeat_liveness
        self.hwm = hwm
        self.curve = curve
        self.socket = None
        self.welcomed = False
        self.draining = False  # see drain()
        # The broker answered the Drain (or a draining Hello) with its own:
        # every job it dispatched here before has arrived, and none follows.
        self.drain_confirmed = False
        self.broker_id = ""
        # The incarnation of the broker that welcomed this link last (0: none
        # yet, or only brokers of a build before incarnations). A Welcome's
        # previous_hello and received speak of what that broker read: they
        # count only from the same incarnation (see receive()).
        self.broker_incarnation = 0
        # Counts the brokers met after the first: a Welcome of another
        # incarnation than the last one's (core/peer_link's broker_restarts).
        self.broker_restarts = 0
        # Counts the Welcomes from a broker that did not know this link
        # (Welcome.previous_hello 0): the first, a restarted broker's, the
        # other of a pair's, and one from a broker that had dropped the link
        # (after its NOT_REGISTERED). What it held for this peer, or for the
        # peer's services, may be lost (core/peer_link's fresh_welcomes).
        self.fresh_welcomes = 0
        self.reconnects = 0   # sockets replaced after broker silence
        self.hellos = 0  # Hellos sent: what the link sends now follows Hello number `hellos`
        self.sent_since_hello = 0  # a message sent now is number sent_since_hello + 1 after it
        self.received_by_broker = BrokerReceived()
        # What the broker's heartbeats last said it read of what this link
        # sent: up to message number [1] after Hello number [0]
        # (Heartbeat.broker_read; only goes up). What an application keeps
        # of those can no longer die in a socket the link replaces.
        self.read_by_broker = (0, 0)
        # What this link read of what the broker sent it, in the broker's
        # count (Welcome.sent): up to `_read_to` on the socket that read the
        # last Welcome, then `_read_tail` on sockets that replaced it. A
        # Welcome to a new socket's Hello is answered with both (Heartbeat.read).
        self._read_to = 0
        self._read_tail = 0
        # The number of the Hello the last Welcome answered (0: none yet),
        # with _read_to in each heartbeat. What was sent before it is settled
        # once the application has acted on that Welcome (resend_lost).
        self.welcomed_hello = 0
        # The largest message the broker takes (Welcome.max_message_bytes; 0:
        # not said): a larger one would cost the link its connection.
        self.max_message_bytes = 0
        self._replaced_since_welcome = False
        # The tail's application messages (read on a new socket before its
        # Welcome, the newest the broker sent), held until the broker's
        # Heartbeat.resent marks the end of what died and is sent again, or a
        # Welcome promises none (see _hold_tail); then _released, handed out
        # before anything read after.
        self._tail = collections.deque()
        self._released = collections.deque()
        self._awaiting_resent = False
        self._resent_due = 0.0
        self._welcomed_before = False  # by any broker
        # In every Hello, with the socket's number: a Hello again on the same
        # socket keeps what the broker dispatched here (docs/protocol.md).
        self.incarnation = secrets.randbits(64) or 1
        self.send_dropped = 0
        self.malformed = 0
        self._broker_expiry = 0.0
        self._next_heartbeat = 0.0
        self._log_limit = RateLimitedLog()
        self._connect()

    @property
    def endpoint(self):
        """The broker endpoint the link is on now."""
        return self.endpoints[self._at]

    @property
    def on_backup(self):
        """On the backup endpoint: a worker's PUB follows (the events
        endpoint of the broker the link is on)."""
        return self._at == 1

    @property
    def holding(self):
        """True from when the link replaces a socket a broker had welcomed
        until the broker welcomes the new one. What died in the old socket
        is known only then (``received_by_broker``) and goes again first: an
        application that wants its messages to arrive in the order it sent
        them holds them back meanwhile, and sends them after those. Also true
        from a broker pair's STANDBY (what is sent there is refused) until a
        broker welcomes the link: held, it goes to whichever does."""
        return self._replaced_since_welcome or self._refused_since_welcome

    def close(self, linger=0):
        """Closes the socket; what it still queues gets ``linger`` seconds to leave."""
        if self.socket is not None:
            self.socket.close(linger=int(linger * 1000))
            self.socket = None
        self.welcomed = False

    def drain(self):
        """A worker that is stopping: the broker sends it nothing new (Drain),
        now and in every Hello from then on (a restarted broker)."""
        if self.draining:
            return
        self.draining = True
        env = pb.Envelope()
        env.drain.SetInParent()
        self.send(env)

    def goodbye(self, linger=0.5):
        """The last message: the broker forgets this peer at once (what a
        worker held goes to another). Closes the link; what was sent before
        gets ``linger`` seconds to leave."""
        if self.socket is None:
            return
        env = pb.Envelope()
        env.goodbye.SetInParent()
        self.send(env)
        self.close(linger)

    def _connect(self):
        # A fresh socket: whatever the old one still queued dies with it.
        if self._welcomed_before:  # what it reads from now on is the tail
            self._replaced_since_welcome = True
        # A mark promised on the socket replaced now would end what that
        # socket was sent again: the tail waits for the next Welcome.
        self._awaiting_resent = False
        self.close()
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.peer_id.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        sock.setsockopt(zmq.RCVHWM, self.hwm)
        apply_curve(sock, *self.curve)
        sock.connect(self.endpoint)
        self.socket = sock
        self.welcomed = False
        self._standby = False
        now = time.monotonic()
        self._broker_expiry = now + self.interval * self.liveness
        self._next_heartbeat = now + self.interval
        self._send_hello()

    def _send_hello(self):
        env = pb.Envelope()
        hello = env.hello
        hello.role = self.role
        hello.id = self.peer_id
        hello.protocol_version = PROTOCOL_VERSION
        for name, capacity in self.services:
            hello.services.add(name=name, capacity=capacity)
        hello.draining = self.draining
        hello.incarnation = self.incarnation
        hello.connection = self.reconnects
        self.hellos += 1
        hello.hello = self.hellos
        self.send(env)
        self.sent_since_hello = 0  # the broker counts what comes after it

    def receive(self):
        """The next envelope for the application, or None when none waits.

        Heartbeat, Welcome and Error NOT_REGISTERED are handled here.
        """
        while True:
            if self._released:
                env = self._released.popleft()
                if env.WhichOneof("kind") != "drain":
                    return env
                if self.draining:  # held in the tail behind the jobs it confirms
                    self.drain_confirmed = True
                continue
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return None
            now = time.monotonic()
            self._broker_expiry = self._standby_expiry if self._standby else now + self.interval * self.liveness
            if frames[0][:1] != b"\x12":  # every message but a Welcome (field 2, its tag 0x12) counts
                if self._replaced_since_welcome:
                    self._read_tail += 1
                else:
                    self._read_to += 1
            env = pb.Envelope()
            ok = len(frames) == 1  # extra frames are not part of protocol v1
            if ok:
                try:
                    env.ParseFromString(frames[0])
                except Exception:  # protobuf's DecodeError
                    ok = False
            if not ok or env.WhichOneof("kind") is None:
                self.malformed += 1
                if self._log_limit.allow():
                    log.warning("peer link: dropped a malformed message from the broker")
                continue
            kind = env.WhichOneof("kind")
            if self._hold_tail(kind):
                self._tail.append(env)
                continue
            if kind == "heartbeat":
                # The broker stalled and asks which connection we are on: this one.
                if env.heartbeat.probe:
                    self.send(env)
                if env.heartbeat.resent and self._awaiting_resent:
                    self._release_tail()  # what died came again
                read = env.heartbeat.broker_read
                self.read_by_broker = max(self.read_by_broker, (read.hello, read.count))
                continue
            if kind == "welcome":
                w = env.welcome
                awaiting_resent = False
                if w.heartbeat_interval_ms > 0:
                    self.interval = w.heartbeat_interval_ms / 1000.0
                if w.heartbeat_liveness > 0:
                    self.liveness = w.heartbeat_liveness
                self._standby = False  # it serves after all (the pair decided)
                self._refused_since_welcome = False
                self._broker_expiry = now + self.interval * self.liveness
                # The next heartbeat was planned with the interval we had
                # before: a broker with a shorter one must not wait for it.
                self._next_heartbeat = min(self._next_heartbeat, now + self.interval)
                if not self.welcomed:
                    log.info("connected to broker %s at %s", w.broker_id, self.endpoint)
                self.broker_id = w.broker_id
                self.welcomed = self._welcomed_before = True
                if w.previous_hello == 0:
                    self.fresh_welcomes += 1
                # previous_hello and received count only from the broker that
                # welcomed this link last (its incarnation), as in
                # core/peer_link.cpp. Another one (a restarted broker, the
                # other of a pair, or the first again after the other
                # welcomed the link) says nothing of what went elsewhere: what
                # it names unread may have reached the broker between, and
                # sent again it would act twice. So nothing is named lost. A
                # broker of a build before incarnations sends 0: nothing is
                # known, its counts are taken.
                if w.incarnation != 0 and w.incarnation != self.broker_incarnation:
                    if self.broker_incarnation != 0:
                        self.broker_restarts += 1
                    self.broker_incarnation = w.incarnation
                elif w.previous_hello:
                    # The same broker, which knew this link: what it did not
                    # read died in a replaced socket.
                    self.received_by_broker = BrokerReceived(
                        self.received_by_broker.count + 1, w.previous_hello, w.received, w.hello)
                    if self._replaced_since_welcome:
                        # And what we did not read of what it sent: it waits
                        # for this before it sends us anything more.
                        report = pb.Envelope()
                        report.heartbeat.read.read_to = self._read_to
                        report.heartbeat.read.tail = self._read_tail
                        self.send(report)
                        awaiting_resent = w.marks_resent
                # The tail waits for what is sent again, or goes now if nothing is.
                if awaiting_resent:
                    self._awaiting_resent = True
                    # Then it goes anyway (tick): the broker's mark comes within
                    # about a liveness, and a broker silent that long is replaced first.
                    self._resent_due = now + 2 * self.interval * self.liveness
                else:
                    self._release_tail()
                self._read_to, self._read_tail = w.sent, 0
                self.welcomed_hello = w.hello
                self.max_message_bytes = w.max_message_bytes
                self._replaced_since_welcome = False
                continue
            if kind == "drain":
                if self.draining:
                    self.drain_confirmed = True
                continue
            if kind == "error":
                # A broker of a build before Drain refuses it (BAD_REQUEST), in
                # order on the pipe, as a later broker confirms it.
                if self.draining and not self.drain_confirmed and env.error.code == Code.BAD_REQUEST:
                    self.drain_confirmed = True
                if env.error.code == Code.STANDBY:
                    # The standby of a pair (or one that stepped down): the
                    # other serves, or is dead and this one has not seen it
                    # yet. In the second case the link stays, heartbeating:
                    # the standby takes over at one of those (and says
                    # NOT_REGISTERED); how long, it says (takeover_ms; a
                    # liveness at most). Else an interval, then the other.
                    # Not at once either way: two brokers that both refuse
                    # while the pair decides are not alternated in a loop.
                    takeover = env.error.takeover_ms / 1000.0
                    wait = (min(self.interval * self.liveness, takeover + self.interval) if takeover
                            else self.interval)
                    self._refused_since_welcome = True
                    if not self._standby:
                        self._standby = True
                        self._standby_expiry = now + wait
                        self.welcomed = False
                        if self._log_limit.allow():
                            log.info("broker at %s: %s", self.endpoint, env.error.message)
                    else:
                        self._standby_expiry = min(self._standby_expiry, now + wait)
                    self._broker_expiry = self._standby_expiry
                    if not env.error.id and not env.error.refused:
                        continue
                    return env  # a job or a one-way message it refused: neither acted
                if env.error.code == Code.NOT_REGISTERED:
                    if self._standby:  # a standby that took over
                        self._standby = False
                        self._broker_expiry = now + self.interval * self.liveness
                    # The broker restarted and the connection came back by
                    # itself. What is sent until its Welcome waits (holding),
                    # to go after what it gives back (Error.refused: refused
                    # before this Hello).
                    self.welcomed = False
                    self._refused_since_welcome = True
                    self._send_hello()
                    if not env.error.refused:
                        continue
                    return env  # a one-way message it gave back: sent again after the Welcome
                if self._log_limit.allow():
                    log.warning("broker error %s: %s", code_name(env.error.code), env.error.message)
            return env

    def _hold_tail(self, kind):
        """What the link reads on a new socket before its Welcome (the tail)
        is the newest the broker sent; older messages that died in the
        replaced socket may be sent again after the Welcome. So the tail's
        application messages wait (up to hwm of them; link messages are
        handled at once, but for a Drain confirmation, which must not
        overtake the jobs before it), across further replacements, until
        the broker marks the end of what it sent again, or a Welcome says
        nothing will be."""
        return (self._replaced_since_welcome and len(self._tail) < self.hwm
                and kind not in ("welcome", "heartbeat", "error"))

    @property
    def has_released(self):
        """Messages wait in the link itself (the tail, released): receive()
        hands them out without the socket's saying so."""
        return bool(self._released)

    def _release_tail(self):
        self._awaiting_resent = False
        self._released.extend(self._tail)
        self._tail.clear()

    def send(self, env):
        return self.send_bytes(env.SerializeToString())

    def send_bytes(self, data):
        """Sends without blocking; False (and counted) when the pipe is full."""
        try:
            self.socket.send(data, zmq.NOBLOCK)
        except zmq.Again:
            self.send_dropped += 1
            return False
        self.sent_since_hello += 1
        return True

    def tick(self, now):
        """Heartbeats and broker liveness; call at or after next_tick(). A call
        more than an interval late (this process did not run) does not count
        the time since next_tick() as the broker's silence."""
        late = now - self.next_tick()
        if late > self.interval:
            # What the broker sent meanwhile waits unread: at least an interval
            # to read it, at most a whole liveness (a thread starved on every
            # tick still finds a broker that is really silent dead, only later).
            self._broker_expiry = min(max(self._broker_expiry + late, now + self.interval),
                                      now + self.interval * self.liveness)
        if now >= self._broker_expiry:
            before = self.endpoint
            self._at = (self._at + 1) % len(self.endpoints)
            if self._standby:
                log.info("broker at %s is a standby; trying %s", before, self.endpoint)
            elif self.welcomed or len(self.endpoints) > 1:
                log.warning("broker at %s went silent; %s %s", before,
                            "trying" if len(self.endpoints) > 1 else "reconnecting to", self.endpoint)
            self.reconnects += 1
            self._connect()
            return
        if self._awaiting_resent and now >= self._resent_due:
            self._release_tail()  # the mark never came: the tail goes now
        if now >= self._next_heartbeat:
            # Every interval, whatever else is sent: on the socket the broker
            # welcomed, it says what we read, and the broker forgets what it
            # kept of that (a replaced socket's reads go in the read report).
            env = pb.Envelope()
            env.heartbeat.SetInParent()
            if self.welcomed and not self._replaced_since_welcome and self.welcomed_hello:
                env.heartbeat.peer_read.hello = self.welcomed_hello
                env.heartbeat.peer_read.read_to = self._read_to
            self.send(env)
            self._next_heartbeat = now + self.interval

    def next_tick(self):
        at = min(self._broker_expiry, self._next_heartbeat)
        return min(at, self._resent_due) if self._awaiting_resent else at

