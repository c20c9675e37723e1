// Faults, and what a client sees through each: a worker killed mid-request,
// the broker killed and restarted, a gateway stopped with SIGTERM, killed or
// stalled. Every process is started here (SIDECAST_BIN) on free loopback ports.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { io } from "socket.io-client";

const bin = process.env.SIDECAST_BIN;
const children = new Set();
const clients = new Set();  // closed at the end too: a failed test's client would keep node running
after(() => {
  for (const c of children) c.kill("SIGKILL");
  for (const c of clients) c.close();
});

// Free loopback ports from tools/free-ports (below the ephemeral range; see there why).
function freePorts(n) {
  const tool = new URL("../../tools/free-ports", import.meta.url).pathname;
  return execFileSync(tool, [String(n)], { encoding: "utf8" }).trim().split(" ").map(Number);
}
function run(name, args) {
  const child = spawn(`${bin}/${name}`, [...args, "--log-level", "warn"], { stdio: ["ignore", "inherit", "inherit"] });
  children.add(child);
  child.exited = new Promise((resolve) => child.once("exit", (code, signal) => { children.delete(child); resolve({ code, signal }); }));
  return child;
}
async function until(check, ms = 10000) {
  const end = Date.now() + ms;
  while (Date.now() < end) { if (await check()) return true; await new Promise((r) => setTimeout(r, 50)); }
  return false;
}
const healthy = (url) => fetch(`${url}/healthz`).then((r) => r.ok, () => false);

// `admin`: the broker and the first worker serve /metrics too (s.brokerUrl, s.workerUrl).
async function stack({ workers = 1, gatewayArgs = [], workerArgs = [], brokerArgs = [], admin = false } = {}) {
  const [router, xsub, xpub, http, brokerHttp, workerHttp] = freePorts(6);
  const s = {
    router: `tcp://127.0.0.1:${router}`, xsub: `tcp://127.0.0.1:${xsub}`, xpub: `tcp://127.0.0.1:${xpub}`,
    url: `http://127.0.0.1:${http}`, workers: [],
    brokerUrl: `http://127.0.0.1:${brokerHttp}`, workerUrl: `http://127.0.0.1:${workerHttp}`,
  };
  const brokerAdmin = admin ? `127.0.0.1:${brokerHttp}` : "";
  s.startBroker = () => { s.broker = run("sidecast-broker", ["--router", s.router, "--xsub", s.xsub, "--xpub", s.xpub, "--http", brokerAdmin, ...brokerArgs]); };
  s.startBroker();
  for (let i = 0; i < workers; i++)
    s.workers.push(run("sidecast-worker", ["--service", "demo", "--service", "echo", "--capacity", "1", "--id", `w${i}`,
                                           "--broker", s.router, "--publish", s.xsub, ...workerArgs,
                                           ...(admin && i === 0 ? ["--http", `127.0.0.1:${workerHttp}`] : [])]));
  s.gateway = run("sidecast-gateway", ["--http", `127.0.0.1:${http}`, "--broker", s.router, "--events", s.xpub,
                                       "--route", "/=demo", "--route", "/echo=echo", ...gatewayArgs]);
  assert.ok(await until(() => healthy(s.url)), "gateway healthy");
  return s;
}
function connect(url, opts = {}) {
  const s = io(url, { transports: ["websocket"], forceNew: true, ...opts });
  clients.add(s);
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error("connect timeout")), 10000);
    s.once("connect", () => { clearTimeout(t); resolve(s); });
  });
}

test("worker killed mid-request: the client still gets its ack (retried on the other worker)", async () => {
  const s = await stack({ workers: 2 });
  const c = await connect(`${s.url}/echo`);
  // Both workers are up once two slow requests run at once (capacity 1 each).
  const acks = [c.timeout(15000).emitWithAck("delay", 1000, "a"), c.timeout(15000).emitWithAck("delay", 1000, "b")];
  await new Promise((r) => setTimeout(r, 300));
  s.workers[0].kill("SIGKILL");
  assert.deepEqual(await Promise.all(acks), ["a", "b"]);
  assert.ok(c.connected, "the client never noticed");
  c.close();
  s.gateway.kill("SIGKILL");
  s.broker.kill("SIGKILL");
  s.workers[1].kill("SIGKILL");
});

