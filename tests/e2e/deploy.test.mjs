// The scaled-out topology (deploy/local/up.sh): several gateways behind
// haproxy, two vm workers. Run under tests/e2e/topology; SIDECAST_BALANCER
// says which balancer up.sh was given (sid or roundrobin).
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { execFile, execFileSync } from "node:child_process";
import { promisify } from "node:util";
import { readFileSync } from "node:fs";
import { io } from "socket.io-client";

const url = process.env.SIDECAST_URL;
const runDir = process.env.SIDECAST_RUN_DIR;
const env = Object.fromEntries(readFileSync(`${runDir}/env`, "utf8").trim().split("\n").map((l) => l.split("=")));
const gateways = () => Object.fromEntries(readFileSync(`${runDir}/gateways`, "utf8").trim().split("\n")
  .map((l) => l.split(" ")).map(([id, port]) => [id, `http://127.0.0.1:${port}`]));
const roundRobin = process.env.SIDECAST_BALANCER === "roundrobin";
const run = promisify(execFile);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const transports = roundRobin ? ["polling"] : ["polling", "websocket"];

const sockets = [];
after(() => sockets.forEach((s) => s.close()));
function connect(nsp = "/", base = url) {
  const s = io(base + nsp, { transports, forceNew: true, reconnection: false });
  sockets.push(s);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("connect timeout")), 8000);
    s.once("connect", () => { clearTimeout(timer); resolve(s); });
    s.once("connect_error", (e) => { clearTimeout(timer); reject(e); });
  });
}
const owner = (s) => s.id.split(".")[0];
// A round-robin balancer counts requests, not clients: a client that makes a
// fixed number of requests per connection could always land on the same
// gateway. 0-2 extra requests at random break that lock-step.
async function shiftBalancer() {
  for (let n = Math.floor(Math.random() * 3); n > 0; n--) await fetch(`${url}/healthz`);
}
// Connects until there is one socket on each of two different gateways.
async function onTwoGateways(nsp) {
  const by = new Map();
  for (let i = 0; i < 30 && by.size < 2; i++) {
    const s = await connect(nsp);
    if (!by.has(owner(s))) by.set(owner(s), s);
    await shiftBalancer();
  }
  assert.equal(by.size, 2, "handshakes are spread over the gateways");
  return [...by.values()];
}
function next(socket, event, pred = () => true, ms = 8000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { socket.off(event, on); reject(new Error(`no ${event}`)); }, ms);
    const on = (p) => { if (pred(p)) { clearTimeout(timer); socket.off(event, on); resolve(p); } };
    socket.on(event, on);
  });
}
const ack = (s, ...args) => s.timeout(8000).emitWithAck(...args);
async function publish(base, body) {
  const res = await fetch(`${base}/api/v1/publish`, {
    method: "POST", headers: { Authorization: `Bearer ${env.API_KEY}` }, body: JSON.stringify(body) });
  assert.equal(res.status, 202, await res.text());
}

test("the balancer keeps /metrics from clients, however the path is written", async () => {
  // Each gateway still serves it on its own port (the private network).
  for (const path of ["/metrics", "/%6detrics", "/%6Detrics", "/metrics?x=1"]) {
    assert.equal((await fetch(`${url}${path}`)).status, 403, path);
  }
  const [direct] = Object.values(gateways());
  assert.equal((await fetch(`${direct}/metrics`)).status, 200);
});

test("two clients on different gateways share a room", async () => {
  const [a, b] = await onTwoGateways("/");
  const room = "x" + Date.now();
  await ack(a, "join", room);
  await ack(b, "join", room);
  const seen = [next(a, "said", (m) => m.text === "from b"), next(b, "said", (m) => m.text === "from a")];
  await ack(a, "say", { room, text: "from a" });
  await ack(b, "say", { room, text: "from b" });
  const [atA, atB] = await Promise.all(seen);
  assert.equal(atA.from, b.id);
  assert.equal(atB.from, a.id);
});

test("a broadcast to a namespace reaches clients on every gateway", async () => {
  const [a, b] = await onTwoGateways("/custom");
  const tag = "news-" + Date.now();
  const got = [next(a, "news", (m) => m.tag === tag), next(b, "news", (m) => m.tag === tag)];
  await publish(url, { nsp: "/custom", broadcast: true, event: "news", data: { tag } });
  await Promise.all(got);
});

