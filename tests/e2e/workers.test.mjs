// The chat and vm workers through a real gateway with the stock
// socket.io-client. Run under tests/e2e/stack (SIDECAST_URL, SIDECAST_BIN,
// SIDECAST_BROKER, SIDECAST_PUBLISH). The stack's worker serves vm; this
// file starts (and restarts) its own chat worker on a temporary database.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { io } from "socket.io-client";

const url = process.env.SIDECAST_URL;
const dir = mkdtempSync(join(tmpdir(), "sidecast-chat-"));
const db = join(dir, "chat.db");
let chatWorker;

function startChat() {
  chatWorker = spawn(`${process.env.SIDECAST_BIN}/sidecast-worker`,
    ["--service", "chat", "--chat-db", db, "--chat-keep", "28", "--broker", process.env.SIDECAST_BROKER,
     "--publish", process.env.SIDECAST_PUBLISH, "--log-level", "warn"], { stdio: "inherit" });
}
function stopChat() {
  return new Promise((resolve) => { chatWorker.once("exit", resolve); chatWorker.kill("SIGKILL"); });
}

before(() => startChat());
after(async () => { await stopChat(); rmSync(dir, { recursive: true, force: true }); });

const sockets = [];
function connect(nsp) {
  const s = io(url + nsp, { transports: ["websocket"], forceNew: true, reconnection: false });
  sockets.push(s);
  return new Promise((resolve, reject) => {
    s.once("connect", () => resolve(s));
    s.once("connect_error", reject);
  });
}
after(() => sockets.forEach((s) => s.close()));

// Resolves with the next `event` payload that satisfies `pred`, or fails after `ms`.
function next(socket, event, pred = () => true, ms = 8000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { socket.off(event, on); reject(new Error(`no ${event} within ${ms} ms`)); }, ms);
    const on = (payload) => { if (pred(payload)) { clearTimeout(timer); socket.off(event, on); resolve(payload); } };
    socket.on(event, on);
  });
}
const ack = (socket, ...args) => socket.timeout(8000).emitWithAck(...args);

test("chat: history on join, presence, live messages", async () => {
  const room = "r" + Date.now();
  const a = await connect("/chat");
  await ack(a, "nick", "ann");
  const history = next(a, "history");
  const joined = await ack(a, "join", room);
  assert.deepEqual(joined.members, ["ann"]);
  assert.deepEqual((await history).messages, []);
  for (let i = 1; i <= 30; i++) await ack(a, "say", { room, text: `m${i}` });

  const b = await connect("/chat");
  await ack(b, "nick", "bob");
  const bHistory = next(b, "history");
  const presence = next(a, "presence", (p) => p.members.includes("bob"));
  await ack(b, "join", room);
  const h = await bHistory;
  assert.equal(h.messages.length, 25, "the last 25");
  assert.deepEqual(h.messages.map((m) => m.text), Array.from({ length: 25 }, (_, i) => `m${i + 6}`));
  assert.deepEqual((await presence).members, ["ann", "bob"]);

  const got = next(a, "message", (m) => m.text === "hello ann");
  const r = await ack(b, "say", { room, text: "hello ann" });
  const m = await got;
  assert.equal(m.id, r.id);
  assert.equal(m.nick, "bob");

  const left = next(a, "presence", (p) => !p.members.includes("bob"));
  b.close();
  assert.deepEqual((await left).members, ["ann"], "a disconnect updates presence");
});