// Twice: the gateway's bridge on its own thread (the default here, 2 cores),
// and on the one I/O thread with an outage longer than the heartbeat
// liveness (3 × 1 s), after which the gateway replaces its broker socket and
// the bridge must follow it to the new ZMQ_FD.
for (const [variant, extraArgs, downMs] of [["", [], 500],
                                            [" (one I/O thread; a 5 s outage replaces the broker socket)", ["--threads", "1"], 5000]]) {
test("broker killed and restarted: clients stay connected, every event gets an answer, traffic resumes" + variant, async () => {
  const s = await stack({ workers: 1, gatewayArgs: ["--request-timeout", "4000", ...extraArgs] });
  const c = await connect(s.url);
  let disconnects = 0;
  c.on("disconnect", () => disconnects++);
  assert.equal(await c.timeout(5000).emitWithAck("echo", 1), 1);
  s.broker.kill("SIGKILL");
  await s.broker.exited;
  // While the broker is down the event cannot be served; its answer is the
  // echo (if it waited for the new broker) or an error ack — never silence.
  const during = c.timeout(15000).emitWithAck("echo", "during");
  await new Promise((r) => setTimeout(r, downMs));
  s.startBroker();
  const answer = await during;
  assert.ok(answer === "during" || (answer && typeof answer.error === "string"), JSON.stringify(answer));
  assert.ok(await until(async () => (await c.timeout(2000).emitWithAck("echo", "after").catch(() => null)) === "after", 15000),
            "traffic resumes once gateway and worker have announced themselves again");
  assert.equal(disconnects, 0, "a broker restart does not drop client connections");
  c.close();
  for (const p of [s.gateway, s.broker, ...s.workers]) p.kill("SIGKILL");
});
}

