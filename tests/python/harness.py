"""Test helpers that play the Python worker's neighbours over real sockets.

The Python counterpart of tests/integration/harness.hpp: the real broker
(and gateway) as child processes on free loopback ports, a raw DEALER peer
speaking the envelope protocol (a client or a fake gateway), a SUB on the
broker's XPUB, and waiting on conditions instead of sleeping. Every wait is
bounded.
"""
import collections
import importlib.machinery
import importlib.util
import os
import re
import subprocess
import tempfile
import time
import unittest
import urllib.error
import urllib.request

import zmq

from sidecast.v1 import envelope_pb2 as pb

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BIN = os.environ.get("SIDECAST_BIN") or os.path.join(REPO, "build", "bin")
PYTHON = "/usr/bin/python3"  # Debian's: it sees python3-zmq and python3-protobuf
EXAMPLES = os.path.join(REPO, "workers", "python", "examples")
WAIT = 5.0  # default bound of a wait, seconds


def eventually(condition, timeout=WAIT, interval=0.01):
    """Polls ``condition`` until it returns something truthy (returned) or ``timeout`` passes."""
    until = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= until:
            return value
        time.sleep(interval)


class ImmediateResult(unittest.TextTestResult):
    """Prints each error's or failure's traceback as it happens, next to the
    test's name, as well as in the summary: CI logs may keep only the start
    and end of a long run's output, and a traceback that only the summary
    held was lost with its middle."""

    def addError(self, test, err):
        super().addError(test, err)
        self._print_now("ERROR", test, err)

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._print_now("FAIL", test, err)

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            self._print_now("FAIL" if issubclass(err[0], test.failureException) else "ERROR", subtest, err)

    def _print_now(self, kind, test, err):
        self.stream.writeln(f"\n{kind} at once: {test.id()}")
        self.stream.writeln(self._exc_info_to_string(err, test).rstrip())
        self.stream.flush()


def has_failed(case):
    """Whether ``case`` (a running TestCase) has failed or errored so far; from
    its cleanups too, where Python 3.11's ``case._outcome.success`` reads True
    whatever happened before (each test part starts it anew)."""
    result = case._outcome.result
    return any(test is case or getattr(test, "test_case", None) is case
               for test, _ in [*result.errors, *result.failures])


class ImmediateRunner(unittest.TextTestRunner):
    resultclass = ImmediateResult


def main():
    """unittest.main() whose runner prints tracebacks as they happen (ImmediateResult)."""
    unittest.main(testRunner=ImmediateRunner)