// One chat worker serves /chat and /lobby (this file's stack routes both to
// it): a room of one name in each is two rooms, with their own members,
// history and messages, as Socket.IO's rooms are.
test("chat: a room is its namespace's", async () => {
  const room = "shared" + Date.now();
  const a = await connect("/chat");
  const heard = [];
  a.on("message", (m) => heard.push(m.text));
  await ack(a, "nick", "ann");
  await ack(a, "join", room);
  await ack(a, "say", { room, text: "in chat" });
  const b = await connect("/lobby");
  await ack(b, "nick", "bob");
  const bHistory = next(b, "history");
  const joined = await ack(b, "join", room);
  assert.deepEqual(joined.members, ["bob"], "/chat's member is not in /lobby's room");
  assert.deepEqual((await bHistory).messages, [], "/chat's message is not in /lobby's history");
  await ack(b, "say", { room, text: "in lobby" });
  const c = await connect("/chat");
  const cHistory = next(c, "history");
  const cJoined = await ack(c, "join", room);
  assert.deepEqual(cJoined.members.length, 2);
  assert.deepEqual((await cHistory).messages.map((m) => m.text), ["in chat"]);
  const after = next(a, "message", (m) => m.text === "after");
  await ack(c, "say", { room, text: "after" });
  await after;
  assert.ok(!heard.includes("in lobby"), "/chat heard /lobby's message");
});

// The rows the chat worker keeps for a room, read from its SQLite file.
function storedMessages(room) {
  const r = spawnSync("/usr/bin/python3", ["-c",
    "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute(" +
    "'SELECT COUNT(*) FROM messages WHERE room = ?', (sys.argv[2],)).fetchone()[0])", db, room]);
  assert.equal(r.status, 0, String(r.stderr));
  return Number(String(r.stdout).trim());
}

test("chat: a room keeps its newest --chat-keep messages", async () => {
  const room = "kept" + Date.now();
  const a = await connect("/chat");
  await ack(a, "join", room);
  for (let i = 1; i <= 40; i++) await ack(a, "say", { room, text: `k${i}` });
  assert.equal(storedMessages(room), 28, "this worker runs with --chat-keep 28");
  const b = await connect("/chat");
  const h = next(b, "history");
  await ack(b, "join", room);
  assert.deepEqual((await h).messages.map((m) => m.text), Array.from({ length: 25 }, (_, i) => `k${i + 16}`));
});

test("chat: history survives a chat worker restart", async () => {
  const room = "persist" + Date.now();
  const a = await connect("/chat");
  await ack(a, "join", room);
  await ack(a, "say", { room, text: "before restart" });
  await stopChat();
  startChat();
  const b = await connect("/chat");  // waits in the broker until the new worker registers
  const h = next(b, "history");
  await ack(b, "join", room);
  assert.deepEqual((await h).messages.map((m) => m.text), ["before restart"]);
});

test("chat: bad input is refused, not fatal", async () => {
  const a = await connect("/chat");
  assert.equal((await ack(a, "nick", "")).error, "bad_request");
  assert.equal((await ack(a, "say", { room: "x" })).error, "bad_request");
  assert.equal((await ack(a, "say", { room: "x".repeat(65), text: "hi" })).error, "bad_request");
  assert.equal((await ack(a, "join", "x".repeat(65))).error, "bad_request");
  assert.equal((await ack(a, "nick", "fine")).nick, "fine");
  // The limits count characters, as the clients are told, not UTF-8 bytes.
  assert.equal((await ack(a, "nick", "ж".repeat(32))).nick, "ж".repeat(32));
  assert.equal((await ack(a, "nick", "ж".repeat(33))).error, "bad_request");
});

// Records a socket's vm events from now on. Progress may arrive before the
// open_vm ack's promise settles, so nothing is filtered until the id is known.
function collect(socket) {
  const progress = [], responses = [];
  socket.on("vm_progress", (p) => progress.push(p));
  socket.on("vm_response", (r) => responses.push(r));
  return {
    progress: (id) => progress.filter((p) => p.task_id === id),
    done: async (id) => {
      const until = Date.now() + 15000;
      while (Date.now() < until) {
        const r = responses.find((x) => x.task_id === id);
        if (r) return r;
        await new Promise((res) => setTimeout(res, 20));
      }
      throw new Error("no vm_response for " + id);
    },
  };
}

const order = ["queued", "provisioning", "booting", "running"];

