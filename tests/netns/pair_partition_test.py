"""A broker pair under network partitions (docs/protocol.md, "Broker pairs").

Run by tests/netns/run, which makes the namespaces and runs this file in C:
the primary broker in P, the backup in B, this test, its worker and its
client in C, a veth link between each two. Cutting one link is a partition
loopback cannot make: a pair whose own link is cut while its peers reach
both brokers, and a primary cut off from everyone while it keeps running.
"""
import json
import os
import subprocess
import sys
import time
import unittest
import urllib.request

import zmq

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from harness import BIN, Process, eventually, main  # noqa: E402
from sidecast.v1 import envelope_pb2 as pb  # noqa: E402
from sidecast_worker.link import PeerLink  # noqa: E402

P, B, C = (os.environ[f"SIDECAST_NETNS_{n}"] for n in "PBC")
PRIMARY, BACKUP = "10.77.1.2", "10.77.2.2"     # as seen from C
PRIMARY_PAIR, BACKUP_PAIR = "10.77.3.1", "10.77.3.2"
HEARTBEAT_MS = 200


def ip(*args):
    subprocess.run(["ip", *args], check=True)


def status(host):
    """The broker's /status "pair" object, or None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{host}:7780/status", timeout=1) as r:
            return json.loads(r.read()).get("pair")
    except OSError:
        return None


def state(host):
    s = status(host)
    return s and s["state"]


class Client:
    """A client on the Python SDK's link, which knows both brokers."""

    def __init__(self, context):
        self.link = PeerLink(context, f"tcp://{PRIMARY}:7700", "c1", role=pb.ROLE_CLIENT,
                             heartbeat_interval=HEARTBEAT_MS / 1000, backup_endpoint=f"tcp://{BACKUP}:7700")
        self.n = 0

    def echo(self, timeout=1.0):
        """True when an echo comes back OK within ``timeout``."""
        self.n += 1
        rid = f"c1:{self.n}"
        env = pb.Envelope()
        r = env.request
        r.id, r.service, r.event, r.args, r.wants_reply, r.timeout_ms = rid, "echo", "echo", b"[1]", True, 1000
        self.link.send(env)
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            now = time.monotonic()
            if now >= self.link.next_tick():
                self.link.tick(now)
            self.link.socket.poll(10, zmq.POLLIN)
            while (got := self.link.receive()) is not None:
                if got.WhichOneof("kind") == "reply" and got.reply.id == rid:
                    return got.reply.code == pb.OK
        return False

    def served(self, timeout):
        return eventually(self.echo, timeout)


class PairPartitionTest(unittest.TestCase):
    def setUp(self):
        self.context = zmq.Context()
        self.procs = []
        self.primary = self.broker(P, "primary", PRIMARY, PRIMARY_PAIR, BACKUP_PAIR)
        self.backup = self.broker(B, "backup", BACKUP, BACKUP_PAIR, PRIMARY_PAIR)
        self.start([os.path.join(BIN, "sidecast-worker"), "--service", "echo", "--id", "wn",
                    "--broker", f"tcp://{PRIMARY}:7700", "--publish", f"tcp://{PRIMARY}:7701",
                    "--backup-broker", f"tcp://{BACKUP}:7700", "--backup-publish", f"tcp://{BACKUP}:7701",
                    "--heartbeat-interval", str(HEARTBEAT_MS), "--log-level", "warn"], "worker")
        self.client = Client(self.context)
        self.assertTrue(self.client.served(10), "the pair never served")
        self.assertEqual(state(PRIMARY), "active")
        self.assertTrue(eventually(lambda: state(BACKUP) == "passive"))

    def tearDown(self):
        for ns, dev in ((P, "toB"), (P, "toC")):
            ip("-n", ns, "link", "set", dev, "up")
        self.client.link.close()
        self.context.term()
        failed = not getattr(self._outcome, "success", True)
        for p in self.procs:
            p.kill()
            if failed:
                print(f"--- {p.name} output ({self.id()}):\n{p.output()}")
            p.cleanup()

    def start(self, argv, name):
        p = Process(argv, name)
        self.procs.append(p)
        return p

    def broker(self, ns, role, host, pair_bind, pair_connect):
        p = self.start(["ip", "netns", "exec", ns, os.path.join(BIN, "sidecast-broker"), "--id", role,
                        "--router", f"tcp://{host}:7700", "--xsub", f"tcp://{host}:7701",
                        "--xpub", f"tcp://{host}:7702", "--http", f"{host}:7780",
                        "--heartbeat-interval", str(HEARTBEAT_MS), "--log-level", "info",
                        "--pair", role, "--pair-bind", f"tcp://{pair_bind}:7703",
                        "--pair-connect", f"tcp://{pair_connect}:7703"], role)
        self.assertTrue(eventually(lambda: status(host) is not None, 10), f"the {role} did not come up")
        return p

    def test_a_cut_pair_link_alone_fails_nothing_over(self):
        # The brokers cannot hear each other; the worker and the client
        # still reach both. No peer leaves the primary, so the backup, which
        # finds the primary silent, has nothing to take over: one active.
        ip("-n", P, "link", "set", "toB", "down")
        until = time.monotonic() + 15 * HEARTBEAT_MS / 1000
        rounds = 0
        while time.monotonic() < until:
            self.assertTrue(self.client.echo(), "the primary stopped serving")
            self.assertEqual(state(BACKUP), "passive")
            self.assertEqual(state(PRIMARY), "active")
            rounds += 1
        self.assertGreater(rounds, 5)
        self.assertGreater(status(BACKUP)["other_heard_ms_ago"], 2 * HEARTBEAT_MS, "the cut let the state through")
        self.assertEqual(status(BACKUP)["term"], 0, "the backup never became active")
        ip("-n", P, "link", "set", "toB", "up")
        self.assertTrue(eventually(lambda: status(BACKUP)["other_heard_ms_ago"] < 2 * HEARTBEAT_MS))
        self.assertEqual((state(PRIMARY), state(BACKUP)), ("active", "passive"))
        self.assertTrue(self.client.echo())
        self.assertEqual(self.client.link.endpoint, f"tcp://{PRIMARY}:7700")

    def test_an_isolated_primary_steps_down_when_the_network_heals(self):
        # The primary's host is cut off from everyone, and runs on: its
        # peers and the backup find it silent, and the backup takes over.
        primary_term = status(PRIMARY)["term"]
        ip("-n", P, "link", "set", "toC", "down")
        ip("-n", P, "link", "set", "toB", "down")
        self.assertTrue(self.client.served(15), "no failover to the backup")
        self.assertEqual(self.client.link.endpoint, f"tcp://{BACKUP}:7700")
        self.assertEqual(status(BACKUP)["state"], "active")
        self.assertGreater(status(BACKUP)["term"], primary_term)
        # The network heals: two active brokers. The primary's term is
        # below the backup's (the later activation): the primary steps
        # down, the backup stays.
        ip("-n", P, "link", "set", "toB", "up")
        ip("-n", P, "link", "set", "toC", "up")
        self.assertTrue(eventually(lambda: state(PRIMARY) == "passive", 10), "the primary did not step down")
        self.assertEqual(state(BACKUP), "active")
        self.assertTrue(self.client.served(5))
        self.assertEqual(self.client.link.endpoint, f"tcp://{BACKUP}:7700")


if __name__ == "__main__":
    main()
