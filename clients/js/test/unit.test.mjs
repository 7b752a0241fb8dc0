// Unit tests of the parts of the client that need no server.
import { test } from "node:test";
import assert from "node:assert/strict";
import { PushgateClient, jwtExpiry } from "../dist/index.js";

test("reads a JWT's exp, and nothing from what is not a JWT", () => {
  const claims = Buffer.from(JSON.stringify({ sub: "ann", exp: 1700000000 })).toString("base64url");
  assert.equal(jwtExpiry(`e30.${claims}.sig`), 1700000000 * 1000);
  assert.equal(jwtExpiry("opaque-token"), undefined);
  assert.equal(jwtExpiry("a.!!!.c"), undefined);
});

/** A WebSocket the test opens and speaks for: what the client sent, when. */
class ScriptedSocket {
  static last;
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.pings = [];
    this.onopen = this.onmessage = this.onclose = null;
    ScriptedSocket.last = this;
  }
  send(text) {
    if (JSON.parse(text).type === "ping") this.pings.push(Date.now());
  }
  close() {
    this.readyState = 3;
  }
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  deliver(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
}

async function until(what, check) {
  const deadline = Date.now() + 10_000;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

function connectedClient(options) {
  const client = new PushgateClient({
    url: "ws://127.0.0.1:1/ws/acme",
    eventStream: false,
    WebSocket: ScriptedSocket,
    ...options,
  });
  client.connect();
  return client;
}

test("pings when the server's pong says, on the node's heartbeat grid", async () => {
  const client = connectedClient({});
  await until("the socket", () => ScriptedSocket.last);
  const socket = ScriptedSocket.last;
  socket.open();
  // The first ping is 25 s away; a pong moves it.
  socket.deliver({ type: "pong", next_ping_ms: 50 });
  await until("the ping the pong asked for", () => socket.pings.length === 1);
  socket.deliver({ type: "pong", next_ping_ms: 80 });
  await until("the next one", () => socket.pings.length === 2);
  assert.ok(socket.pings[1] - socket.pings[0] >= 75, `${socket.pings}`);
  client.close();
});

test("pings at its own interval when one is set, whatever the pong says", async () => {
  ScriptedSocket.last = undefined;
  const client = connectedClient({ pingIntervalMs: 100 });
  await until("the socket", () => ScriptedSocket.last);
  const socket = ScriptedSocket.last;
  socket.open();
  await until("its own ping", () => socket.pings.length === 1);
  socket.deliver({ type: "pong", next_ping_ms: 60_000 });
  await until("the next at its interval", () => socket.pings.length === 2);
  client.close();
});
