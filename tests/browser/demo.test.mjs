// The demo page in headless Chromium (Debian's), driven by playwright-core:
// two pages chat in one room, history survives a reload, a VM launch shows
// progress and its result. Over polling and over WebSocket; no console errors.
// SIDECAST_URL: a running `sidecast demo`; SIDECAST_ARTIFACTS: screenshot dir.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { chromium } from "playwright-core";

const url = process.env.SIDECAST_URL;
const artifacts = process.env.SIDECAST_ARTIFACTS || ".";
mkdirSync(artifacts, { recursive: true });
let browser;

before(async () => {
  browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});
after(async () => { await browser?.close(); });

// A page that records console errors and failed requests.
async function open(transport) {
  const context = await browser.newContext({ viewport: { width: 1200, height: 800 } });
  const page = await context.newPage();
  const errors = [];
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  page.on("pageerror", (e) => errors.push(e.message));
  // ERR_ABORTED is the page cancelling its own request (a reload ends the
  // long-poll in flight); a request the server failed shows another error.
  page.on("requestfailed", (r) => {
    const why = r.failure()?.errorText ?? "";
    if (why !== "net::ERR_ABORTED") errors.push(`request failed (${why}): ${r.url()}`);
  });
  await page.goto(`${url}/?transport=${transport}`);
  await page.waitForSelector("#status.up", { timeout: 10000 });
  return { page, errors };
}

async function join(page, nick, room) {
  await page.fill("#nick", nick);
  await page.fill("#room", room);
  await page.click("#join");
  await page.waitForSelector("#text:not([disabled])", { timeout: 10000 });
}

for (const transport of ["polling", "websocket"]) {
  test(`chat between two pages over ${transport}, history after reload`, async () => {
    const room = `room-${transport}-${Date.now()}`;
    const a = await open(transport), b = await open(transport);
    assert.equal(await a.page.textContent("#transport"), transport);
    await join(a.page, "alice", room);
    await join(b.page, "bob", room);
    await a.page.waitForFunction(() => [...document.querySelectorAll("#members li")].map((l) => l.textContent).includes("bob"),
                                 null, { timeout: 10000 });
    await a.page.fill("#text", "hi bob");
    await a.page.click("#send");
    await b.page.waitForSelector(`#messages li:has-text("hi bob")`, { timeout: 10000 });
    await b.page.fill("#text", "hi alice");
    await b.page.click("#send");
    await a.page.waitForSelector(`#messages li:has-text("hi alice")`, { timeout: 10000 });
    await a.page.screenshot({ path: `${artifacts}/chat-${transport}.png` });

    await b.page.reload();
    await b.page.waitForSelector("#status.up", { timeout: 10000 });
    await join(b.page, "bob", room);
    await b.page.waitForSelector(`#messages li:has-text("hi bob")`, { timeout: 10000 });
    await b.page.waitForSelector(`#messages li:has-text("hi alice")`, { timeout: 10000 });
    const texts = await b.page.$$eval("#messages li", (ls) => ls.map((l) => l.textContent));
    assert.ok(texts.findIndex((t) => t.includes("hi bob")) < texts.findIndex((t) => t.includes("hi alice")), "history in order");
    assert.deepEqual(a.errors, []);
    assert.deepEqual(b.errors, []);
    await a.page.context().close();
    await b.page.context().close();
  });

  test(`VM launch shows progress and the result over ${transport}`, async () => {
    const { page, errors } = await open(transport);
    await page.fill("#vm-count", "3");
    await page.fill("#vm-name", "web");
    await page.click("#launch");
    // A bar part-way proves live progress, not only the final state.
    await page.waitForFunction(() => [...document.querySelectorAll(".vm .bar > div")]
      .some((d) => parseFloat(d.style.width) > 0 && parseFloat(d.style.width) < 100), null, { timeout: 10000 });
    await page.waitForSelector(".task .result:has-text('done')", { timeout: 15000 });
    const states = await page.$$eval(".vm", (rows) => rows.map((r) => r.className));
    assert.equal(states.length, 3);
    for (const s of states) assert.match(s, /running|failed/);
    assert.match(await page.textContent(".task .result"), /3 running, 0 failed/);
    await page.screenshot({ path: `${artifacts}/vm-${transport}.png` });
    assert.deepEqual(errors, []);
    await page.context().close();
  });
}
