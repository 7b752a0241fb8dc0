// Drives pushgate's Pusher protocol with the real libraries, for
// tests/pusher.rs, which owns the nodes: pusher-js (in Node and, for the
// `browser` scenario, in Chromium) and Laravel Echo as clients, the
// `pusher` server library as the app's service (triggers, batches,
// channel queries, terminate_connections, and the app's auth endpoint).
//
//   node driver.mjs <scenario> <JSON arguments>
//
// Scenarios: `one-node` (with recovery), `two-nodes`, `browser`. Prints each
// step as it passes, then "ok"; exits 1 with the reason otherwise.
import assert from "node:assert/strict";
import http from "node:http";
import { createRequire } from "node:module";
import { readFile } from "node:fs/promises";

const require = createRequire(import.meta.url);
const Pusher = require("pusher-js");
const PusherService = require("pusher");
const { default: Echo } = await import("laravel-echo");
const { recoverPusher } = await import("../../clients/js/dist/pusher.js");

const [scenario, argsJson] = process.argv.slice(2);
const args = JSON.parse(argsJson);
const PATIENCE = 20_000;

function step(what) {
  console.log(`step ${what}`);
}

/** `promise`, or an error naming `what` after `ms`. */
function within(promise, what, ms = PATIENCE) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

/** The next `event` of a pusher-js bindable (a channel, a connection). */
function next(bindable, event, what = event) {
  return within(
    new Promise((resolve) => {
      const handler = (data) => {
        bindable.unbind(event, handler);
        resolve(data);
      };
      bindable.bind(event, handler);
    }),
    what,
  );
}

