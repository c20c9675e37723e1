// Socket.IO connection-state recovery (socket.io 4.6+) with the stock client:
// the transport drops in the middle of a VM launch; after the reconnect the
// client has every vm_progress and the vm_response, in order, exactly once.
// Run under tests/e2e/stack (its worker serves vm with 1 s launches).
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { io } from "socket.io-client";

const url = process.env.SIDECAST_URL;
const sockets = [];
after(() => sockets.forEach((s) => s.close()));

function until(check, ms = 10000) {
  return new Promise((resolve, reject) => {
    const end = Date.now() + ms;
    const t = setInterval(() => {
      if (check()) { clearInterval(t); resolve(); } else if (Date.now() > end) { clearInterval(t); reject(new Error("timed out")); }
    }, 10);
  });
}

async function replayEvents() {
  const text = await (await fetch(`${url}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith("sidecast_gateway_replay_events"));
  assert.ok(line, "the gateway exports sidecast_gateway_replay_events");
  return Number(line.split(" ").at(-1));
}

// Runs first: the sockets of later tests would still hold events.
test("events the client has surely seen are not kept for replay", async () => {
  const s = io(`${url}/vm`, { transports: ["websocket"], reconnection: false });
  sockets.push(s);
  const seen = [];
  s.on("vm_progress", (p) => seen.push(p));
  s.on("vm_response", (r) => seen.push(r));
  await until(() => s.connected);
  await s.timeout(5000).emitWithAck("open_vm", { count: 1, name: "t" });
  await until(() => seen.length === 12);  // 11 steps and the response
  // The stack pings every 300 ms: two pings later every event is confirmed.
  await new Promise((r) => setTimeout(r, 1000));
  assert.equal(await replayEvents(), 0, "a pong confirmed them all");
  s.close();
});

for (const transports of [["websocket"], ["polling"]]) {
  test(`a dropped ${transports[0]} transport mid-launch loses nothing`, async () => {
    const s = io(`${url}/vm`, { transports, reconnectionDelay: 300, reconnectionDelayMax: 300 });
    sockets.push(s);
    const progress = [], responses = [], offsets = [];
    s.on("vm_progress", (p, offset) => { progress.push(p); offsets.push(offset); });
    s.on("vm_response", (r) => responses.push(r));
    await until(() => s.connected);
    const firstId = s.id;
    const { task_id } = await s.timeout(5000).emitWithAck("open_vm", { count: 2, name: "r" });
    await until(() => progress.length >= 4);
    s.io.engine.close();  // the transport drops; the client reconnects by itself
    await until(() => !s.connected, 5000);
    await until(() => s.connected && responses.length === 1, 15000);
    assert.equal(s.recovered, true, "the client was told it recovered");
    assert.equal(s.id, firstId, "same sid");
    const mine = progress.filter((p) => p.task_id === task_id);
    for (const vm of ["r-1", "r-2"]) {
      const percents = mine.filter((p) => p.vm === vm).map((p) => p.percent);
      assert.deepEqual(percents, [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100], `every step of ${vm}, once, in order`);
    }
    assert.equal(responses[0].task_id, task_id);
    assert.ok(offsets.every((o) => typeof o === "string"), "each event carries its offset");
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(responses.length, 1, "the response exactly once");
    s.close();
  });
}

test("an unknown pid gets a fresh session, not an error", async () => {
  const s = io(`${url}/vm`, { transports: ["websocket"], auth: { pid: "gw-nope.x", offset: "1" }, reconnection: false });
  sockets.push(s);
  await until(() => s.connected, 5000);
  assert.equal(s.recovered, false);
  s.close();
});

test("namespaces without recovery send no offsets", async () => {
  const s = io(url, { transports: ["websocket"], reconnection: false });
  sockets.push(s);
  await until(() => s.connected, 5000);
  const args = await new Promise((resolve) => {
    s.once("said", (...a) => resolve(a));
    s.emit("join", "plain", () => s.emit("say", { room: "plain", text: "x" }));
  });
  assert.equal(args.length, 1);
  s.close();
});
