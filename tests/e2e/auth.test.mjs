// JWT authentication at the gateway: run under tests/e2e/stack with
// --gateway-arg --jwt-secret --gateway-arg "$SIDECAST_JWT_SECRET".
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { io } from "socket.io-client";
import WebSocket from "ws";

const url = process.env.SIDECAST_URL;
const secret = process.env.SIDECAST_JWT_SECRET;
const sockets = [];
after(() => sockets.forEach((s) => s.close()));

const b64url = (b) => Buffer.from(b).toString("base64url");
function token(payload, key = secret, alg = "HS256") {
  const signed = `${b64url(JSON.stringify({ alg, typ: "JWT" }))}.${b64url(JSON.stringify(payload))}`;
  return `${signed}.${createHmac("sha256", key).update(signed).digest("base64url")}`;
}
function attempt(auth) {
  const s = io(url, { transports: ["websocket"], auth, reconnection: false, forceNew: true });
  sockets.push(s);
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error("no answer")), 5000);
    s.once("connect", () => { clearTimeout(t); resolve({ s }); });
    s.once("connect_error", (e) => { clearTimeout(t); resolve({ error: e.message }); });
  });
}
const inAMinute = () => Math.floor(Date.now() / 1000) + 60;
// sidecast_gateway_dropped_total{reason="bad_token"} from the gateway's /metrics.
async function badTokens() {
  const text = await (await fetch(`${url}/metrics`)).text();
  const m = text.match(/^sidecast_gateway_dropped_total\{reason="bad_token"\} (\S+)$/m);
  return m ? Number(m[1]) : 0;
}

test("no token: refused, and counted", async () => {
  const before = await badTokens();
  assert.equal((await attempt({})).error, "authentication required: auth.token");
  assert.equal((await attempt({ token: 7 })).error, "authentication required: auth.token");
  assert.equal(await badTokens(), before + 2);
});

test("bad tokens: refused with the reason, and counted", async () => {
  const before = await badTokens();
  assert.equal((await attempt({ token: token({ sub: "ann" }, "wrong") })).error, "invalid token: bad signature");
  assert.equal((await attempt({ token: token({ sub: "ann", exp: 1000 }) })).error, "invalid token: token expired");
  assert.equal((await attempt({ token: "x.y.z" })).error, "invalid token: malformed token");
  assert.equal((await attempt({ token: token({ sub: "ann" }, secret, "none") })).error,
               "invalid token: algorithm not accepted: none");
  assert.equal((await attempt({ token: token({ sub: "ann", exp: "soon" }) })).error,
               "invalid token: exp or nbf is not a date");
  assert.equal(await badTokens(), before + 5);
});

test("a good token: connected, and the user travels with every request", async () => {
  const { s, error } = await attempt({ token: token({ sub: "ann", exp: inAMinute() }) });
  assert.equal(error, undefined);
  const who = await s.timeout(5000).emitWithAck("whoami");
  assert.equal(who.user, "ann");
  assert.equal(who.sid, s.id);
});