test("the publish API on one gateway reaches a sid held by another", async () => {
  const [a] = await onTwoGateways("/");
  const other = Object.entries(gateways()).find(([id]) => id !== owner(a));
  const got = next(a, "direct", (m) => m.n === 42);
  await publish(other[1], { sid: a.id, event: "direct", data: { n: 42 } });
  await got;
});

// The sockets API: what a worker's Control does, from any backend over HTTP.
async function socketsApi(base, sid, action, body) {
  const res = await fetch(`${base}/api/v1/sockets/${sid}${action ? "/" + action : ""}`, {
    method: action ? "POST" : "GET", headers: { Authorization: `Bearer ${env.API_KEY}` },
    body: body === undefined ? undefined : JSON.stringify(body) });
  return { status: res.status, body: await res.json() };
}

test("the sockets API on any gateway moves a client held by one into and out of a room, and disconnects it", async () => {
  const [a] = await onTwoGateways("/");
  const sid = a.id;
  const all = Object.entries(gateways());
  const home = all.find(([id]) => id === owner(a))[1];
  const other = all.find(([id]) => id !== owner(a))[1];
  const ok = { status: 200, body: { ok: true } };
  // A room it stays in: events published to it after one to a room it
  // left (by the same gateway, so in order) show that one will not come.
  const stay = "stay" + Date.now();
  assert.deepEqual(await socketsApi(home, sid, "join", { room: stay }), ok);
  for (const [base, n] of [[home, 1], [other, 2]]) {  // the owner's own, then relayed through the broker
    const room = `ops${n}-${Date.now()}`;
    assert.deepEqual(await socketsApi(base, sid, "join", { room }), ok);
    assert.deepEqual(await socketsApi(base, sid), { status: 200, body: { sid, nsp: "/", rooms: [stay, room] } });
    // Answered once done: a publish right after reaches it.
    const got = next(a, "news", (m) => m.n === n);
    await publish(home, { room, event: "news", data: { n } });
    await got;
    assert.deepEqual(await socketsApi(base, sid, "leave", { room }), ok);
    const seen = [];
    const record = (m) => seen.push(m.n);
    a.on("news", record);
    const barrier = next(a, "news", (m) => m.n === 100 + n);
    await publish(home, { room, event: "news", data: { n: -n } });
    await publish(home, { room: stay, event: "news", data: { n: 100 + n } });
    await barrier;
    a.off("news", record);
    assert.deepEqual(seen, [100 + n], "an event for the room it left came");
  }
  const gone = new Promise((resolve) => a.once("disconnect", resolve));
  assert.deepEqual(await socketsApi(other, sid, "disconnect"), ok);
  assert.equal(await gone, "io server disconnect");
  // Then unknown, to its owner and through the other.
  for (const base of [home, other]) {
    let answer;
    for (let i = 0; i < 50; i++) {  // the owner forgets it as the socket closes
      answer = await socketsApi(base, sid, "join", { room: stay });
      if (answer.status === 404) break;
      await sleep(100);
    }
    assert.deepEqual(answer, { status: 404, body: { error: "unknown sid" } }, base);
  }
});

// The rooms API: a whole room, whichever gateways its members are on.
async function roomsApi(base, action, body) {
  const res = await fetch(`${base}/api/v1/rooms/${action}`, {
    method: "POST", headers: { Authorization: `Bearer ${env.API_KEY}` }, body: JSON.stringify(body) });
  return { status: res.status, body: await res.json() };
}

