// The app contract (docs/services.md, "demo"), checked from the
// outside with the stock socket.io-client against any server: Sidecast or
// the reference peer in bench/peers/node. Knows nothing about the server
// but its URL.
//
//   SIDECAST_URL=http://127.0.0.1:8080 SIDECAST_TRANSPORTS=polling|websocket|default \
//     node --test tests/e2e/socketio_client.test.mjs
//
// Every wait is bounded (WAIT_MS, and a per-test timeout behind it): a test
// fails, it never hangs. Absence ("X is not delivered") is checked against a
// later event that the contract orders after it, never against a sleep.
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Manager } from "socket.io-client";

const base = (process.env.SIDECAST_URL ?? "http://127.0.0.1:8080").replace(/\/+$/, "");
const mode = process.env.SIDECAST_TRANSPORTS ?? "default";
const transportsByMode = {
  polling: ["polling"],
  websocket: ["websocket"],
  default: ["polling", "websocket"],
};
const transports = transportsByMode[mode];
if (!transports) throw new Error(`SIDECAST_TRANSPORTS must be polling, websocket or default, not ${mode}`);

const WAIT_MS = 5000;
const TEST_MS = 15000;
const unique = (prefix) => `${prefix}-${process.pid}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;

// ---------------------------------------------------------------- helpers

// A Manager (one Engine.IO connection) closed when the test ends, whatever
// happens in it.
function manager(t, options = {}) {
  const m = new Manager(base, { transports, reconnection: false, timeout: WAIT_MS, ...options });
  t.after(() => {
    m.reconnection(false);
    for (const socket of Object.values(m.nsps)) socket.disconnect();
    m.engine?.close();
  });
  return m;
}

// Resolves when `emitter` emits `event` (with its arguments as an array),
// fails on any event in `failOn` or after `ms`.
function once(emitter, event, { ms = WAIT_MS, failOn = [] } = {}) {
  return new Promise((resolve, reject) => {
    const off = () => {
      clearTimeout(timer);
      emitter.off(event, onEvent);
      for (const bad of failOn) emitter.off(bad, onFail[bad]);
    };
    const timer = setTimeout(() => { off(); reject(new Error(`no ${event} within ${ms} ms`)); }, ms);
    const onEvent = (...args) => { off(); resolve(args); };
    const onFail = {};
    for (const bad of failOn) {
      onFail[bad] = (...args) => {
        off();
        const detail = args[0] instanceof Error ? args[0].message : JSON.stringify(args);
        reject(new Error(`${bad} (${detail}) while waiting for ${event}`));
      };
      emitter.on(bad, onFail[bad]);
    }
    emitter.on(event, onEvent);
  });
}

// A namespace socket on `m`, connected.
async function connect(m, nsp = "/", options = {}) {
  const socket = m.socket(nsp, options);
  if (!socket.connected) await once(socket, "connect", { failOn: ["connect_error"] });
  assert.equal(socket.connected, true);
  return socket;
}
const open = (t, nsp = "/", options = {}) => connect(manager(t), nsp, options);

// Emits with an ack; resolves with every argument of the ack, as an array.
function call(socket, event, ...args) {
  return new Promise((resolve, reject) => {
    socket.timeout(WAIT_MS).emit(event, ...args, (err, ...reply) => {
      if (err) reject(new Error(`no ack for ${event} within ${WAIT_MS} ms`));
      else resolve(reply);
    });
  });
}

// Everything `socket` receives as `event` (`seen`), and `until(n)`, which
// resolves with a copy of `seen` once it holds n entries.
function record(socket, event) {
  const seen = [];
  const waiters = [];
  socket.on(event, (...args) => {
    seen.push(args.length === 1 ? args[0] : args);
    for (const w of waiters.filter((w) => seen.length >= w.count)) {
      waiters.splice(waiters.indexOf(w), 1);
      w.resolve();
    }
  });
  const until = (count, ms = WAIT_MS) => new Promise((resolve, reject) => {
    if (seen.length >= count) return resolve([...seen]);
    const timer = setTimeout(() => reject(new Error(`${event}: ${seen.length} of ${count} within ${ms} ms: ${JSON.stringify(seen)}`)), ms);
    waiters.push({ count, resolve: () => { clearTimeout(timer); resolve([...seen]); } });
  });
  return { seen, until };
}

// Buffers, ArrayBuffers and typed arrays all become Buffers, so that a
// binary compares equal whatever type the client decoded it to.
function normalize(value) {
  if (Buffer.isBuffer(value)) return Buffer.from(value);
  if (value instanceof ArrayBuffer) return Buffer.from(value);
  if (ArrayBuffer.isView(value)) return Buffer.from(value.buffer, value.byteOffset, value.byteLength);
  if (Array.isArray(value)) return value.map(normalize);
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, normalize(v)]));
  }
  return value;
}
const bytes = (n, seed = 0) => Buffer.from(Array.from({ length: n }, (_, i) => (i * 31 + seed) & 0xff));

// ---------------------------------------------------------------- connect

describe("connect", () => {
  for (const nsp of ["/", "/custom"]) {
    test(`connects to ${nsp}`, { timeout: TEST_MS }, async (t) => {
      const s = await open(t, nsp);
      assert.equal(typeof s.id, "string");
      assert.ok(s.id.length > 0);
      const [who] = await call(s, "whoami");
      assert.equal(who.nsp, nsp);
    });
  }

  test("the Socket.IO sid is not the Engine.IO sid; each namespace has its own", { timeout: TEST_MS }, async (t) => {
    const m = manager(t);
    const root = await connect(m, "/");
    const custom = await connect(m, "/custom");
    const engineId = m.engine.id;
    assert.equal(typeof engineId, "string");
    assert.notEqual(root.id, engineId);
    assert.notEqual(custom.id, engineId);
    assert.notEqual(root.id, custom.id);
    assert.equal(root.io, custom.io, "both namespaces ride one Manager");
    assert.equal((await call(root, "whoami"))[0].sid, root.id);
    assert.equal((await call(custom, "whoami"))[0].sid, custom.id);
  });

  test("whoami without auth answers {sid, nsp, auth: {}}", { timeout: TEST_MS }, async (t) => {
    const s = await open(t, "/");
    assert.deepEqual(await call(s, "whoami"), [{ sid: s.id, nsp: "/", auth: {} }]);
  });

  test("whoami returns the CONNECT auth payload, per namespace", { timeout: TEST_MS }, async (t) => {
    const m = manager(t);
    const rootAuth = { token: "t0k\u00e9n \u{1F511}", user: { id: 42, roles: ["a", "b"] }, flag: true, none: null };
    const customAuth = { token: "other", line: "x\u2028y" };
    const root = await connect(m, "/", { auth: rootAuth });
    const custom = await connect(m, "/custom", { auth: customAuth });
    assert.deepEqual(await call(root, "whoami"), [{ sid: root.id, nsp: "/", auth: rootAuth }]);
    assert.deepEqual(await call(custom, "whoami"), [{ sid: custom.id, nsp: "/custom", auth: customAuth }]);
  });

  test("/forbidden is refused with connect_error \"forbidden\"; the connection's other namespaces are unaffected", { timeout: TEST_MS }, async (t) => {
    const m = manager(t);
    const root = await connect(m, "/");
    const refused = m.socket("/forbidden");
    const [err] = await once(refused, "connect_error", { failOn: ["connect"] });
    assert.equal(err.message, "forbidden");
    assert.equal(refused.connected, false);
    assert.equal(refused.active, false, "a refusal by the server is final: no retry");
    assert.equal(root.connected, true);
    assert.deepEqual(await call(root, "echo", "still here"), ["still here"]);
  });

  test("a namespace with no route is refused with connect_error \"Invalid namespace\"", { timeout: TEST_MS }, async (t) => {
    const refused = manager(t).socket("/nope");
    const [err] = await once(refused, "connect_error", { failOn: ["connect"] });
    assert.equal(err.message, "Invalid namespace");
    assert.equal(refused.connected, false);
  });

  test("nothing is emitted on connect; unknown events are ignored", { timeout: TEST_MS }, async (t) => {
    const m = manager(t);
    const s = m.socket("/");
    const received = [];
    s.onAny((event, ...args) => received.push([event, ...args]));
    await once(s, "connect", { failOn: ["connect_error"] });
    let unknownAcked = false;
    s.emit("no-such-event", 1, "two");
    s.emit("no-such-event-with-ack", { x: 1 }, () => { unknownAcked = true; });
    // Acks leave in the order the events arrived: had the unknown event been
    // acked, that ack would be here before the echo's.
    assert.deepEqual(await call(s, "echo", "after"), ["after"]);
    assert.equal(unknownAcked, false);
    assert.deepEqual(received, []);
    assert.equal(s.connected, true);
  });
});

// ---------------------------------------------------------------- echo

describe("echo", () => {
  const cases = [
    ["one string", ["hello"]],
    ["numbers", [0, 1, -1, 3.5, -2.25e-7, 1e21, Number.MAX_SAFE_INTEGER, -Number.MAX_SAFE_INTEGER]],
    ["true, false, null", [true, false, null]],
    ["empty string, array and object", ["", [], {}]],
    ["astral characters", ["\u{1F600}\u{1F680} \u{10348}\u{1D11E} \u{10FFFF}"]],
    ["line and paragraph separators", ["a\u2028b\u2029c", { "\u2028key": "\u2029value" }]],
    ["escapes and control characters", ["quote\" backslash\\ slash/ \b\f\n\r\t \u0000 \u001f \u007f", "</script>"]],
    ["mixed scripts", ["Gr\u00fc\u00dfe \u041f\u0440\u0438\u0432\u0435\u0442 \u3053\u3093\u306b\u3061\u306f \u0645\u0631\u062d\u0628\u0627 e\u0301"]],
    ["nested objects and arrays", [{ a: { b: { c: [1, { d: [null, "e", { f: "\u{1F4A9}" }] }] } }, list: [[[]]], n: -0.5 }]],
    ["many arguments of every type", ["s", 1, true, null, [1, "2", [3]], { k: "v" }, "\u2028", 2.5, false, {}]],
    ["a separator-looking string", ["\u001e2probe 42[\"x\"] 451-[{\"_placeholder\":true,\"num\":0}]"]],
    ["a 200 KB string", ["x\u00e9\u{1F600}".repeat(200 * 1024 / 7)]],
  ];

  let socket;
  let m;
  before(async () => {
    m = new Manager(base, { transports, reconnection: false, timeout: WAIT_MS });
    socket = await connect(m, "/");
  });
  after(() => { socket?.disconnect(); m?.engine?.close(); });

  for (const [name, args] of cases) {
    test(`echo: ${name}`, { timeout: TEST_MS }, async () => {
      assert.deepEqual(await call(socket, "echo", ...args), args);
    });
  }

  test("echo with no arguments: an empty ack", { timeout: TEST_MS }, async () => {
    assert.deepEqual(await call(socket, "echo"), []);
  });

  test("echo-bin: the same binaries come back in order, mixed with JSON", { timeout: TEST_MS }, async () => {
    const args = [
      bytes(16, 1),
      "text between",
      { nested: { blob: bytes(300, 2), n: 7 }, list: [bytes(3, 3), "\u{1F600}", bytes(5, 4)] },
      42,
      bytes(256, 5),
    ];
    const reply = await call(socket, "echo-bin", ...args);
    assert.deepEqual(normalize(reply), normalize(args));
    for (const [i, at] of [[0, reply[0]], [4, reply[4]], [2, reply[2].nested.blob]]) {
      assert.ok(Buffer.isBuffer(at) || at instanceof ArrayBuffer || ArrayBuffer.isView(at), `argument ${i} is binary`);
    }
  });

  test("echo-bin: empty, one-byte and 256 KB binaries", { timeout: TEST_MS }, async () => {
    const args = [Buffer.alloc(0), Buffer.from([0xff]), bytes(256 * 1024, 6)];
    assert.deepEqual(normalize(await call(socket, "echo-bin", ...args)), normalize(args));
  });

  test("echo-bin: ten attachments keep their order", { timeout: TEST_MS }, async () => {
    const args = Array.from({ length: 10 }, (_, i) => bytes(i + 1, i * 7));
    assert.deepEqual(normalize(await call(socket, "echo-bin", ...args)), normalize(args));
  });

  // Each attachment is a WebSocket message of its own, bounded by
  // --max-payload (1 MB) alone, as the reference server bounds each: two of
  // 600 KB in one emit closed the connection when their sum was bounded.
  test("echo-bin: attachments larger together than --max-payload", { timeout: TEST_MS, skip: mode !== "websocket" && "one POST carries them all over polling" }, async () => {
    const args = [bytes(600 * 1000, 8), bytes(600 * 1000, 9)];
    assert.deepEqual(normalize(await call(socket, "echo-bin", ...args)), normalize(args));
  });

  test("echo-bin: a binary as the only argument", { timeout: TEST_MS }, async () => {
    const args = [Buffer.from("\u{1F600} not text, bytes")];
    assert.deepEqual(normalize(await call(socket, "echo-bin", ...args)), normalize(args));
  });
});

// ---------------------------------------------------------------- call-me-back

describe("call-me-back", () => {
  // Answers each `callback` with `reply`, and remembers what it was called with.
  function answer(socket, reply) {
    const calls = [];
    socket.on("callback", (...args) => {
      const ack = args.pop();
      assert.equal(typeof ack, "function", "callback carries an ack id");
      calls.push(args);
      ack(...reply);
    });
    return calls;
  }

  test("the client's ack reply becomes the ack of the original event", { timeout: TEST_MS }, async (t) => {
    const s = await open(t, "/");
    const calls = answer(s, ["reply", { n: 2, s: "\u{1F600}" }, [1, 2]]);
    const sent = ["ask", 1, { deep: { x: ["\u2028"] } }];
    assert.deepEqual(await call(s, "call-me-back", ...sent), ["reply", { n: 2, s: "\u{1F600}" }, [1, 2]]);
    assert.deepEqual(calls, [sent]);
  });

  test("binary passes through both ways", { timeout: TEST_MS }, async (t) => {
    const s = await open(t, "/custom");
    const reply = [bytes(10, 9), "and json", { bin: bytes(4, 8), k: [bytes(2, 7)] }];
    const calls = answer(s, reply);
    const sent = [bytes(32, 1), { nested: bytes(3, 2) }, "text"];
    assert.deepEqual(normalize(await call(s, "call-me-back", ...sent)), normalize(reply));
    assert.deepEqual(normalize(calls), normalize([sent]));
  });

  test("an empty reply gives an empty ack", { timeout: TEST_MS }, async (t) => {
    const s = await open(t, "/");
    const calls = answer(s, []);
    assert.deepEqual(await call(s, "call-me-back"), []);
    assert.deepEqual(calls, [[]]);
  });
});

// ---------------------------------------------------------------- rooms

describe("rooms", () => {
  test("say reaches every member, sender included, from = sender's sid", { timeout: TEST_MS }, async (t) => {
    const room = unique("room");
    const [a, b] = await Promise.all([open(t, "/"), open(t, "/")]);
    const saidA = record(a, "said");
    const saidB = record(b, "said");
    assert.deepEqual(await call(a, "join", room), [room]);
    assert.deepEqual(await call(b, "join", room), [room]);
    assert.deepEqual(await call(b, "say", { room, text: "hi \u{1F44B}" }), [true]);
    const expected = { room, text: "hi \u{1F44B}", from: b.id };
    assert.deepEqual(await saidA.until(1), [expected]);
    assert.deepEqual(await saidB.until(1), [expected]);
  });

  test("said is not delivered to a non-member", { timeout: TEST_MS }, async (t) => {
    const room = unique("room");
    const other = unique("other");
    const [a, b, c] = await Promise.all([open(t, "/"), open(t, "/"), open(t, "/")]);
    const saidB = record(b, "said");
    const saidC = record(c, "said");
    await call(a, "join", room);
    await call(a, "join", other);
    await call(b, "join", room);
    await call(c, "join", other);
    // a's events reach the rooms in the order a sent them, so c's first said
    // (in `other`) shows whether the one in `room` leaked to it.
    assert.deepEqual(await call(a, "say", { room, text: "members only" }), [true]);
    assert.deepEqual(await call(a, "say", { room: other, text: "sentinel" }), [true]);
    assert.deepEqual(await call(a, "say", { room, text: "second" }), [true]);
    assert.deepEqual(await saidC.until(1), [{ room: other, text: "sentinel", from: a.id }]);
    assert.deepEqual(await saidB.until(2), [
      { room, text: "members only", from: a.id },
      { room, text: "second", from: a.id },
    ]);
    assert.deepEqual(await call(c, "echo", "flush"), ["flush"]);
    assert.deepEqual(saidC.seen, [{ room: other, text: "sentinel", from: a.id }]);
  });

  test("after leave the leaver no longer receives", { timeout: TEST_MS }, async (t) => {
    const room = unique("room");
    const other = unique("other");
    const [a, b] = await Promise.all([open(t, "/"), open(t, "/")]);
    const saidA = record(a, "said");
    const saidB = record(b, "said");
    await call(a, "join", room);
    await call(a, "join", other);
    await call(b, "join", room);
    await call(b, "join", other);
    await call(a, "say", { room, text: "before" });
    await saidB.until(1);
    assert.deepEqual(await call(b, "leave", room), [room]);
    await call(a, "say", { room, text: "after" });
    await call(a, "say", { room: other, text: "sentinel" });
    assert.deepEqual(await saidA.until(3), [
      { room, text: "before", from: a.id },
      { room, text: "after", from: a.id },
      { room: other, text: "sentinel", from: a.id },
    ]);
    assert.deepEqual(await saidB.until(2), [
      { room, text: "before", from: a.id },
      { room: other, text: "sentinel", from: a.id },
    ]);
  });

  test("a room is separate per namespace (/ vs /custom)", { timeout: TEST_MS }, async (t) => {
    const room = unique("shared-name");
    const m1 = manager(t);
    const m2 = manager(t);
    const a = await connect(m1, "/");
    const a2 = await connect(m1, "/custom");
    const b = await connect(m2, "/");
    const b2 = await connect(m2, "/custom");
    const said = { a: record(a, "said"), a2: record(a2, "said"), b: record(b, "said"), b2: record(b2, "said") };
    for (const s of [a, a2, b, b2]) assert.deepEqual(await call(s, "join", room), [room]);
    for (const round of [1, 2]) {
      assert.deepEqual(await call(a, "say", { room, text: `root ${round}` }), [true]);
      assert.deepEqual(await call(a2, "say", { room, text: `custom ${round}` }), [true]);
    }
    const root = [1, 2].map((r) => ({ room, text: `root ${r}`, from: a.id }));
    const custom = [1, 2].map((r) => ({ room, text: `custom ${r}`, from: a2.id }));
    assert.deepEqual(await said.a.until(2), root);
    assert.deepEqual(await said.b.until(2), root);
    assert.deepEqual(await said.a2.until(2), custom);
    assert.deepEqual(await said.b2.until(2), custom);
    await Promise.all([a, a2, b, b2].map((s) => call(s, "echo", "flush")));
    for (const [name, r] of Object.entries(said)) assert.equal(r.seen.length, 2, `${name}: ${JSON.stringify(r.seen)}`);
  });
});

// ---------------------------------------------------------------- connection

describe("one connection", () => {
  test("20 echoes fired at once are acked in the order sent", { timeout: TEST_MS }, async (t) => {
    const s = await open(t, "/");
    const order = [];
    const all = Array.from({ length: 20 }, (_, i) => new Promise((resolve, reject) => {
      s.timeout(WAIT_MS).emit("echo", i, "p".repeat((19 - i) * 50), (err, n) => {
        if (err) return reject(err);
        order.push(n);
        resolve();
      });
    }));
    await Promise.all(all);
    assert.deepEqual(order, Array.from({ length: 20 }, (_, i) => i));
  });

  test("a numeric event name is a valid event (socket.io-parser allows it): no error, the connection stays", { timeout: TEST_MS }, async (t) => {
    const s = await open(t, "/");
    let disconnected = false;
    s.on("disconnect", () => { disconnected = true; });
    s.emit(42, "not in the app contract: ignored");
    const echoed = await s.timeout(WAIT_MS).emitWithAck("echo", "after");
    assert.equal(echoed, "after");
    assert.equal(disconnected, false);
  });

  test("a string cut inside an emoji (a lone surrogate, as JSON.stringify writes it) is echoed, and the connection stays", { timeout: TEST_MS }, async (t) => {
    // Boost.JSON refuses the escape "\ud83d" alone; Node takes it. The gateway closed the connection.
    const s = await open(t, "/");
    let disconnected = false;
    s.on("disconnect", () => { disconnected = true; });
    const cut = "cut: " + "\u{1F600}".slice(0, 1);
    assert.equal(await s.timeout(WAIT_MS).emitWithAck("echo", cut), cut);
    assert.equal(await s.timeout(WAIT_MS).emitWithAck("echo", "after"), "after");
    assert.equal(disconnected, false);
  });

  test("acks keep the order across echo, echo-bin and whoami", { timeout: TEST_MS }, async (t) => {
    const s = await open(t, "/custom");
    const order = [];
    const all = Array.from({ length: 20 }, (_, i) => new Promise((resolve, reject) => {
      const done = (err) => { if (err) reject(err); else { order.push(i); resolve(); } };
      if (i % 3 === 0) s.timeout(WAIT_MS).emit("echo-bin", bytes(i * 100 + 1, i), i, done);
      else if (i % 3 === 1) s.timeout(WAIT_MS).emit("echo", { i }, done);
      else s.timeout(WAIT_MS).emit("whoami", done);
    }));
    await Promise.all(all);
    assert.deepEqual(order, Array.from({ length: 20 }, (_, i) => i));
  });

  test("two namespaces multiplexed on one Manager, the same ack ids in flight in both", { timeout: TEST_MS }, async (t) => {
    const m = manager(t);
    const root = await connect(m, "/");
    const custom = await connect(m, "/custom");
    assert.equal(root.io.engine, custom.io.engine);
    // Both sockets number their acks from 0, so each pair below shares an id.
    const pairs = await Promise.all(Array.from({ length: 5 }, (_, i) => Promise.all([
      call(root, "echo", "root", i),
      call(custom, "echo", "custom", i),
    ])));
    pairs.forEach(([r, c], i) => {
      assert.deepEqual(r, ["root", i]);
      assert.deepEqual(c, ["custom", i]);
    });
    assert.equal((await call(root, "whoami"))[0].nsp, "/");
    assert.equal((await call(custom, "whoami"))[0].nsp, "/custom");
  });

  for (const [leaving, staying] of [["/custom", "/"], ["/", "/custom"]]) {
    test(`bye on ${leaving} disconnects that namespace only; ${staying} stays connected`, { timeout: TEST_MS }, async (t) => {
      const m = manager(t);
      const stay = await connect(m, staying);
      const leave = await connect(m, leaving);
      const engineId = m.engine.id;
      const stayDisconnects = record(stay, "disconnect");
      const disconnected = once(leave, "disconnect");
      leave.emit("bye");
      const [reason] = await disconnected;
      assert.equal(reason, "io server disconnect");
      assert.equal(leave.connected, false);
      assert.equal(leave.active, false, "a server disconnect is not retried");
      assert.equal(stay.connected, true);
      assert.deepEqual(await call(stay, "echo", "still here"), ["still here"]);
      assert.equal(m.engine.id, engineId, "the Engine.IO session is the same");
      assert.deepEqual(stayDisconnects.seen, []);
    });
  }

  test("after the transport closes, the Manager reconnects and echo works again", { timeout: TEST_MS }, async (t) => {
    const m = manager(t, { reconnection: true, reconnectionDelay: 50, reconnectionDelayMax: 200, randomizationFactor: 0 });
    const root = await connect(m, "/");
    const custom = await connect(m, "/custom");
    const before = { engine: m.engine.id, root: root.id, custom: custom.id };
    const down = Promise.all([once(root, "disconnect"), once(custom, "disconnect")]);
    const up = Promise.all([once(root, "connect", { ms: 2 * WAIT_MS }), once(custom, "connect", { ms: 2 * WAIT_MS })]);
    const reconnected = once(m, "reconnect", { ms: 2 * WAIT_MS });
    m.engine.close();
    const reasons = (await down).map(([reason]) => reason);
    for (const reason of reasons) assert.notEqual(reason, "io server disconnect");
    await reconnected;
    await up;
    assert.equal(root.connected, true);
    assert.equal(custom.connected, true);
    assert.notEqual(m.engine.id, before.engine, "a new Engine.IO session");
    assert.notEqual(root.id, m.engine.id);
    assert.deepEqual(await call(root, "echo", "back", 1), ["back", 1]);
    assert.deepEqual(await call(custom, "echo", "back", 2), ["back", 2]);
    assert.deepEqual(await call(root, "whoami"), [{ sid: root.id, nsp: "/", auth: {} }]);
  });

  test(`the transport is the one configured (${mode})`, { timeout: TEST_MS }, async (t) => {
    const m = manager(t);
    const s = await connect(m, "/");
    if (mode === "default" && m.engine.transport.name !== "websocket") await once(m.engine, "upgrade");
    assert.equal(m.engine.transport.name, mode === "polling" ? "polling" : "websocket");
    assert.deepEqual(await call(s, "echo", mode), [mode]);
  });

  test("no packet is lost or reordered across the upgrade", { timeout: TEST_MS, skip: mode !== "default" && "only with SIDECAST_TRANSPORTS=default" }, async (t) => {
    const m = manager(t);
    const s = m.socket("/");
    const acked = [];
    const pending = [];
    let upgraded = false;
    let sent = 0;
    m.engine ?? await once(m, "open");
    // Keep echoes flowing from before the socket is connected (they are
    // buffered) until well after the upgrade.
    const fire = () => {
      const i = sent++;
      pending.push(new Promise((resolve, reject) => {
        s.timeout(WAIT_MS).emit("echo", i, (err, n) => {
          if (err) return reject(err);
          acked.push(n);
          resolve();
        });
      }));
    };
    const upgrade = once(m.engine, "upgrade");
    upgrade.then(() => { upgraded = true; }, () => {});
    let after = 0;
    let beforeUpgrade = 0;
    while (sent < 2000 && after < 20) {
      fire();
      if (upgraded) after++;
      else beforeUpgrade = sent;
      await new Promise((resolve) => setTimeout(resolve, 1));
    }
    await upgrade;
    t.diagnostic(`${beforeUpgrade} echoes sent before the upgrade, ${sent} in all`);
    assert.ok(beforeUpgrade > 0, "some echoes were sent before the upgrade");
    await Promise.all(pending);
    assert.equal(m.engine.transport.name, "websocket");
    assert.deepEqual(acked, Array.from({ length: sent }, (_, i) => i));
  });
});