/** Waits until `condition()` holds (checked every 50 ms). */
async function until(what, condition) {
  const deadline = Date.now() + PATIENCE;
  for (;;) {
    if (await condition()) return;
    if (Date.now() > deadline) throw new Error(`${what}: never`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

function hostPort(address) {
  const url = new URL(address);
  return { host: url.hostname, port: url.port };
}

/** The app's service: the `pusher` library against a node's internal listener. */
function service(api, app, extra = {}) {
  const { host, port } = hostPort(api);
  return new PusherService({ appId: app.id, key: app.key, secret: app.secret, host, port, useTLS: false, ...extra });
}

/** The app's own auth endpoint, as its web server would offer it:
 *  `/auth?user=U` authorises channels (presence as member U),
 *  `/signin?user=U` signs U in. Any origin may call it (the browser test). */
async function authEndpoint(signer) {
  const server = http.createServer((request, response) => {
    let body = "";
    request.on("data", (chunk) => (body += chunk));
    request.on("end", () => {
      const url = new URL(request.url, "http://x");
      const form = new URLSearchParams(body);
      const user = url.searchParams.get("user");
      const socket = form.get("socket_id");
      let answer;
      if (url.pathname === "/auth") {
        const channel = form.get("channel_name");
        answer = channel.startsWith("presence-")
          ? signer.authorizeChannel(socket, channel, { user_id: user, user_info: { name: user } })
          : signer.authorizeChannel(socket, channel);
      } else {
        answer = signer.authenticateUser(socket, { id: user, name: user });
      }
      response.writeHead(200, { "content-type": "application/json", "access-control-allow-origin": "*" });
      response.end(JSON.stringify(answer));
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { base: `http://127.0.0.1:${server.address().port}`, close: () => server.close() };
}

function clientOptions(ws, auth, user) {
  const { host, port } = hostPort(ws.replace(/^ws/, "http"));
  return {
    wsHost: host,
    wsPort: Number(port),
    forceTLS: false,
    enabledTransports: ["ws"],
    cluster: "mt1",
    channelAuthorization: { endpoint: `${auth.base}/auth?user=${user}`, transport: "ajax" },
    userAuthentication: { endpoint: `${auth.base}/signin?user=${user}`, transport: "ajax" },
  };
}

async function connect(ws, app, auth, user) {
  const client = new Pusher(app.key, clientOptions(ws, auth, user));
  if (client.connection.state !== "connected") await next(client.connection, "connected", `${user} connects`);
  assert.match(client.connection.socket_id, /^\d+\.\d+$/);
  return client;
}

/** Subscribes and waits for `subscription_succeeded` (its data). */
async function subscribe(client, name) {
  const channel = client.subscribe(name);
  const outcome = await within(
    new Promise((resolve, reject) => {
      channel.bind("pusher:subscription_succeeded", resolve);
      channel.bind("pusher:subscription_error", (error) => reject(new Error(`${name}: ${JSON.stringify(error)}`)));
    }),
    `subscribed to ${name}`,
  );
  return [channel, outcome];
}

/** Every `event` a bindable receives, in order. */
function collect(bindable, event) {
  const seen = [];
  bindable.bind(event, (data) => seen.push(data));
  return seen;
}

async function nativePush(api, key, body) {
  const response = await fetch(`${api}/v1/push`, {
    method: "POST",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  assert.equal(response.status, 202, await response.text());
}

async function getJson(app, apiService, path, params = {}) {
  const response = await apiService.get({ path, params });
  assert.equal(response.status, 200);
  return response.json();
}

/** pusher-js, the `pusher` library and Laravel Echo against one node. */
async function oneNode() {
  const { ws, api, app, otherApp, pushKey } = args;
  const app1 = service(api, app);
  const auth = await authEndpoint(app1);
  const ann = await connect(ws, app, auth, "ann");
  const bob = await connect(ws, app, auth, "bob");

  step("public channel: a trigger and a batch reach every subscriber, in order");
  const [annNews] = await subscribe(ann, "news");
  const [bobNews] = await subscribe(bob, "news");
  const greeting = next(annNews, "greet");
  const bobGreeting = next(bobNews, "greet");
  await app1.trigger("news", "greet", { hello: "world" });
  assert.deepEqual(await greeting, { hello: "world" });
  assert.deepEqual(await bobGreeting, { hello: "world" });
  const batched = collect(annNews, "batched");
  await app1.triggerBatch([
    { channel: "news", name: "batched", data: { i: 1 } },
    { channel: "news", name: "batched", data: { i: 2 } },
  ]);
  await until("both batched events", () => batched.length === 2);
  assert.deepEqual(batched, [{ i: 1 }, { i: 2 }]);

  step("one gateway: a native push reaches Pusher clients, by its event name or as `message`");
  const named = next(annNews, "native");
  await nativePush(api, pushKey, { topic: "news", event: "native", data: { n: 1 } });
  assert.deepEqual(await named, { n: 1 });
  const unnamed = next(annNews, "message");
  await nativePush(api, pushKey, { topic: "news", data: { n: 2 } });
  assert.deepEqual(await unnamed, { n: 2 });

  step("socket_id: the triggering socket is left out");
  const annSkipped = collect(annNews, "skip");
  const bobSkip = next(bobNews, "skip");
  const annAfter = next(annNews, "after");
  await app1.trigger("news", "skip", { n: 3 }, { socket_id: ann.connection.socket_id });
  await app1.trigger("news", "after", { n: 4 });
  await bobSkip;
  await annAfter;
  assert.equal(annSkipped.length, 0, "the excluded socket received the event");

  step("private channel: signed subscriptions, client events to the others only");
  const [annOrders] = await subscribe(ann, "private-orders");
  const [bobOrders] = await subscribe(bob, "private-orders");
  const shipped = next(bobOrders, "shipped");
  await app1.trigger("private-orders", "shipped", { order: 7 });
  assert.deepEqual(await shipped, { order: 7 });
  const annTyping = collect(annOrders, "client-typing");
  const typing = next(bobOrders, "client-typing");
  assert.ok(annOrders.trigger("client-typing", { who: "ann" }));
  assert.deepEqual(await typing, { who: "ann" });
  // Published after the client event on the same channel: had the event
  // come back to ann, it would be there before this.
  const annMarker = next(annOrders, "marker");
  await app1.trigger("private-orders", "marker", {});
  await annMarker;
  assert.equal(annTyping.length, 0, "a client event came back to its sender");

  step("encrypted channel: the service's ciphertext, decrypted by pusher-js");
  const masterKey = Buffer.alloc(32, 7).toString("base64");
  const sealing = service(api, app, { encryptionMasterKeyBase64: masterKey });
  const sealedAuth = await authEndpoint(sealing);
  const carol = await connect(ws, app, sealedAuth, "carol");
  const [secrets] = await subscribe(carol, "private-encrypted-secrets");
  const sealed = next(secrets, "sealed");
  await sealing.trigger("private-encrypted-secrets", "sealed", { secret: "x" });
  assert.deepEqual(await sealed, { secret: "x" });

  step("presence channel: members, member_added, member_removed, users and channel queries");
  const [annRoom, annJoined] = await subscribe(ann, "presence-room");
  assert.equal(annJoined.count, 1);
  const added = next(annRoom, "pusher:member_added");
  const [bobRoom, bobJoined] = await subscribe(bob, "presence-room");
  assert.equal(bobJoined.count, 2);
  assert.deepEqual(Object.keys(bobJoined.members).sort(), ["ann", "bob"]);
  assert.deepEqual(await added, { id: "bob", info: { name: "bob" } });
  const users = await getJson(app, app1, "/channels/presence-room/users");
  assert.deepEqual(users.users.map((u) => u.id).sort(), ["ann", "bob"]);
  const rooms = await getJson(app, app1, "/channels", { filter_by_prefix: "presence-", info: "user_count" });
  assert.deepEqual(rooms.channels, { "presence-room": { user_count: 2 } });
  const news = await getJson(app, app1, "/channels/news", { info: "subscription_count" });
  assert.deepEqual(news, { occupied: true, subscription_count: 2 });
  const all = await getJson(app, app1, "/channels");
  for (const name of ["news", "private-orders", "presence-room", "private-encrypted-secrets"]) {
    assert.ok(name in all.channels, `${name} in ${JSON.stringify(all)}`);
  }
  const removed = next(annRoom, "pusher:member_removed");
  bob.unsubscribe("presence-room");
  assert.deepEqual(await removed, { id: "bob", info: { name: "bob" } });
  void bobRoom;

  step("sign-in: sendToUser and a native push to the user reach the user's connection");
  ann.signin();
  await within(ann.user.signinDonePromise, "ann signs in");
  await until("ann's user channel", () => ann.user.serverToUserChannel?.subscribed);
  const note = next(ann.user, "note");
  await app1.sendToUser("ann", "note", { hi: 1 });
  assert.deepEqual(await note, { hi: 1 });
  const nativeNote = next(ann.user, "note");
  await nativePush(api, pushKey, { users: ["ann"], event: "note", data: { hi: 2 } });
  assert.deepEqual(await nativeNote, { hi: 2 });
  // Still on its channels after signing in.
  const stillThere = next(annNews, "greet");
  await app1.trigger("news", "greet", { again: true });
  assert.deepEqual(await stillThere, { again: true });

  step("a forged signature and another app's signature are refused, and nothing is delivered");
  const forger = new Pusher(app.key, {
    ...clientOptions(ws, auth, "mallory"),
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) =>
        callback(null, service(api, otherApp).authorizeChannel(socketId, channelName)),
    },
  });
  await next(forger.connection, "connected", "mallory connects");
  const [forgerNews] = await subscribe(forger, "news");
  const forged = forger.subscribe("private-orders");
  const refusal = await next(forged, "pusher:subscription_error", "the forged subscription is refused");
  assert.equal(refusal.status, 401);
  const leaked = collect(forged, "shipped");
  const bobShipped = next(bobOrders, "shipped");
  await app1.trigger("private-orders", "shipped", { order: 8 });
  await bobShipped;
  // Pushed after it: had the refused channel been delivered, its event
  // would have come first.
  const forgerMarker = next(forgerNews, "marker");
  await app1.trigger("news", "marker", {});
  await forgerMarker;
  assert.equal(leaked.length, 0, "a refused subscriber received the channel's event");
  forger.disconnect();

  step("Laravel Echo: channel, private and join (presence) over pusher-js");
  const echo = new Echo({ broadcaster: "pusher", key: app.key, client: new Pusher(app.key, clientOptions(ws, auth, "dave")) });
  const echoGreeting = new Promise((resolve) => echo.channel("news").listen(".greet", resolve));
  const echoShipped = new Promise((resolve) => echo.private("orders").listen(".shipped", resolve));
  const here = new Promise((resolve) => echo.join("room").here(resolve));
  const herePeople = await within(here, "Echo's here()");
  assert.deepEqual(herePeople.map((m) => m.name).sort(), ["ann", "dave"]);
  await until("Echo subscribed", () => echo.connector.pusher.channel("private-orders")?.subscribed && echo.connector.pusher.channel("news")?.subscribed);
  await app1.trigger("news", "greet", { from: "echo-test" });
  await app1.trigger("private-orders", "shipped", { order: 9 });
  assert.deepEqual(await within(echoGreeting, "Echo's news event"), { from: "echo-test" });
  assert.deepEqual(await within(echoShipped, "Echo's private event"), { order: 9 });
  echo.disconnect();

  step("recovery: a client that reconnects gets what it missed, then pushgate:recovered");
  const frank = await connect(ws, app, auth, "frank");
  const kept = recoverPusher(frank);
  const [feed] = await subscribe(frank, "feed");
  const [privateFeed] = await subscribe(frank, "private-feed");
  const feedEvents = collect(feed, "item");
  const privateEvents = collect(privateFeed, "item");
  await app1.trigger("feed", "item", { n: 1 });
  await until("the first item", () => feedEvents.length === 1);
  assert.match(kept.since, /^[0-9a-f]+-\d+$/);
  frank.disconnect();
  await until("frank is gone", async () => !(await getJson(app, app1, "/channels")).channels.feed);
  // A watcher on the same channels: once it has them, so has the history.
  const [watchedFeed] = await subscribe(bob, "feed");
  const [watchedPrivate] = await subscribe(bob, "private-feed");
  const watched = collect(watchedFeed, "item");
  const watchedPrivately = collect(watchedPrivate, "item");
  await app1.trigger("feed", "item", { n: 2 });
  await app1.trigger("private-feed", "item", { p: 1 });
  await app1.trigger("feed", "item", { n: 3 });
  await until("the watcher has them", () => watched.length === 2 && watchedPrivately.length === 1);
  const feedRecovered = next(feed, "pushgate:recovered");
  const privateRecovered = next(privateFeed, "pushgate:recovered");
  frank.connect();
  assert.deepEqual(await feedRecovered, { complete: true, replayed: 2 });
  assert.deepEqual(await privateRecovered, { complete: true, replayed: 1 });
  assert.deepEqual(feedEvents, [{ n: 1 }, { n: 2 }, { n: 3 }]);
  assert.deepEqual(privateEvents, [{ p: 1 }]);
  // A channel first subscribed now asks for nothing.
  const [fresh] = await subscribe(frank, "fresh-feed");
  const freshRecovered = collect(fresh, "pushgate:recovered");
  const live = next(fresh, "item");
  await app1.trigger("fresh-feed", "item", { live: true });
  assert.deepEqual(await live, { live: true });
  assert.equal(freshRecovered.length, 0);
  frank.disconnect();

  step("terminate_connections: the user's connection is closed and does not come back");
  const closed = next(ann.connection, "disconnected", "ann is disconnected");
  const response = await app1.terminateUserConnections("ann");
  assert.equal(response.status, 200);
  await closed;
  assert.equal(ann.connection.state, "disconnected");

  for (const client of [bob, carol]) client.disconnect();
  auth.close();
  sealedAuth.close();
}

/** Two nodes on one broker: a client on each. */
async function twoNodes() {
  const { nodes, app, pushKey } = args;
  const [first, second] = nodes;
  const service1 = service(first.api, app);
  const service2 = service(second.api, app);
  const auth = await authEndpoint(service1);
  const ann = await connect(first.ws, app, auth, "ann");
  const bob = await connect(second.ws, app, auth, "bob");

  step("a trigger through either node reaches clients on both");
  const [annNews] = await subscribe(ann, "news");
  const [bobNews] = await subscribe(bob, "news");
  for (const [via, name] of [[service2, "from-second"], [service1, "from-first"]]) {
    const annGot = next(annNews, name);
    const bobGot = next(bobNews, name);
    await via.trigger("news", name, { via: name });
    assert.deepEqual(await annGot, { via: name });
    assert.deepEqual(await bobGot, { via: name });
  }
  const nativeGot = next(bobNews, "native");
  await nativePush(first.api, pushKey, { topic: "news", event: "native", data: { n: 1 } });
  assert.deepEqual(await nativeGot, { n: 1 });

  step("presence across nodes: members, member_added, users from either node");
  const [annRoom] = await subscribe(ann, "presence-room");
  await until("the second node knows ann is in the room", async () => {
    const users = await getJson(app, service2, "/channels/presence-room/users");
    return users.users.some((u) => u.id === "ann");
  });
  const added = next(annRoom, "pusher:member_added");
  const [, bobJoined] = await subscribe(bob, "presence-room");
  assert.deepEqual(Object.keys(bobJoined.members).sort(), ["ann", "bob"]);
  assert.deepEqual(await added, { id: "bob", info: { name: "bob" } });
  await until("the first node counts both", async () => {
    const rooms = await getJson(app, service1, "/channels", { filter_by_prefix: "presence-", info: "user_count" });
    return rooms.channels["presence-room"]?.user_count === 2;
  });

  step("a client event crosses nodes");
  const [annOrders] = await subscribe(ann, "private-orders");
  const [bobOrders] = await subscribe(bob, "private-orders");
  const typing = next(bobOrders, "client-typing");
  assert.ok(annOrders.trigger("client-typing", { who: "ann" }));
  assert.deepEqual(await typing, { who: "ann" });

  step("a member that goes is removed on the other node");
  const removed = next(annRoom, "pusher:member_removed");
  bob.disconnect();
  assert.deepEqual(await removed, { id: "bob", info: { name: "bob" } });

  step("recovery across nodes: a client gone from one node resumes on the other");
  const gone = await connect(first.ws, app, auth, "gina");
  const kept = recoverPusher(gone);
  const [feed] = await subscribe(gone, "feed");
  const firstItem = next(feed, "item");
  await service1.trigger("feed", "item", { n: 1 });
  assert.deepEqual(await firstItem, { n: 1 });
  gone.disconnect();
  // A watcher on the second node: once it has them, so has that node's history.
  const watcher = await connect(second.ws, app, auth, "walt");
  const [watchedFeed] = await subscribe(watcher, "feed");
  const watched = collect(watchedFeed, "item");
  await service2.trigger("feed", "item", { n: 2 });
  await service2.trigger("feed", "item", { n: 3 });
  await until("the watcher has them", () => watched.length === 2);
  watcher.disconnect();
  const back = new Pusher(app.key, clientOptions(second.ws, auth, "gina"));
  recoverPusher(back, kept);
  const backFeed = back.subscribe("feed");
  const items = collect(backFeed, "item");
  assert.deepEqual(await next(backFeed, "pushgate:recovered"), { complete: true, replayed: 2 });
  assert.deepEqual(items, [{ n: 2 }, { n: 3 }]);
  back.disconnect();

  step("terminate_connections through the other node");
  ann.signin();
  await within(ann.user.signinDonePromise, "ann signs in");
  const closed = next(ann.connection, "disconnected", "ann is disconnected");
  await service2.terminateUserConnections("ann");
  await closed;
  auth.close();
}

/** pusher-js's browser build in Chromium: public and presence channels. */
async function browser() {
  const { ws, api, app } = args;
  const { chromium } = createRequire(new URL("../../clients/js/package.json", import.meta.url))("playwright-core");
  const app1 = service(api, app);
  const auth = await authEndpoint(app1);
  const launched = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium", args: ["--no-sandbox"] });
  try {
    const page = await launched.newPage();
    const problems = [];
    page.on("pageerror", (error) => problems.push(error.message));
    await page.setContent("<!doctype html><title>pusher-js</title>");
    await page.addScriptTag({ content: await readFile(require.resolve("pusher-js/dist/web/pusher.min.js"), "utf8") });
    step("pusher-js in Chromium connects, subscribes and receives a trigger");
    await page.exposeFunction("trigger", (channel, event, data) => app1.trigger(channel, event, data).then(() => true));
    const outcome = await page.evaluate(
      async ({ key, options }) => {
        const pusher = new window.Pusher(key, options);
        const subscribed = (name) =>
          new Promise((resolve, reject) => {
            const channel = pusher.subscribe(name);
            channel.bind("pusher:subscription_succeeded", (data) => resolve([channel, data]));
            channel.bind("pusher:subscription_error", reject);
          });
        const [news] = await subscribed("news");
        const received = new Promise((resolve) => news.bind("greet", resolve));
        await window.trigger("news", "greet", { from: "service" });
        const greet = await received;
        const [, members] = await subscribed("presence-lobby");
        // Read before disconnecting, which empties the members.
        const seen = { greet, count: members.count, me: members.me?.id, socketId: pusher.connection.socket_id };
        pusher.disconnect();
        return seen;
      },
      { key: app.key, options: clientOptions(ws, auth, "erin") },
    );
    assert.deepEqual(outcome.greet, { from: "service" });
    assert.equal(outcome.count, 1, JSON.stringify(outcome));
    assert.equal(outcome.me, "erin", JSON.stringify(outcome));
    assert.match(outcome.socketId, /^\d+\.\d+$/);
    assert.deepEqual(problems, []);
  } finally {
    await launched.close();
    auth.close();
  }
}

const scenarios = { "one-node": oneNode, "two-nodes": twoNodes, browser };
try {
  await within(scenarios[scenario](), scenario, 120_000);
  console.log("ok");
  process.exit(0);
} catch (error) {
  console.log(`failed: ${error.stack ?? error}`);
  process.exit(1);
}