def _load_free_ports():
    """tools/free-ports, the one place that picks ports for tests (see its docstring)."""
    loader = importlib.machinery.SourceFileLoader("free_ports", os.path.join(REPO, "tools", "free-ports"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module.free_ports


free_ports = _load_free_ports()


def free_port():
    """One free TCP port on 127.0.0.1, from below the ephemeral range."""
    return free_ports(1)[0]


def http_get(port, path, timeout=2.0):
    """(status, body) of GET http://127.0.0.1:port/path; (0, '') when unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (OSError, urllib.error.URLError):
        return 0, ""


def metric(text, name, **labels):
    """The value of one Prometheus sample in ``text``, or None."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = ",".join(sorted(p for p in (m.group(2) or "").split(",") if p))
        if got == want:
            return float(m.group(3))
    return None


class Process:
    """A child process; its output goes to a log file shown when a test fails."""

    def __init__(self, argv, name, env=None):
        self.name = name
        self.argv = argv
        self.log_file = tempfile.NamedTemporaryFile(prefix=f"sidecast-{name}-", suffix=".log",
                                                    delete=False)
        self.proc = subprocess.Popen(argv, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)

    def running(self):
        return self.proc.poll() is None

    def signal(self, sig):
        if self.running():
            self.proc.send_signal(sig)

    def stop(self, timeout=5.0):
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.running():
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.log_file.close()
        return self.proc.returncode

    def kill(self):
        if self.running():
            self.proc.kill()
            self.proc.wait(WAIT)
        return self.proc.returncode

    def output(self, tail=4000):
        try:
            with open(self.log_file.name, errors="replace") as f:
                return f.read()[-tail:]
        except OSError:
            return ""

    def cleanup(self):
        self.kill()
        self.log_file.close()
        try:
            os.unlink(self.log_file.name)
        except OSError:
            pass


class Broker:
    """sidecast-broker on free ports."""

    def __init__(self, heartbeat_interval_ms=200, ports=None, extra=()):
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.extra = list(extra)
        self.process = None
        for attempt in range(3):
            self.router_port, self.xsub_port, self.xpub_port, self.http_port = \
                ports or tuple(free_ports(4))
            self.router = f"tcp://127.0.0.1:{self.router_port}"
            self.xsub = f"tcp://127.0.0.1:{self.xsub_port}"
            self.xpub = f"tcp://127.0.0.1:{self.xpub_port}"
            try:
                self.start()
                return
            except PortTaken:
                # Another test of a parallel ctest bound a port between
                # free_ports() and our bind: pick others, unless they were given.
                if ports or attempt == 2:
                    raise

    @property
    def ports(self):
        return self.router_port, self.xsub_port, self.xpub_port, self.http_port

    def start(self):
        self.process = Process([os.path.join(BIN, "sidecast-broker"),
                                "--router", self.router, "--xsub", self.xsub, "--xpub", self.xpub,
                                "--http", f"127.0.0.1:{self.http_port}",
                                "--heartbeat-interval", str(self.heartbeat_interval_ms),
                                "--log-level", "warn", *self.extra], "broker")
        up = eventually(lambda: http_get(self.http_port, "/healthz")[0] == 200 or not self.process.running(), 10)
        if not up or not self.process.running():
            output = self.process.output()
            self.process.cleanup()  # no broker left running behind a failed setUp
            raise (PortTaken if "Address already in use" in output else RuntimeError)(
                "broker did not come up:\n" + output)

    def metrics(self):
        return http_get(self.http_port, "/metrics")[1]

    def metric(self, name, **labels):
        return metric(self.metrics(), name, **labels)

    def workers(self, service):
        """sidecast_broker_workers{service=...}: live workers (updated each heartbeat tick)."""
        return self.metric("sidecast_broker_workers", service=service)

    def stop(self):
        self.process.stop()

    def kill(self):
        self.process.kill()

    def cleanup(self):
        self.process.cleanup()


class PortTaken(RuntimeError):
    """A child could not bind a port that free_ports() found free."""


def pair_args(role, mine, other):
    """sidecast-broker flags for one broker of a pair ("primary" or "backup")
    whose pair PUB binds 127.0.0.1:``mine`` and hears the other's on ``other``."""
    return ["--id", role, "--pair", role, "--pair-bind", f"tcp://127.0.0.1:{mine}",
            "--pair-connect", f"tcp://127.0.0.1:{other}"]


class Peer:
    """A DEALER peer of the broker (client or fake gateway), driven by the test.

    It heartbeats from inside receive() once registered, so a fake gateway
    stays alive through a long test. Messages that next() skips are kept
    for later calls, so waiting for one reply never loses another.
    """

    def __init__(self, context, endpoint, peer_id, role=pb.ROLE_CLIENT, heartbeat=0.2):
        self.id = peer_id
        self.role = role
        self.heartbeat = heartbeat
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.ROUTING_ID, peer_id.encode())
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.registered = False
        self.last_send = 0.0
        self.next_id = 0
        self.skipped = collections.deque()

    def close(self):
        self.socket.close(linger=0)

    def send(self, env):
        self.socket.send(env.SerializeToString())
        self.last_send = time.monotonic()

    def hello(self, timeout=WAIT):
        env = pb.Envelope()
        env.hello.role = self.role
        env.hello.id = self.id
        env.hello.protocol_version = 1
        self.send(env)
        self.registered = self.next("welcome", timeout) is not None
        return self.registered

    def receive(self, timeout=WAIT):
        """The next envelope other than a heartbeat, or None after ``timeout``."""
        if self.skipped:
            return self.skipped.popleft()
        return self._receive(timeout)

    def _receive(self, timeout):
        until = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if self.registered and now - self.last_send >= self.heartbeat:
                hb = pb.Envelope()
                hb.heartbeat.SetInParent()
                self.send(hb)
            left = until - now
            if left <= 0:
                return None
            if not self.socket.poll(int(min(left, self.heartbeat) * 1000) + 1, zmq.POLLIN):
                continue
            env = pb.Envelope()
            env.ParseFromString(self.socket.recv())
            if env.WhichOneof("kind") != "heartbeat":
                return env
            if env.heartbeat.probe:  # after its stall the broker asks which connection we are on
                self.send(env)

    def next(self, kind, timeout=WAIT, where=lambda env: True):
        """The next envelope of ``kind`` (a oneof name) matching ``where``, skipping others."""
        def wanted(env):
            return env.WhichOneof("kind") == kind and where(env)

        for env in self.skipped:
            if wanted(env):
                self.skipped.remove(env)
                return env
        until = time.monotonic() + timeout
        while True:
            env = self._receive(max(0.0, until - time.monotonic()))
            if env is None:
                return None
            if wanted(env):
                return env
            self.skipped.append(env)

    def collect(self, duration):
        """Every non-heartbeat envelope received during ``duration`` seconds."""
        got, until = list(self.skipped), time.monotonic() + duration
        self.skipped.clear()
        while (left := until - time.monotonic()) > 0:
            env = self._receive(left)
            if env is not None:
                got.append(env)
        return got

    def submit(self, service, event, args="[]", timeout_ms=5000, sid="", nsp="/", wants_reply=True,
               auth=b"", user=""):
        self.next_id += 1
        rid = f"{self.id}:{self.next_id}"
        env = pb.Envelope()
        r = env.request
        r.id, r.service, r.event, r.sid, r.nsp = rid, service, event, sid, nsp
        r.args = args.encode() if isinstance(args, str) else args
        r.wants_reply, r.timeout_ms, r.auth, r.user = wants_reply, timeout_ms, auth, user
        self.send(env)
        return rid

    def reply_to(self, rid, timeout=WAIT, final=True):
        """The Reply for request ``rid`` (the final one unless ``final`` is False)."""
        return self.next("reply", timeout,
                         lambda e: e.reply.id == rid and (not final or not e.reply.partial))

    def call(self, service, event, args="[]", timeout_ms=5000, **kw):
        rid = self.submit(service, event, args, timeout_ms, **kw)
        env = self.reply_to(rid, timeout_ms / 1000.0 + 2)
        return env.reply if env is not None else None

    def cancel(self, rid):
        env = pb.Envelope()
        env.cancel.id = rid
        env.cancel.reason = pb.CANCELLED
        self.send(env)

    def lifecycle(self, service, kind, sid, nsp="/", auth=b"", reason="", timeout_ms=5000):
        self.next_id += 1
        rid = f"{self.id}:{self.next_id}"
        env = pb.Envelope()
        lc = env.lifecycle
        lc.kind, lc.id, lc.service, lc.sid, lc.nsp = kind, rid, service, sid, nsp
        lc.auth, lc.reason, lc.timeout_ms = auth, reason, timeout_ms
        self.send(env)
        return rid


def python_env(**extra):
    """The environment for a Python child: PYTHONPATH with the generated protobuf
    module and the SDK this test imported, plus ``extra``."""
    import sidecast_worker
    generated = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(pb.__file__))))
    sdk = os.path.dirname(os.path.dirname(os.path.abspath(sidecast_worker.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([generated, sdk, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env