// The value of one series of a /metrics page, or undefined.
async function metric(url, series) {
  const body = await (await fetch(`${url}/metrics`)).text();
  const line = body.split("\n").find((l) => l.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
// The lines of a /metrics page whose series start with one of `prefixes`,
// but those at 0: for a failure's message, so that a rare one says where
// messages went.
async function series(url, prefixes) {
  const body = await (await fetch(`${url}/metrics`)).text();
  return body.split("\n").filter((l) => prefixes.some((p) => l.startsWith(p)) && !l.endsWith(" 0")).join("; ");
}

// The broker that held the request is gone, and so is any answer to it: the
// gateway says so when the new broker welcomes it, rather than with TIMEOUT
// at the request's deadline (20 s here, past which the client stops waiting).
test("broker killed while a worker runs a request: the ack is broker_lost when the new broker welcomes the gateway", async () => {
  const s = await stack({ workers: 1, gatewayArgs: ["--request-timeout", "20000"] });
  const c = await connect(`${s.url}/echo`);
  const held = c.timeout(19000).emitWithAck("delay", 15000, "held");
  assert.ok(await until(async () => (await metric(s.url, "sidecast_gateway_broker_connected")) === 1));
  await sleep(300);  // dispatched to the worker by now
  s.broker.kill("SIGKILL");
  await s.broker.exited;
  s.startBroker();
  const answer = await held;
  assert.equal(answer?.error, "broker_lost", JSON.stringify(answer));
  assert.equal(await metric(s.url, "sidecast_gateway_broker_lost_total"), 1);
  assert.equal(await metric(s.url, "sidecast_gateway_broker_restarts_total"), 1);
  assert.ok(await until(async () => (await c.timeout(2000).emitWithAck("echo", "after").catch(() => null)) === "after", 15000),
            "traffic resumes");
  c.close();
  for (const p of [s.gateway, s.broker, ...s.workers]) p.kill("SIGKILL");
});

// The same broker, silent past the heartbeat liveness (3 × 1 s): the gateway
// opens a new socket and says Hello again, and the Welcome is the old
// broker's. What that broker holds is not lost, and must not be failed so.
// Nor is any peer dropped when the broker comes back: the time it was away
// is not counted against their heartbeats. The worker, back on a new socket,
// keeps its job: the broker sends it again there (it might have died on the
// old one), and the worker, which still runs it, does not run it twice.
// Requests sent during the stall wait in the gateway's old socket; what of
// them died there when the new socket took the gateway's id (the broker's
// Welcome says how much it read), the gateway sends again: all are answered
// soon after the stall, none at its deadline (20 s). So are events
// published to a client through the HTTP API meanwhile: none is lost. And
// the progress of VMs launching through the stall: what the worker emitted
// into its old socket it sends again, and what the broker had sent into
// the gateway's old socket, the broker sends again once the gateway says
// what it read (Heartbeat.read).
test("broker stalled (SIGSTOP) past the heartbeat liveness: the request it holds is still answered, and run once", async () => {
  const s = await stack({ workers: 1, admin: true,
                          gatewayArgs: ["--request-timeout", "20000", "--api-key", "k", "--route", "/vm=vm"],
                          workerArgs: ["--service", "vm", "--vm-launch-ms", "6000", "--vm-failure-rate", "0"] });
  const c = await connect(`${s.url}/echo`);
  const news = [];
  c.on("news", (n) => news.push(n));
  const held = c.timeout(19000).emitWithAck("delay", 8000, "held");
  assert.ok(await until(async () => await metric(s.workerUrl, "sidecast_worker_requests_running") === 1, 5000),
            "the worker runs the delay");
  // Ten VMs launching through the stall: the worker's progress emits go
  // into the socket it replaces too.
  const vm = await connect(`${s.url}/vm`);
  const progress = [];
  vm.on("vm_progress", (p) => progress.push(`${p.vm} ${p.percent}`));
  const launched = new Promise((resolve) => vm.once("vm_response", resolve));
  await vm.timeout(5000).emitWithAck("open_vm", { count: 10, name: "s" });
  s.broker.kill("SIGSTOP");
  await sleep(1000);
  const during = [];
  for (let i = 0; i < 50; i++) {
    during.push(c.timeout(12000).emitWithAck("echo", i));
    const res = await fetch(`${s.url}/api/v1/publish`, {
      method: "POST", headers: { Authorization: "Bearer k" }, body: JSON.stringify({ sid: c.id, event: "news", data: i }) });
    assert.equal(res.status, 202, await res.text());
  }
  await sleep(3500);
  s.broker.kill("SIGCONT");
  assert.deepEqual(await Promise.all(during), [...Array(50).keys()], "every request sent during the stall answered");
  if (!await until(() => news.length >= 50, 5000)) {
    // Seen once in about ten CI runs (26 of 50, the gateway having sent 5
    // again), never here in 64 runs. Likely cause, fixed on 2026-12-06: a
    // stall past the liveness ended the broker's wait for the gateway's read
    // report, which it then ignored (BrokerTest.AStallWhileWaitingForAReadReport...).
    const broker = await series(s.brokerUrl, ["sidecast_broker_dropped_total", "sidecast_broker_parked_total",
                                              "sidecast_broker_read_reports_total", "sidecast_broker_probes_total",
                                              "sidecast_broker_sent_again_total", "sidecast_broker_peer_reconnects"]);
    const gateway = await series(s.url, ["sidecast_gateway_dropped_total", "sidecast_gateway_requests_resent",
                                         "sidecast_gateway_notices_resent", "sidecast_gateway_broker_link_held"]);
    assert.fail(`published during the stall: ${news.length} of 50 came (${news}); broker: ${broker}; gateway: ${gateway}`);
  }
  assert.deepEqual(news, [...Array(50).keys()], "in order, once each");
  console.log(`sent again by the gateway: ${await metric(s.url, "sidecast_gateway_requests_resent_total")} requests, ` +
              `${await metric(s.url, "sidecast_gateway_notices_resent_total")} notices`);
  assert.equal(await held, "held");
  const response = await launched;
  assert.equal(response.data.length, 10);
  const expected = [];
  for (let v = 1; v <= 10; v++) for (let step = 0; step <= 10; step++) expected.push(`s-${v} ${step * 10}`);
  assert.ok(await until(() => progress.length >= expected.length, 2000), `${progress.length} progress events came; missing: ${expected.filter((e) => !progress.includes(e))}`);
  assert.deepEqual([...progress].sort(), [...expected].sort(), "every progress event of the stall came, once");
  // And each VM's in the order the worker emitted them: what it emitted on
  // its new socket waited for what died in the old one.
  for (let v = 1; v <= 10; v++) {
    const mine = progress.filter((p) => p.startsWith(`s-${v} `));
    assert.deepEqual(mine, expected.filter((e) => e.startsWith(`s-${v} `)), `s-${v}'s progress in order`);
  }
  console.log(`sent again by the worker: ${await metric(s.workerUrl, "sidecast_worker_notices_resent_total")} emits; ` +
              `by the broker: ${await metric(s.brokerUrl, "sidecast_broker_sent_again_total")} messages`);
  vm.close();
  assert.equal(await metric(s.url, "sidecast_gateway_broker_restarts_total"), 0);
  assert.equal(await metric(s.url, "sidecast_gateway_broker_lost_total"), 0);
  assert.equal(await metric(s.brokerUrl, "sidecast_broker_stalls_total"), 1);
  // Came back as the peers they were: dropped, their Hellos would have registered them anew.
  assert.equal(await metric(s.brokerUrl, "sidecast_broker_peer_reconnects_total"), 2, "the worker and the gateway");
  assert.equal(await metric(s.workerUrl, "sidecast_worker_jobs_again_total"), 1,
               "the delay came again (not the open_vm: answered early, the broker holds it only for its capacity)");
  await sleep(1500);  // a second run, had there been one, would have started by now
  assert.equal(await metric(s.workerUrl, "sidecast_worker_requests_running"), 0, "the delay and the open_vm ran once");
  c.close();
  for (const p of [s.gateway, s.broker, ...s.workers]) p.kill("SIGKILL");
});

// A primary/backup broker pair (docs/deployment.md, "A broker pair"): the
// gateway and the worker know both brokers; the primary dies and the
// backup takes over. Clients keep their connections, their rooms and their
// events; what the primary held when it died is answered broker_lost.
test("broker pair: the active broker killed, clients stay connected and are served through the backup, rooms too", async () => {
  const [pr, px, pp, br, bx, bp, pPair, bPair, http, bHttp] = freePorts(10);
  const ep = (port) => `tcp://127.0.0.1:${port}`;
  const broker = (role, ports, mine, other, admin) =>
    run("sidecast-broker", ["--id", role, "--router", ep(ports[0]), "--xsub", ep(ports[1]), "--xpub", ep(ports[2]),
                            "--http", admin, "--heartbeat-interval", "200", "--pair", role,
                            "--pair-bind", ep(mine), "--pair-connect", ep(other)]);
  const primary = broker("primary", [pr, px, pp], pPair, bPair, "");
  const backup = broker("backup", [br, bx, bp], bPair, pPair, `127.0.0.1:${bHttp}`);
  const worker = run("sidecast-worker", ["--service", "demo", "--id", "wpair", "--broker", ep(pr), "--publish", ep(px),
                                         "--backup-broker", ep(br), "--backup-publish", ep(bx)]);
  const gateway = run("sidecast-gateway", ["--http", `127.0.0.1:${http}`, "--broker", ep(pr), "--events", ep(pp),
                                           "--backup-broker", ep(br), "--backup-events", ep(bp), "--route", "/=demo"]);
  const url = `http://127.0.0.1:${http}`;
  assert.ok(await until(() => healthy(url)), "gateway healthy");
  const a = await connect(url);
  const b = await connect(url);
  let disconnects = 0;
  for (const c of [a, b]) c.on("disconnect", () => disconnects++);
  const echoes = (c, v) => c.timeout(2000).emitWithAck("echo", v).then((r) => r === v, () => false);
  assert.ok(await until(() => echoes(a, "first"), 10000), "served through the primary");
  for (const c of [a, b]) assert.equal(await c.timeout(5000).emitWithAck("join", "pair-room"), "pair-room");
  const heard = [];
  b.on("said", (m) => heard.push(m.text));
  const said = (text) => until(async () => { a.emit("say", { room: "pair-room", text }); await sleep(200); return heard.includes(text); }, 10000);
  assert.ok(await said("before"), "a room event through the primary");
  // (A backup that never heard the primary active never takes over.)
  const backupState = () => fetch(`http://127.0.0.1:${bHttp}/status`).then((r) => r.json()).then((s) => s.pair.state, () => null);
  assert.ok(await until(async () => (await backupState()) === "passive"), "the backup heard the primary");

  const killedAt = Date.now();
  primary.kill("SIGKILL");
  await primary.exited;
  assert.ok(await until(() => echoes(a, "after"), 20000), "served through the backup");
  assert.ok(await said("after"), "a room event through the backup: the gateway is subscribed there too");
  assert.equal(disconnects, 0, "a failover does not drop client connections");
  const status = await fetch(`http://127.0.0.1:${bHttp}/status`).then((r) => r.json());
  // A term is at least the wall clock's milliseconds at the activation
  // (broker/pair.hpp): past the primary's, whose activation came before.
  assert.equal(status.pair.state, "active");
  assert.ok(status.pair.term >= killedAt, `term ${status.pair.term} is before the failover (${killedAt})`);
  assert.equal(await metric(url, "sidecast_gateway_broker_restarts_total"), 1, "the backup is a new broker to the gateway");
  for (const c of [a, b]) c.close();
  for (const p of [gateway, worker, backup]) p.kill("SIGKILL");
});

test("gateway SIGTERM: clients see their transport close (and would reconnect elsewhere); exit within the drain bound", async () => {
  const s = await stack({ workers: 1, gatewayArgs: ["--drain-timeout", "2000"] });
  const polling = await connect(s.url, { transports: ["polling"], reconnection: false });
  const ws = await connect(s.url, { reconnection: false });
  const reasons = [once(polling, "disconnect"), once(ws, "disconnect")];
  const started = Date.now();
  s.gateway.kill("SIGTERM");
  const got = await Promise.all(reasons);
  for (const reason of got) assert.notEqual(reason, "io server disconnect", "a transport close, so clients reconnect");
  const { code } = await s.gateway.exited;
  assert.equal(code, 0);
  assert.ok(Date.now() - started < 4000, "exits within the drain timeout");
  for (const p of [s.broker, ...s.workers]) p.kill("SIGKILL");
});

test("gateway killed: clients see the transport close and reconnect when a gateway is back", async () => {
  const s = await stack({ workers: 1 });
  const c = await connect(s.url, { reconnectionDelay: 200, reconnectionDelayMax: 500 });
  const firstId = c.id;
  const reason = once(c, "disconnect");
  s.gateway.kill("SIGKILL");
  assert.equal(await reason, "transport close");
  // A gateway comes back on the same address (a balancer would send the
  // client to another one at once); the client reconnects by itself.
  const port = new URL(s.url).port;
  s.gateway = run("sidecast-gateway", ["--http", `127.0.0.1:${port}`, "--broker", s.router, "--events", s.xpub,
                                       "--route", "/=demo"]);
  await once(c, "connect");
  assert.notEqual(c.id, firstId, "a new session: the old gateway's state died with it");
  assert.equal(await c.timeout(5000).emitWithAck("echo", "back"), "back");
  c.close();
  for (const p of [s.gateway, s.broker, ...s.workers]) p.kill("SIGKILL");
});

// A broker, a chat worker and two gateways (gwA, gwB): what a room hears
// when one gateway is lost. Heartbeats every 500 ms: the broker drops a
// silent gateway after 1.5 s, and announces it gone `goneAfter` ms later.
// `gatewayArgs`: more flags for both gateways. s.startChat(): the chat
// worker again, on the same database, serving /metrics on s.chatUrl.
test("an event larger than the broker takes is answered at once, and the gateway's link keeps serving", async () => {
  // Over tcp a message past the broker's --max-message-bytes costs the
  // sender its connection and all in flight on it; the client waited out
  // its deadline for an answer that could not come.
  const s = await stack({ brokerArgs: ["--max-message-bytes", "20000"], gatewayArgs: ["--max-payload", "100000"] });
  try {
    const c = await connect(s.url);
    const started = Date.now();
    const refused = await c.timeout(8000).emitWithAck("echo", "x".repeat(50000));
    assert.equal(refused.error, "bad_request");
    assert.match(refused.message, /^the event is \d+ bytes with its socket's auth, more than the broker takes \(\d+\)$/);
    assert.ok(Date.now() - started < 2000, "answered at once, not at a deadline");
    assert.equal(await c.timeout(8000).emitWithAck("echo", "small"), "small");
  } finally {
    s.broker.kill("SIGKILL");
    s.gateway.kill("SIGKILL");
    for (const w of s.workers) w.kill("SIGKILL");
  }
});

async function chatStack(goneAfter, gatewayArgs = []) {
  const [router, xsub, xpub, httpA, httpB, chatHttp] = freePorts(6);
  const dir = mkdtempSync(join(tmpdir(), "sidecast-gone-"));
  const s = {
    router: `tcp://127.0.0.1:${router}`, xsub: `tcp://127.0.0.1:${xsub}`, xpub: `tcp://127.0.0.1:${xpub}`,
    urlA: `http://127.0.0.1:${httpA}`, urlB: `http://127.0.0.1:${httpB}`, chatUrl: `http://127.0.0.1:${chatHttp}`,
  };
  s.broker = run("sidecast-broker", ["--router", s.router, "--xsub", s.xsub, "--xpub", s.xpub, "--http", "",
                                     "--heartbeat-interval", "500", "--gateway-gone-after", String(goneAfter)]);
  s.startChat = () => {
    s.chat = run("sidecast-worker", ["--service", "chat", "--chat-db", join(dir, "chat.db"), "--broker", s.router,
                                     "--publish", s.xsub, "--http", new URL(s.chatUrl).host]);
  };
  s.startChat();
  const gateway = (id, url) => run("sidecast-gateway", ["--http", new URL(url).host, "--broker", s.router,
                                                        "--events", s.xpub, "--gateway-id", id, "--route", "/chat=chat",
                                                        ...gatewayArgs]);
  s.gatewayA = gateway("gwA", s.urlA);
  s.gatewayB = gateway("gwB", s.urlB);
  assert.ok(await until(() => healthy(s.urlA)) && await until(() => healthy(s.urlB)), "gateways healthy");
  s.stop = () => {
    for (const p of [s.gatewayA, s.gatewayB, s.chat, s.broker]) p.kill("SIGKILL");
    rmSync(dir, { recursive: true, force: true });
  };
  return s;
}
// Resolves with the next `event` payload that satisfies `pred`, or fails after `ms`.
function next(socket, event, pred = () => true, ms = 8000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { socket.off(event, on); reject(new Error(`no such ${event} within ${ms} ms`)); }, ms);
    const on = (payload) => { if (pred(payload)) { clearTimeout(timer); socket.off(event, on); resolve(payload); } };
    socket.on(event, on);
  });
}
const ack = (socket, ...args) => socket.timeout(8000).emitWithAck(...args);
// ann on gateway A and bob on gateway B, both in one room.
async function annAndBob(s, annOptions = { reconnection: false }) {
  const room = "r" + Date.now();
  const ann = await connect(s.urlA + "/chat", annOptions);
  const bob = await connect(s.urlB + "/chat", { reconnection: false });
  await ack(ann, "nick", "ann");
  await ack(bob, "nick", "bob");
  await ack(ann, "join", room);
  assert.deepEqual((await ack(bob, "join", room)).members, ["ann", "bob"]);
  return { room, ann, bob };
}
// What a sid's gateway drew when it started (or renewed): "<id>.<8 characters>".
const sidPrefix = (sid) => sid.slice(0, sid.indexOf(".") + 9);