// A recovery (Socket.IO connection-state recovery, /vm keeps sockets) is a
// connect like any other: it carries a valid token, of the kept socket's
// user, or it is not a recovery. Before, a pid alone recovered the socket
// with no token at all, and after the token had expired: a bearer
// credential that outlived it.
test("a recovery needs a valid token of the same user", async () => {
  let auth = { token: token({ sub: "ann", exp: inAMinute() }) };
  const s = io(`${url}/vm`, { transports: ["websocket"], auth: (cb) => cb(auth), forceNew: true,
                              reconnectionDelay: 50, reconnectionDelayMax: 50 });
  sockets.push(s);
  const next = (event) => new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no ${event}`)), 5000);
    s.once(event, (e) => { clearTimeout(t); resolve(e); });
  });
  await next("connect");
  const sid = s.id, pid = s._pid;  // (socket.io-client keeps the pid it reconnects with there)
  assert.ok(pid, "the gateway keeps /vm sockets for recovery");
  const drop = () => { s.io.engine.close(); };  // the client reconnects by itself, with {pid, offset}

  auth = {};  // no token: refused with the token's reason, not recovered
  drop();
  assert.equal((await next("connect_error")).message, "authentication required: auth.token");

  auth = { token: token({ sub: "bob", exp: inAMinute() }) };  // another user: a fresh socket
  s.connect();
  await next("connect");
  assert.equal(s.recovered, false);
  assert.notEqual(s.id, sid);
  s.close();

  // ann's socket is still kept: her own new token recovers it.
  const again = io(`${url}/vm`, { transports: ["websocket"], forceNew: true, reconnection: false,
                                  auth: { token: token({ sub: "ann", exp: inAMinute() }), pid, offset: "0" } });
  sockets.push(again);
  await new Promise((resolve, reject) => {
    again.once("connect", resolve);
    again.once("connect_error", (e) => reject(e));
  });
  assert.equal(again.id, sid, "ann's kept socket, recovered");
});

// sidecast_gateway_tokens_expired_total from the gateway's /metrics.
async function tokensExpired() {
  const text = await (await fetch(`${url}/metrics`)).text();
  const m = text.match(/^sidecast_gateway_tokens_expired_total (\S+)$/m);
  return m ? Number(m[1]) : 0;
}

// This stack runs with --jwt-end-at-exp --jwt-leeway 1: a socket ends when
// the token it connected with expires (exp + 1 s), as a server disconnect;
// the page connects again with a fresh token. Before, a socket outlived its
// token for as long as its transport lasted.
test("--jwt-end-at-exp: a socket ends when its token expires, and connects again with a fresh one", async () => {
  const before = await tokensExpired();
  const soon = () => Math.floor(Date.now() / 1000) + 1;
  const lasting = (await attempt({ token: token({ sub: "bob", exp: inAMinute() }) })).s;
  // 9999-12-31: past what a time_point in nanoseconds holds (it ended at once).
  const forever = (await attempt({ token: token({ sub: "dee", exp: 253402300799 }) })).s;
  let auth = { token: token({ sub: "ann", exp: soon() }) };
  const s = io(url, { transports: ["websocket"], auth: (cb) => cb(auth), forceNew: true, reconnection: false });
  sockets.push(s);
  await new Promise((resolve, reject) => { s.once("connect", resolve); s.once("connect_error", reject); });
  const reason = await new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error("still connected 6 s on")), 6000);
    s.once("disconnect", (r) => { clearTimeout(t); resolve(r); });
  });
  assert.equal(reason, "io server disconnect");
  assert.equal(await tokensExpired(), before + 1);
  assert.ok(lasting.connected, "a socket whose token lasts was ended too");
  assert.ok(forever.connected, "a socket whose token expires in 9999 was ended");
  assert.equal((await lasting.timeout(5000).emitWithAck("whoami")).user, "bob");

  auth = { token: token({ sub: "ann", exp: inAMinute() }) };
  s.connect();
  await new Promise((resolve, reject) => { s.once("connect", resolve); s.once("connect_error", reject); });
  assert.equal((await s.timeout(5000).emitWithAck("whoami")).user, "ann");

  // /ws: a disconnect event naming the reason, then the close.
  const ws = new WebSocket(`${url.replace("http", "ws")}/ws?auth=${encodeURIComponent(JSON.stringify({
    token: token({ sub: "cy", exp: soon() }) }))}`);
  const frames = [];
  ws.on("message", (m) => frames.push(JSON.parse(String(m))));
  await new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error("/ws still open 6 s on")), 6000);
    ws.on("close", () => { clearTimeout(t); resolve(); });
  });
  assert.deepEqual(frames.find((f) => f.event === "disconnect")?.data, "token expired");
  assert.equal(await tokensExpired(), before + 2);
});
