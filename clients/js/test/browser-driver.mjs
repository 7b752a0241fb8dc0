// Drives the client in headless Chromium (Debian's, through playwright-core)
// for tests/browser.rs, which owns every server process.
//
//   node browser-driver.mjs <ws base> <http base of the internal listener>
//     The client's own test page: when this script prints "restart" the
//     test restarts the node (SIGTERM: a drain, 1012) on the same ports and
//     answers "restarted".
//   node browser-driver.mjs cover-review <page URL> <image file>
//     The cover-review example's page, in two tabs of one creator.
//   node browser-driver.mjs sse-fallback <ws base> <http base>
//     The client's page behind a proxy that refuses WebSocket: it falls
//     back to Server-Sent Events, survives a restart ("restart", as
//     above), and moves to WebSocket once the proxy lets it through.
//
// Exits 0 after printing "ok", or 1 with the reason.
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { extname, join, normalize } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { createHmac } from "node:crypto";
import { request as httpRequest } from "node:http";
import { connect as tcpConnect } from "node:net";
import { chromium } from "playwright-core";

const coverReview = process.argv[2] === "cover-review";
const sseFallback = process.argv[2] === "sse-fallback";
const [wsBase, httpBase] = process.argv.slice(sseFallback ? 3 : 2);
const root = fileURLToPath(new URL("..", import.meta.url));
const PATIENCE = 20_000;
const types = { ".html": "text/html", ".js": "text/javascript", ".map": "application/json" };