test("the rooms API moves, closes and disconnects a room whose members are on two gateways", async () => {
  const [a, b] = await onTwoGateways("/");
  const room = "g" + Date.now(), next_room = "h" + Date.now();
  await ack(a, "join", room);
  await ack(b, "join", room);
  const accepted = { status: 202, body: { ok: true } };
  // Each socket's rooms, read through the sockets API (relayed to its owner).
  const roomsBecome = async (rooms) => {
    let got;
    for (let i = 0; i < 50; i++) {
      got = await Promise.all([a, b].map(async (s) => (await socketsApi(url, s.id)).body.rooms));
      if (got.every((r) => JSON.stringify(r) === JSON.stringify(rooms))) return;
      await sleep(100);
    }
    assert.deepEqual(got, [rooms, rooms]);
  };
  assert.deepEqual(await roomsApi(url, "join", { room, join: next_room }), accepted);
  await roomsBecome([room, next_room]);
  const got = [next(a, "news", (m) => m.n === 1), next(b, "news", (m) => m.n === 1)];
  await publish(url, { room: next_room, event: "news", data: { n: 1 } });
  await Promise.all(got);
  assert.deepEqual(await roomsApi(url, "leave", { room }), accepted);  // close it
  await roomsBecome([next_room]);
  const gone = [a, b].map((s) => new Promise((resolve) => s.once("disconnect", resolve)));
  assert.deepEqual(await roomsApi(url, "disconnect", { room: next_room }), accepted);
  assert.deepEqual(await Promise.all(gone), ["io server disconnect", "io server disconnect"]);
});

// The plain HTTP API: a session lives on one gateway, its key in the path.
async function api(base, method, path, body, signal) {
  const res = await fetch(`${base}/api/v1/sessions${path}`, {
    method, body: body === undefined ? undefined : JSON.stringify(body), signal });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}

test("an HTTP API session is served whichever gateway a request reaches", async () => {
  const [[homeId, home], [, other]] = Object.entries(gateways());
  const opened = await api(home, "POST", "", { nsp: "/" });
  assert.equal(opened.status, 201, JSON.stringify(opened.body));
  // The path takes the session's key, which names its gateway; the socket's
  // sid (what workers see) opens nothing.
  const sid = opened.body.session;
  assert.equal(sid.split(".")[0], homeId);
  assert.notEqual(sid, opened.body.sid);
  assert.deepEqual(await api(other, "GET", `/${opened.body.sid}/events?timeout=0`),
                   { status: 404, body: { error: "unknown session" } });
  // The other gateway relays to the owner; the balancer routes by the path
  // (or, round-robin, reaches either).
  for (const base of [other, url, url, url]) {
    const echoed = await api(base, "POST", `/${sid}/emit`, { event: "echo", data: { via: base }, ack: true });
    assert.deepEqual(echoed, { status: 200, body: { data: { via: base } } });
  }
  const room = "api" + Date.now();
  assert.equal((await api(other, "POST", `/${sid}/emit`, { event: "join", data: room, ack: true })).status, 200);
  await publish(url, { room, event: "news", data: { n: 1 } });
  const polled = await api(other, "GET", `/${sid}/events?timeout=5000`);
  assert.equal(polled.status, 200);
  assert.deepEqual(polled.body.events.map((e) => [e.event, e.data]), [["news", { n: 1 }]]);
  // A relayed poll whose client leaves takes no events with it.
  const gone = new AbortController();
  const abandoned = api(other, "GET", `/${sid}/events?timeout=20000`, undefined, gone.signal).catch(() => null);
  await new Promise((r) => setTimeout(r, 300));
  gone.abort();
  await abandoned;
  await new Promise((r) => setTimeout(r, 300));
  await publish(url, { room, event: "news", data: { n: 2 } });
  const kept = await api(home, "GET", `/${sid}/events?timeout=5000`);
  assert.deepEqual(kept.body.events.map((e) => [e.event, e.data]), [["news", { n: 2 }]]);
  // A 405 names the method the action takes (Allow), relayed from the owner
  // (GET on emit) or answered by the gateway asked (PUT, which it never relays).
  for (const [base, method, path, allow] of [[other, "GET", `/${sid}/emit`, "POST"], [other, "PUT", `/${sid}`, "DELETE"],
                                             [home, "POST", `/${sid}/events`, "GET"]]) {
    const res = await fetch(`${base}/api/v1/sessions${path}`, { method });
    assert.deepEqual([res.status, res.headers.get("allow"), await res.json()],
                     [405, allow, { error: "no such action for this method" }], `${method} ${path} at ${base}`);
  }
  assert.equal((await api(other, "DELETE", `/${sid}`)).status, 204);
  assert.deepEqual(await api(home, "GET", `/${sid}/events?timeout=0`), { status: 404, body: { error: "unknown session" } });
  const stranger = await api(other, "GET", `/${homeId}.nosuchsession/events?timeout=0`);
  assert.deepEqual(stranger, { status: 404, body: { error: "unknown session" } });
  const noGateway = await api(other, "GET", `/gw99.nosuchsession/events?timeout=0`);
  assert.deepEqual(noGateway, { status: 404, body: { error: "unknown session" } });
});