test("gateway killed: the broker announces it gone, and its sockets leave the chat rooms they were in", async () => {
  const s = await chatStack(500);
  try {
    const { bob } = await annAndBob(s);
    const left = next(bob, "presence", (p) => !p.members.includes("ann"));
    s.gatewayA.kill("SIGKILL");
    // No DISCONNECT ever comes for ann: without the announcement she would
    // stay in the room's list for good.
    assert.deepEqual((await left).members, ["bob"]);
  } finally {
    s.stop();
  }
});

test("gateway stalled past the broker's grace: announced gone, then on its return it ends its sockets, whose clients reconnect under a new prefix and join again", async () => {
  const s = await chatStack(0);
  try {
    const { room, ann, bob } = await annAndBob(s, { reconnectionDelay: 200, reconnectionDelayMax: 500 });
    const firstId = ann.id;
    const left = next(bob, "presence", (p) => !p.members.includes("ann"));
    s.gatewayA.kill("SIGSTOP");
    assert.deepEqual((await left).members, ["bob"], "announced gone while it was silent");
    const reason = once(ann, "disconnect");
    const back = once(ann, "connect");
    s.gatewayA.kill("SIGCONT");
    // The workers forgot ann's socket: the gateway ends it rather than serve
    // a socket no service knows, with a transport close, so the client comes back.
    assert.equal(await reason, "transport close");
    await back;
    assert.notEqual(sidPrefix(ann.id), sidPrefix(firstId), "sids of the gateway's return take a new prefix");
    await ack(ann, "nick", "ann");
    const joined = next(bob, "presence", (p) => p.members.includes("ann"));
    assert.deepEqual((await ack(ann, "join", room)).members, ["ann", "bob"], "not refused as a socket that is gone");
    assert.deepEqual((await joined).members, ["ann", "bob"]);
  } finally {
    s.stop();
  }
});