// The client package's own directory, served as static files.
const server = createServer(async (request, response) => {
  const path = normalize(decodeURIComponent(new URL(request.url, "http://x").pathname));
  try {
    const body = await readFile(join(root, path));
    response.writeHead(200, { "content-type": types[extname(path)] ?? "application/octet-stream" });
    response.end(body);
  } catch {
    response.writeHead(404).end();
  }
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const pageBase = `http://127.0.0.1:${server.address().port}`;

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function ask(line, answer) {
  console.log(line);
  const { value } = await lines.next();
  if (value !== answer) throw new Error(`expected "${answer}", got ${value}`);
}

async function post(path, body) {
  const response = await fetch(`${httpBase}${path}`, {
    method: "POST",
    headers: { authorization: "Bearer acme-key", "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await response.json();
  if (!response.ok) throw new Error(`${path} answered ${response.status}: ${JSON.stringify(answer)}`);
  return answer;
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  if (coverReview) {
    await reviewACover(process.argv[3], process.argv[4]);
  } else if (sseFallback) {
    await fallbackScenario();
  } else {
    await clientScenario();
  }
  console.log("ok");
} catch (err) {
  console.error(err?.stack ?? String(err));
  process.exitCode = 1;
} finally {
  await browser.close();
  server.close();
  process.exit();
}

/** Two tabs of creator ann; one uploads; both show the verdict. */
async function reviewACover(pageUrl, image) {
  const context = await browser.newContext();
  const tabs = [await context.newPage(), await context.newPage()];
  for (const tab of tabs) {
    tab.on("pageerror", (err) => console.error(`page error: ${err}`));
    await tab.goto(`${pageUrl}/?creator=ann`);
    await tab.waitForFunction(
      () => document.getElementById("state").textContent === "ann: connected",
      undefined,
      { timeout: PATIENCE, polling: 20 },
    );
  }
  await tabs[0].setInputFiles("#file", image);
  await tabs[0].click("#upload");
  for (const tab of tabs) {
    const verdict = tab.locator("#verdicts li.approved");
    await verdict.waitFor({ timeout: PATIENCE });
    const text = await verdict.textContent();
    if (!text.includes("cover.png: approved (800×800)")) throw new Error(`the verdict reads: ${text}`);
  }
}

/** An HS256 token for the `secure` tenant, valid for `seconds`. */
function token(sub, seconds) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part({ sub, exp: Math.floor(Date.now() / 1000) + seconds })}`;
  const signature = createHmac("sha256", "browser-test-secret").update(body).digest("base64url");
  return `${body}.${signature}`;
}

/**
 * A tab of a JWT tenant: the token comes from a callback (the bearer.
 * subprotocol) and lives 4 s; the client refreshes it on the open
 * connection 3 s before, so the connection outlives the first token.
 */
async function tokenScenario(context) {
  const tab = await context.newPage();
  tab.on("pageerror", (err) => console.error(`page error: ${err}`));
  await tab.exposeFunction("mintToken", (fresh) => token("tess", fresh ? 60 : 4));
  await tab.goto(`${pageBase}/test/page.html?ws=${encodeURIComponent(wsBase)}&tenant=secure&token=1`);
  await tab.waitForFunction(() => window.log.states.some((s) => s.state === "connected"), undefined,
    { timeout: PATIENCE, polling: 20 });
  const firstExpiry = Date.now() + 4_000;
  await tab.waitForFunction((at) => Date.now() > at + 1_000, firstExpiry, { timeout: PATIENCE, polling: 100 });
  const response = await fetch(`${httpBase}/v1/push`, {
    method: "POST",
    headers: { authorization: "Bearer secure-key", "content-type": "application/json" },
    body: JSON.stringify({ users: ["tess"], data: "still connected" }),
  });
  if (response.status !== 202) throw new Error(`push to tess answered ${response.status}`);
  await tab.waitForFunction(() => window.log.messages.includes("still connected"), undefined,
    { timeout: PATIENCE, polling: 20 });
  const states = await tab.evaluate(() => window.log.states.map((s) => s.state));
  if (states.includes("disconnected")) throw new Error(`the token's expiry dropped it: ${states}`);
  await tab.close();
}

/** The client's own page: two tabs of ann, a node restart, a logout. */
async function clientScenario() {
  const context = await browser.newContext();
  const url = `${pageBase}/test/page.html?ws=${encodeURIComponent(wsBase)}&tenant=acme&user=ann`;
  const tabs = [await context.newPage(), await context.newPage()];
  for (const tab of tabs) {
    tab.on("pageerror", (err) => console.error(`page error: ${err}`));
    await tab.goto(url);
  }
  const until = (tab, condition, arg) =>
    tab.waitForFunction(condition, arg, { timeout: PATIENCE, polling: 20 });
  const connectedTimes = (tab, times) =>
    until(tab, (n) => window.log.states.filter((s) => s.state === "connected").length >= n, times);
  const received = (tab, count) =>
    until(tab, (n) => window.log.messages.length >= n, count);
  for (const tab of tabs) await connectedTimes(tab, 1);

  // Two tabs of one user both receive, the user's and the topic's.
  for (const n of [1, 2, 3]) await post("/v1/push", { users: ["ann"], data: n });
  await post("/v1/push", { topic: "news", data: "news" });
  for (const tab of tabs) await received(tab, 4);

  // The node restarts (a drain): each tab reconnects and resumes.
  await ask("restart", "restarted");
  for (const tab of tabs) {
    await connectedTimes(tab, 2);
    await until(tab, () => window.log.recovered.length >= 1);
  }
  for (const n of [4, 5]) await post("/v1/push", { users: ["ann"], data: n });
  for (const tab of tabs) {
    await received(tab, 6);
    const log = await tab.evaluate(() => window.log);
    const expected = JSON.stringify([1, 2, 3, "news", 4, 5]);
    if (JSON.stringify(log.messages) !== expected) {
      throw new Error(`a tab received ${JSON.stringify(log.messages)}, not ${expected}`);
    }
    const drained = log.states.find((s) => s.state === "disconnected");
    if (drained?.code !== 1012) throw new Error(`the restart was not a drain: ${JSON.stringify(log.states)}`);
  }

  await tokenScenario(context);

  // The service logs the user out: both tabs close and stay closed.
  await post("/v1/disconnect", { user: "ann" });
  for (const tab of tabs) {
    await until(tab, () => window.log.states.at(-1)?.state === "closed");
    const last = await tab.evaluate(() => window.log.states.at(-1));
    if (last.code !== 4008) throw new Error(`closed with ${last.code}, not 4008`);
  }
  // Longer than the client's first reconnect delays: nobody came back.
  await new Promise((resolve) => setTimeout(resolve, 2_000));
  const presence = await post("/v1/presence", { users: ["ann"] });
  if (presence.users.ann.count !== 0) throw new Error(`reconnected: ${JSON.stringify(presence)}`);
  for (const tab of tabs) {
    const states = await tab.evaluate(() => window.log.states);
    if (states.at(-1).state !== "closed") throw new Error(`not closed: ${JSON.stringify(states)}`);
  }
}

/**
 * A proxy in front of the node's public listener that passes HTTP (the
 * event stream and its commands) and refuses WebSocket upgrades while
 * `refusing` is set.
 */
async function startProxy(target) {
  const { hostname, port } = new URL(target);
  const proxy = { refusing: true, upgrades: 0 };
  const server = createServer((request, response) => {
    const upstream = httpRequest(
      { host: hostname, port, path: request.url, method: request.method, headers: request.headers },
      (answer) => {
        response.writeHead(answer.statusCode, answer.headers);
        answer.pipe(response);
      },
    );
    upstream.on("error", () => response.destroy());
    response.on("close", () => upstream.destroy());
    request.pipe(upstream);
  });
  server.on("upgrade", (request, socket, head) => {
    if (proxy.refusing) {
      socket.end("HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
      return;
    }
    proxy.upgrades += 1;
    const upstream = tcpConnect(Number(port), hostname, () => {
      let head_ = `${request.method} ${request.url} HTTP/1.1\r\n`;
      for (let i = 0; i < request.rawHeaders.length; i += 2) {
        head_ += `${request.rawHeaders[i]}: ${request.rawHeaders[i + 1]}\r\n`;
      }
      upstream.write(`${head_}\r\n`);
      upstream.write(head);
      upstream.pipe(socket);
      socket.pipe(upstream);
    });
    upstream.on("error", () => socket.destroy());
    socket.on("error", () => upstream.destroy());
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  proxy.url = `ws://127.0.0.1:${server.address().port}`;
  proxy.close = () => server.close();
  return proxy;
}

/** Behind a proxy that refuses WebSocket: Server-Sent Events, then WebSocket. */
async function fallbackScenario() {
  const proxy = await startProxy(wsBase.replace("ws://", "http://"));
  const context = await browser.newContext();
  const tab = await context.newPage();
  tab.on("pageerror", (err) => console.error(`page error: ${err}`));
  await tab.goto(`${pageBase}/test/page.html?ws=${encodeURIComponent(proxy.url)}&tenant=acme&user=sid&retry=1500`);
  const until = (condition, arg) => tab.waitForFunction(condition, arg, { timeout: PATIENCE, polling: 20 });
  const connectedOver = (transport, times) =>
    until(([t, n]) => window.log.states.filter((s) => s.state === "connected" && s.transport === t).length >= n,
      [transport, times]);
  await connectedOver("eventstream", 1);

  // The user's messages and the topic's, over the event stream.
  await post("/v1/push", { users: ["sid"], data: 1 });
  await post("/v1/push", { topic: "news", data: 2 });
  await until(() => window.log.messages.length >= 2);

  // The node restarts: the stream resumes where it was.
  await ask("restart", "restarted");
  await connectedOver("eventstream", 2);
  await until(() => window.log.recovered.length >= 1);
  await post("/v1/push", { users: ["sid"], data: 3 });
  await until(() => window.log.messages.length >= 3);

  // The proxy lets WebSocket through: the client moves there.
  proxy.refusing = false;
  await connectedOver("websocket", 1);
  await post("/v1/push", { users: ["sid"], data: 4 });
  await post("/v1/push", { topic: "news", data: 5 });
  await until(() => window.log.messages.length >= 5);
  const log = await tab.evaluate(() => window.log);
  if (JSON.stringify(log.messages) !== JSON.stringify([1, 2, 3, 4, 5])) {
    throw new Error(`received ${JSON.stringify(log.messages)}, not each of 1…5 once, in order`);
  }
  if (proxy.upgrades < 1) throw new Error("no WebSocket went through the proxy");
  proxy.close();
}