test("open_vm: served by either vm worker, progress and result to the asking client only", async () => {
  const [a, b] = await onTwoGateways("/vm");
  const leaked = [];
  b.on("vm_progress", (p) => leaked.push(p));
  b.on("vm_response", (r) => leaked.push(r));
  const progress = [];
  a.on("vm_progress", (p) => progress.push(p));
  const response = next(a, "vm_response");
  const { task_id } = await ack(a, "open_vm", { count: 2, name: "s" });
  const r = await response;
  assert.equal(r.task_id, task_id);
  assert.match(r.worker, /^vm\d+$/);
  assert.ok(progress.filter((p) => p.task_id === task_id).length >= 8);
  assert.deepEqual(leaked, []);
});

test("every request succeeds and events flow both ways", async () => {
  const [a, b] = await onTwoGateways("/");
  const room = "busy" + Date.now();
  await ack(a, "join", room);
  await ack(b, "join", room);
  for (let i = 0; i < 30; i++) {
    assert.equal(await ack(i % 2 ? a : b, "echo", i), i);
    const got = next(i % 2 ? b : a, "said", (m) => m.text === `t${i}`);
    await ack(i % 2 ? a : b, "say", { room, text: `t${i}` });
    await got;
  }
  assert.ok(a.connected && b.connected);
});

test("scaling out while traffic flows: a third gateway and a third vm worker take load", async () => {
  const busy = await connect("/");
  let failures = 0, done = false, sent = 0;
  const loop = (async () => {
    for (let i = 0; !done && i < 2000; i++, sent++) {
      try { if (await ack(busy, "echo", i) !== i) failures++; } catch { failures++; }
      await new Promise((r) => setTimeout(r, 2));  // steady traffic, well under the event rate limit
    }
  })();
  execFileSync(`${process.env.SIDECAST_DEPLOY}/add.sh`, ["gateway", "--run-dir", runDir]);
  execFileSync(`${process.env.SIDECAST_DEPLOY}/add.sh`, ["vm", "--run-dir", runDir]);
  const owners = new Set();
  for (let i = 0; i < 30 && !owners.has("gw3"); i++) {
    owners.add(owner(await connect("/")));
    await shiftBalancer();
  }
  assert.ok(owners.has("gw3"), "new handshakes reach the new gateway: " + [...owners]);
  const v = await connect("/vm");
  const workers = new Set();
  for (let i = 0; i < 10 && !workers.has("vm3"); i++) {
    const responses = [];
    v.on("vm_response", (r) => responses.push(r));
    const ids = await Promise.all([1, 2, 3].map(() => ack(v, "open_vm", { count: 1, name: "n" })));
    await new Promise((resolve) => { const t = setInterval(() => { if (responses.length >= ids.length) { clearInterval(t); resolve(); } }, 20); });
    responses.forEach((r) => workers.add(r.worker));
    v.off("vm_response");
  }
  assert.ok(workers.has("vm3"), "the new vm worker takes tasks: " + [...workers]);
  done = true;
  await loop;
  assert.ok(sent > 0);
  assert.equal(failures, 0, "no request failed while the tiers grew");
});