test("vm: progress in order, result to the same sid", async () => {
  const v = await connect("/vm");
  const events = collect(v);
  const { task_id: id } = await ack(v, "open_vm", { count: 2, name: "web" });
  const result = await events.done(id);
  const progress = events.progress(id);
  assert.equal(result.data.length, 2);
  assert.deepEqual(result.data.map((d) => d.state), ["running", "running"]);
  for (const name of ["web-1", "web-2"]) {
    const mine = progress.filter((p) => p.vm === name);
    assert.ok(mine.length >= 4, "several progress events per VM");
    for (let i = 1; i < mine.length; i++) {
      assert.ok(mine[i].percent >= mine[i - 1].percent, "percent never goes down");
      assert.ok(order.indexOf(mine[i].state) >= order.indexOf(mine[i - 1].state), "states advance");
    }
    assert.equal(mine[0].state, "queued");
    assert.equal(mine.at(-1).state, "running");
    assert.equal(mine.at(-1).percent, 100);
  }
});

test("vm: cancel stops the launch and says so", async () => {
  const v = await connect("/vm");
  const events = collect(v);
  const { task_id: id } = await ack(v, "open_vm", { count: 1, name: "c" });
  await next(v, "vm_progress", (p) => p.task_id === id && p.percent >= 10);
  assert.deepEqual(await ack(v, "cancel_vm", { task_id: id }), { task_id: id, cancelled: true });
  const r = await events.done(id);
  assert.equal(r.cancelled, true);
  assert.equal(r.data[0].state, "cancelled");
});

test("vm: someone else's task cannot be cancelled", async () => {
  const owner = await connect("/vm"), other = await connect("/vm");
  const events = collect(owner);
  const { task_id: id } = await ack(owner, "open_vm", { count: 1, name: "x" });
  assert.equal((await ack(other, "cancel_vm", { task_id: id })).cancelled, false);
  assert.equal((await events.done(id)).cancelled, false);
});

test("vm: two clients launch at once, each gets only its own results", async () => {
  const a = await connect("/vm"), b = await connect("/vm");
  const seen = { a: [], b: [] };
  a.on("vm_response", (r) => seen.a.push(r.task_id));
  b.on("vm_response", (r) => seen.b.push(r.task_id));
  const pa = [], pb = [];
  a.on("vm_progress", (p) => pa.push(p));
  b.on("vm_progress", (p) => pb.push(p));
  const ra = collect(a), rb = collect(b);
  const [{ task_id: ida }, { task_id: idb }] = await Promise.all([
    ack(a, "open_vm", { count: 1, name: "a" }), ack(b, "open_vm", { count: 1, name: "b" })]);
  await Promise.all([ra.done(ida), rb.done(idb)]);
  assert.deepEqual(seen.a, [ida]);
  assert.deepEqual(seen.b, [idb]);
  assert.ok(pa.length > 0 && pa.every((p) => p.task_id === ida && p.vm === "a-1"));
  assert.ok(pb.length > 0 && pb.every((p) => p.task_id === idb && p.vm === "b-1"));
});

test("vm: a second vm worker process shares the load", async () => {
  const second = spawn(`${process.env.SIDECAST_BIN}/sidecast-worker`,
    ["--service", "vm", "--id", "vm-second", "--vm-launch-ms", "1000", "--vm-failure-rate", "0",
     "--broker", process.env.SIDECAST_BROKER, "--publish", process.env.SIDECAST_PUBLISH, "--log-level", "warn"],
    { stdio: "inherit" });
  try {
    const v = await connect("/vm");
    const events = collect(v);
    const workers = new Set();
    // Launches until both workers have served one (LRU alternates them once
    // the second has registered); bounded.
    for (let i = 0; i < 20 && workers.size < 2; i++) {
      const ids = await Promise.all([1, 2].map(() => ack(v, "open_vm", { count: 1, name: "s" })));
      for (const { task_id } of ids) workers.add((await events.done(task_id)).worker);
    }
    assert.equal(workers.size, 2, [...workers].join(", "));
    assert.ok(workers.has("vm-second"));
  } finally {
    await new Promise((resolve) => { second.once("exit", resolve); second.kill("SIGTERM"); });
  }
});

test("vm: bad requests are refused with an error ack", async () => {
  const v = await connect("/vm");
  assert.equal((await ack(v, "open_vm", { count: 0 })).error, "bad_request");
  assert.equal((await ack(v, "open_vm", { count: 1000 })).error, "bad_request");
});
