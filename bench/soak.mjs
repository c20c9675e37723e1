// The soak driver (see bench/soak). Clients on every namespace do echo with
// acks, room chat and VM launches; a worker is killed and replaced every
// minute, the broker is stopped past its peers' liveness (SIGSTOP, 4.5 s)
// once a quarter of the way and restarted once half-way (of a broker pair,
// whichever is active then: two failovers). Bounded in time and count.
import { execFileSync, spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(process.env.NODE_PATH + "/");
const { io } = require("socket.io-client");
const [minutes, clientCount] = process.argv.slice(2).map(Number);
const url = process.env.SIDECAST_URL, runDir = process.env.SIDECAST_RUN_DIR, deploy = process.env.SIDECAST_DEPLOY;
const pids = () => Object.fromEntries(readFileSync(`${runDir}/pids`, "utf8").trim().split("\n").map((l) => l.split(" ")).map(([n, p]) => [n, Number(p)]));
const rss = (pid) => { try { return Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))[1]); } catch { return 0; } };
const alive = (pid) => { try { process.kill(pid, 0); return true; } catch { return false; } };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
// What the processes counted of the stall and the restart (their /metrics).
const httpOf = (pid) => { try { return readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").find((a, i, all) => all[i - 1] === "--http"); } catch { return undefined; } };
const env = Object.fromEntries(readFileSync(`${runDir}/env`, "utf8").trim().split("\n").map((l) => l.split("=")));
const pair = env.PAIR === "1";
const brokers = pair ? { broker: env.BROKER_HTTP, "broker-b": env.BACKUP_HTTP } : { broker: env.BROKER_HTTP };
// The broker that serves: of a pair, the one whose /status says active.
async function activeBroker() {
  if (!pair) return "broker";
  for (const [name, hostPort] of Object.entries(brokers)) {
    try {
      if ((await (await fetch(`http://${hostPort}/status`)).json()).pair?.state === "active") return name;
    } catch { /* a broker that is down */ }
  }
  return "broker";
}
function brokerArgs(name) {
  const args = name === "broker"
    ? ["--id", "broker", "--router", env.ROUTER, "--xsub", env.XSUB, "--xpub", env.XPUB, "--http", env.BROKER_HTTP]
    : ["--id", "broker-b", "--router", env.BACKUP_ROUTER, "--xsub", env.BACKUP_XSUB, "--xpub", env.BACKUP_XPUB,
       "--http", env.BACKUP_HTTP];
  if (!pair) return args.slice(2);
  return [...args, "--pair", name === "broker" ? "primary" : "backup",
          "--pair-bind", name === "broker" ? env.PAIR_PRIMARY : env.PAIR_BACKUP,
          "--pair-connect", name === "broker" ? env.PAIR_BACKUP : env.PAIR_PRIMARY];
}
async function counted(hostPort, names) {
  if (!hostPort) return "?";
  try {
    const text = await (await fetch(`http://${hostPort}/metrics`)).text();
    return names.map((n) => `${n.replace(/^sidecast_(broker|gateway)_/, "")} ${text.split("\n").filter((l) => l.startsWith(n)).map((l) => l.slice(n.length).trim()).join(" ") || 0}`).join(", ");
  } catch { return "unreachable"; }
}

const stats = { asked: 0, answered: 0, errors: 0, duplicates: 0, unanswered: 0, said: 0, vmAsked: 0, vmDone: 0 };
const errorKinds = {};  // error acks by their error, with when the first came
const disconnects = {};
const clients = [];
for (let i = 0; i < clientCount; i++) {
  const s = io(url, { transports: i % 3 === 0 ? ["polling"] : ["polling", "websocket"] });
  const v = io(`${url}/vm`, { transports: ["websocket"] });
  s.on("said", () => stats.said++);
  for (const sock of [s, v]) sock.on("disconnect", (reason) => { disconnects[reason] = (disconnects[reason] || 0) + 1; });
  v.on("vm_response", () => stats.vmDone++);
  clients.push({ s, v });
}
const end = Date.now() + minutes * 60000;
// Each ack callback must run exactly once: count calls per request.
function ask(socket, ...args) {
  stats.asked++;
  let calls = 0;
  socket.timeout(60000).emit(...args, (err, reply) => {
    if (++calls > 1) { stats.duplicates++; return; }
    if (err) stats.unanswered++;
    else if (reply && typeof reply === "object" && reply.error) {
      stats.errors++;
      const kind = `${reply.error}: ${reply.message}`;
      errorKinds[kind] ??= { count: 0, first: new Date().toISOString() };
      errorKinds[kind].count++;
    }
    else stats.answered++;
  });
}
async function traffic(c, i) {
  await sleep(i * 20);
  c.s.emit("join", "soak-" + (i % 5));
  for (let n = 0; Date.now() < end; n++) {
    ask(c.s, "echo", n);
    if (n % 5 === 0) c.s.emit("say", { room: "soak-" + (i % 5), text: "m" + n });
    if (n % 50 === 0) { stats.vmAsked++; ask(c.v, "open_vm", { count: 1, name: "s" }); }
    await sleep(100);
  }
}
const watched = [...Object.keys(brokers), "gw1", "gw2"];
const sample = () => Object.fromEntries(watched.map((n) => [n, rss(pids()[n])]));
let stallCounts = "no stall";
const hit = [];  // which broker the stall and the kill hit
async function chaos() {
  const restartAt = Date.now() + (end - Date.now()) / 2;
  const stallAt = Date.now() + (end - Date.now()) / 4;
  let restarted = false, stalled = false, kills = 0, round = 0;
  const every = Math.min(60000, (minutes * 60000) / 6);
  while (Date.now() < end - 15000) {
    await sleep(every);
    if (Date.now() >= end - 15000) break;
    const p = pids();
    // vm, vm, worker-demo in turn; of the vm workers the oldest alive (each
    // replacement is vm<next number>).
    const kind = ["vm", "vm", "worker-demo"][round++ % 3];
    const victim = Object.keys(p).find((n) => (kind === "vm" ? /^vm\d+$/.test(n) : n === kind) && alive(p[n]));
    if (victim) { process.kill(p[victim], "SIGKILL"); kills++; }
    execFileSync(`${deploy}/add.sh`, [kind, "--run-dir", runDir]);
    if (!stalled && Date.now() >= stallAt) {
      // Past the liveness (3 × 1 s): gateways and workers replace their
      // sockets and come back as the same peers; no job may run twice.
      stalled = true;
      const name = await activeBroker();
      hit.push(`stalled ${name}`);
      process.kill(p[name], "SIGSTOP");
      await sleep(4500);
      process.kill(p[name], "SIGCONT");
      await sleep(5000);
      stallCounts = await counted(brokers[name], ["sidecast_broker_stalls_total", "sidecast_broker_probes_total",
                                                  "sidecast_broker_peer_reconnects_total"]);
    } else if (!restarted && Date.now() >= restartAt) {
      restarted = true;
      const name = await activeBroker();
      hit.push(`killed and restarted ${name}`);
      process.kill(p[name], "SIGKILL");
      await sleep(500);
      const b = spawn(`${env.BIN}/sidecast-broker`, brokerArgs(name), { detached: true, stdio: "ignore" });
      b.unref();
      execFileSync("sh", ["-c", `sed -i 's/^${name} .*/${name} ${b.pid}/' ${runDir}/pids`]);
    }
  }
  return { kills, restarted, stalled };
}

// Memory is compared from 40% of the run on: by then the bounded buffers
// (recovery replay: --recovery-buffer events per /vm socket) are full.
// A series of ten samples besides: growth that levels off is buffers and
// the allocator warming up; growth that keeps its pace is a leak.
let before;
const series = [];
const sampler = (async () => {
  const step = (minutes * 60000) / 10, start = end - minutes * 60000;
  for (let k = 1; k <= 10; k++) {
    await sleep(Math.max(0, start + k * step - Date.now() - 1000));  // the last a second before the end
    series.push(sample());
    if (k === 4) before = series.at(-1);  // 40% in
  }
})();
const [chaosResult] = await Promise.all([chaos(), ...clients.map(traffic), sampler]);
// Answers still on their way: a request lost with the broker's state is
// answered by the gateway's own deadline (--request-timeout, 30 s, + 1 s).
for (let i = 0; i < 450 && stats.answered + stats.errors + stats.unanswered < stats.asked; i++) await sleep(100);
const after = sample();
const crashed = watched.filter((n) => !alive(pids()[n]));
for (const c of clients) { c.s.close(); c.v.close(); }

const recovery = [`the broker stalled, 5 s after: ${stallCounts}`];
if (pair) {
  recovery.push(hit.join("; "));
  for (const [name, hostPort] of Object.entries(brokers))
    recovery.push(`${name}: ${await counted(hostPort, ["sidecast_broker_pair_term", "sidecast_broker_pair_activations_total"])}`);
}
for (const g of ["gw1", "gw2"])
  recovery.push(`${g}: ${await counted(httpOf(pids()[g]), ["sidecast_gateway_requests_resent_total", "sidecast_gateway_notices_resent_total", "sidecast_gateway_broker_lost_total", "sidecast_gateway_broker_restarts_total"])}`);

const row = (n) => `${n.padEnd(8)} ${String(before[n]).padStart(8)} KB -> ${String(after[n]).padStart(8)} KB`;
console.log(`\nsoak: ${minutes} min, ${clientCount} clients, ${chaosResult.kills} worker kills, broker stalled: ${chaosResult.stalled}, restarted: ${chaosResult.restarted}${pair ? " (a broker pair)" : ""}`);
const pending = stats.asked - stats.answered - stats.errors - stats.unanswered;
stats.unanswered += pending;
console.log(`events with ack: ${stats.asked}; answered ${stats.answered}, error acks ${stats.errors}, unanswered ${stats.unanswered}, answered twice ${stats.duplicates}`);
if (stats.errors) console.log(`error acks by error: ${JSON.stringify(errorKinds)}`);
console.log(`room messages received: ${stats.said}; vm launches asked: ${stats.vmAsked}, results: ${stats.vmDone}`);
console.log(`client disconnects: ${JSON.stringify(disconnects)}`);
console.log("counted:\n" + recovery.join("\n"));
console.log("RSS (40% into the run -> end):\n" + watched.map(row).join("\n"));
console.log(`RSS every ${(minutes * 6).toFixed(1)} s (KB):\n` +
            watched.map((n) => `${n.padEnd(8)} ${series.map((s) => s[n]).join(" ")}`).join("\n"));
const grew = watched.filter((n) => after[n] > before[n] * 1.25 + 2048);
// A launch runs once: a second run (a job run twice) would bring a second result.
const vmTwice = stats.vmDone > stats.vmAsked;
const ok = crashed.length === 0 && stats.unanswered === 0 && stats.duplicates === 0 && grew.length === 0 && !vmTwice;
console.log(ok ? "soak: OK" : `soak: FAILED (crashed: ${crashed}, grew: ${grew}, more vm results than launches: ${vmTwice})`);
process.exit(ok ? 0 : 1);