test("scaling in: a vm worker removed mid-launch finishes it, a removed gateway's clients reconnect elsewhere", async () => {
  // Not execFileSync: the clients must go on meanwhile (a draining gateway
  // waits for their WebSocket close handshakes).
  const remove = async (name) => (await run(`${process.env.SIDECAST_DEPLOY}/remove.sh`,
    [name, "--run-dir", runDir])).stdout.trim();
  // Six launches over the three vm workers (the broker hands them out in
  // turn): vm1 holds some when it is told to go.
  const v = await connect("/vm");
  const responses = new Map();
  v.on("vm_response", (r) => responses.set(r.task_id, r));
  const started = new Set();
  v.on("vm_progress", (p) => started.add(p.task_id));
  const ids = (await Promise.all([...Array(6)].map(() => ack(v, "open_vm", { count: 1, name: "r" }))))
    .map((a) => a.task_id);
  for (let i = 0; i < 100 && !ids.every((id) => started.has(id)); i++) await sleep(10);
  assert.equal(await remove("vm1"), "vm1: drained");
  for (let i = 0; i < 100 && responses.size < ids.length; i++) await sleep(50);
  const got = ids.map((id) => responses.get(id));
  assert.ok(got.every(Boolean), "every launch got its result");
  assert.ok(got.some((r) => r.worker === "vm1"), "vm1 held a launch: " + got.map((r) => r.worker));
  for (const r of got) assert.deepEqual([r.cancelled, r.data[0].state], [false, "running"], JSON.stringify(r));
  const later = await ack(v, "open_vm", { count: 1, name: "later" });
  const last = await next(v, "vm_response", (r) => r.task_id === later.task_id);
  assert.notEqual(last.worker, "vm1", "a removed worker took new work");

  // A client of the gateway that goes comes back, through the balancer, on another.
  const s = io(url + "/", { transports, forceNew: true, reconnectionDelay: 100, reconnectionDelayMax: 500 });
  sockets.push(s);
  await new Promise((resolve) => s.once("connect", resolve));
  const first = owner(s);
  const reconnected = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("no reconnect")), 15000);
    s.once("disconnect", () => s.once("connect", () => { clearTimeout(timer); resolve(); }));
  });
  assert.equal(await remove(first), `${first}: drained`);
  await reconnected;
  assert.notEqual(owner(s), first);
  assert.equal(await ack(s, "echo", "still here"), "still here");
  assert.ok(!Object.keys(gateways()).includes(first), "the removed gateway is still listed");
});

test("with a balancer that ignores the sid, gateways relayed foreign sids", { skip: !roundRobin }, async () => {
  let forwarded = 0;
  for (const base of Object.values(gateways())) {
    const text = await (await fetch(`${base}/metrics`)).text();
    const m = text.match(/^sidecast_gateway_forwarded_total (\d+)/m);
    forwarded += m ? Number(m[1]) : 0;
  }
  assert.ok(forwarded > 0, "polling requests reached gateways that do not own their sid");
});

// Last: it leaves the topology on the backup broker. up.sh --pair started
// the brokers as a primary/backup pair; every gateway and worker knows both.
test("a broker pair: the primary killed, gateways and workers move to the backup, clients are served on", { skip: env.PAIR !== "1" }, async () => {
  const [a, b] = await onTwoGateways("/");
  for (const s of [a, b]) assert.equal(await ack(s, "join", "pair-room"), "pair-room");
  const backup = async () => (await (await fetch(`http://${env.BACKUP_HTTP}/status`)).json()).pair;
  assert.equal((await backup()).state, "passive", "the backup heard the primary active");
  const line = readFileSync(`${runDir}/pids`, "utf8").split("\n").find((l) => l.startsWith("broker "));
  process.kill(Number(line.split(" ")[1]), "SIGKILL");
  const echoes = (s, v) => s.timeout(2000).emitWithAck("echo", v).then((r) => r === v, () => false);
  for (const s of [a, b]) {
    let ok = false;
    for (let i = 0; i < 40 && !(ok = await echoes(s, "after")); i++) await sleep(250);
    assert.ok(ok, `${owner(s)} serves through the backup`);
  }
  // A room across the two gateways, through the backup's XSUB and XPUB.
  const heard = [];
  b.on("said", (m) => heard.push(m.text));
  for (let i = 0; i < 50 && !heard.includes("after failover"); i++) {
    a.emit("say", { room: "pair-room", text: "after failover" });
    await sleep(100);
  }
  assert.ok(heard.includes("after failover"), "a room event crossed the gateways through the backup");
  assert.ok(a.connected && b.connected, "no client was disconnected");
  assert.equal((await backup()).state, "active");
});