test("chat worker restarted: users still connected stay in the rooms' lists, and one who left while no chat worker ran leaves them", async () => {
  // A DISCONNECT waits at the broker for a chat worker at most a second.
  const s = await chatStack(30000, ["--request-timeout", "1000"]);
  try {
    const { room, ann, bob } = await annAndBob(s);
    s.chat.kill("SIGKILL");
    await s.chat.exited;
    bob.close();  // its DISCONNECT expires at the broker: no chat worker to take it
    await new Promise((r) => setTimeout(r, 1500));
    const left = next(ann, "presence", (p) => p.room === room);
    s.startChat();
    // The new worker checks each socket its database names with its
    // gateway: ann's is there, bob's is not. (It forgot them all before,
    // and ann was missing from the room's list until she joined again.)
    assert.deepEqual((await left).members, ["ann"]);
    const checked = async () => {
      const text = await fetch(`${s.chatUrl}/metrics`).then((r) => r.text(), () => "");
      const found = (what) => Number(text.match(new RegExp(`sidecast_chat_sockets_checked_total\\{found="${what}"\\} (\\S+)`))?.[1]);
      return found("present") === 1 && found("gone") === 1;
    };
    assert.ok(await until(checked), "the worker checked ann's socket (present) and bob's (gone)");
    const carol = await connect(s.urlB + "/chat", { reconnection: false });
    await ack(carol, "nick", "carol");
    assert.deepEqual((await ack(carol, "join", room)).members, ["ann", "carol"]);
  } finally {
    s.stop();
  }
});

function once(socket, event) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no ${event}`)), 15000);
    socket.once(event, (x) => { clearTimeout(t); resolve(x); });
  });
}
