/**
 * The pushgate client: one WebSocket connection to a pushgate gateway that
 * stays up. It reconnects with full-jitter exponential backoff, resumes from
 * the last message it received (nothing pushed while it was away is lost,
 * within the tenant's history window), resubscribes its topics, refreshes
 * its token before it expires, and follows each close code's meaning (no
 * retry after a service logged the user out).
 *
 * Where WebSocket cannot pass (a proxy that refuses the upgrade, or a
 * connection that opens but never answers), it falls back to Server-Sent
 * Events with the same events and API, and tries WebSocket again every
 * `webSocketRetryMs`, moving back without losing or repeating a message.
 *
 * No runtime dependencies: it needs a WebSocket (browsers and Node.js 22+
 * have one; pass `WebSocket` otherwise) and, for the fallback, an
 * EventSource (browsers have one).
 */

/** A pushed message. */
export interface PushMessage {
  /** The message id the push API returned. */
  id: string;
  /** The topic it was pushed to, if it was. */
  topic?: string;
  /** The pushed JSON data, parsed. */
  data: unknown;
  /** Its position in the tenant's stream (opaque). */
  position?: string;
}

/** Where the connection stands. */
export type ConnectionState =
  /** Opening a connection (the first, or again after a drop). */
  | "connecting"
  /** Open: messages arrive. */
  | "connected"
  /** Dropped; a reconnect is scheduled. */
  | "disconnected"
  /** Closed for good: by `close()`, or a close code that forbids retrying. */
  | "closed";

/** How the client is connected. */
export type Transport = "websocket" | "eventstream";

export interface StateChange {
  state: ConnectionState;
  /** For `connected`: over what. */
  transport?: Transport;
  /** The WebSocket close code that caused it, if any. */
  code?: number;
  reason?: string;
  /** When the next attempt starts, for `disconnected` (milliseconds). */
  retryInMs?: number;
}

/** After a reconnect with a position: whether nothing was lost. */
export interface Recovered {
  /** False: messages were missed beyond the history; reload your state. */
  complete: boolean;
  /** Messages handed over from the history. */
  replayed: number;
}

export interface ClientError {
  /** The server's error code (`subscribe_denied`, `refresh_refused`, …). */
  code?: string;
  message: string;
  topic?: string;
}

export interface ClientEvents {
  message: PushMessage;
  state: StateChange;
  recovered: Recovered;
  error: ClientError;
}

export interface ClientOptions {
  /** The tenant's endpoint: `wss://push.example.com/ws/<tenant>`. */
  url: string;
  /**
   * Returns a token for the tenant's authenticator (a JWT), sent as the
   * `bearer.<token>` subprotocol. Called before each connection attempt
   * with `fresh = true` when the last attempt was refused or the token
   * expired, and before `exp` to refresh the open connection.
   */
  token?: (fresh: boolean) => string | Promise<string>;
  /** Extra query parameters (e.g. `user` for a development tenant). */
  params?: Record<string, string>;
  /** Topics to subscribe to from the start. */
  topics?: string[];
  /** First reconnect delay ceiling, ms (default 500). */
  minReconnectDelayMs?: number;
  /** Largest reconnect delay ceiling, ms (default 30 000). */
  maxReconnectDelayMs?: number;
  /**
   * After a server drain (1012) everyone reconnects: each waits a random
   * time up to this, ms (default 5 000), so that they do not all come at
   * once.
   */
  drainSpreadMs?: number;
  /**
   * Application ping interval while the page is visible, ms. By default
   * the client pings when the server's last pong says (`next_ping_ms`:
   * the node's `websocket.ping_interval`, on its heartbeat grid, so that a
   * node takes its clients' pings of a second together), and every
   * 25 000 ms before the first pong; set, it pings at this interval.
   */
  pingIntervalMs?: number;
  /** A ping not answered within this closes and reconnects, ms (default 10 000). */
  pongTimeoutMs?: number;
  /** Refresh the token this long before `exp`, ms (default 30 000). */
  refreshBeforeExpiryMs?: number;
  /** The WebSocket implementation, where the runtime has none. */
  WebSocket?: typeof WebSocket;
  /**
   * Fall back to Server-Sent Events when WebSocket cannot pass (default
   * true, where the runtime has an EventSource).
   */
  eventStream?: boolean;
  /** While on Server-Sent Events, try WebSocket again this often, ms (default 60 000). */
  webSocketRetryMs?: number;
  /** A WebSocket that opens but answers nothing within this falls back, ms (default 5 000). */
  firstFrameTimeoutMs?: number;
  /** The query parameter a token goes in on an event stream (default `token`). */
  tokenParam?: string;
  /** The EventSource implementation, where the runtime has none. */
  EventSource?: typeof EventSource;
}

/**
 * What the client needs of a connection: a WebSocket, or an event stream
 * with its commands posing as one.
 */
interface Channel {
  readonly readyState: number;
  send(text: string): void;
  close(code?: number, reason?: string): void;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  onopen: ((event: any) => void) | null;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  onmessage: ((event: any) => void) | null;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  onclose: ((event: any) => void) | null;
}

/**
 * A Server-Sent Events stream (`/sse/<tenant>`) as a channel: its first
 * event names the stream and the secret its commands carry to
 * `/sse/<tenant>/commands`, whose answers come back as frames; a `close`
 * frame ends it with its code.
 */
class EventStreamChannel implements Channel {
  readyState = 0;
  onopen: Channel["onopen"] = null;
  onmessage: Channel["onmessage"] = null;
  onclose: Channel["onclose"] = null;
  private stream?: number;
  private secret?: string;
  private readonly source: EventSource;
  /** Commands go one after the other: a stream takes one at a time. */
  private commands: Promise<unknown> = Promise.resolve();

  constructor(
    url: string,
    private readonly commandsUrl: string,
    Source: typeof EventSource,
  ) {
    this.source = new Source(url);
    this.source.onmessage = (event: MessageEvent) => this.received(String(event.data));
    // The browser would reconnect by itself, from its own idea of where:
    // the client reconnects instead, with its position.
    this.source.onerror = () => this.ended(1006, "the event stream failed");
  }

  private received(text: string): void {
    let frame: Record<string, unknown>;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    if (frame.type === "hello") {
      this.stream = Number(frame.stream);
      this.secret = String(frame.secret);
      this.readyState = 1;
      this.onopen?.({});
    } else if (frame.type === "close") {
      this.ended(Number(frame.code), String(frame.reason ?? ""));
    } else {
      this.onmessage?.({ data: text });
    }
  }

  private ended(code: number, reason: string): void {
    if (this.readyState === 3) {
      return;
    }
    this.readyState = 3;
    this.source.close();
    this.onclose?.({ code, reason });
  }

  send(text: string): void {
    if (this.readyState !== 1) {
      return;
    }
    const body = JSON.stringify({ stream: this.stream, secret: this.secret, command: JSON.parse(text) });
    // `text/plain`: a simple request, no preflight.
    this.commands = this.commands
      .then(() => fetch(this.commandsUrl, { method: "POST", headers: { "content-type": "text/plain" }, body }))
      .then((response) => response.text())
      .then((reply) => {
        if (this.readyState === 1 && reply) {
          this.onmessage?.({ data: reply });
        }
      })
      .catch(() => undefined);
  }

  close(): void {
    this.readyState = 3;
    this.source.close();
  }
}

/** Message ids remembered to drop one delivered twice across a move. */
const RECENT_IDS = 512;

/** Close codes after which reconnecting would not help. */
const FINAL_CODES: Record<number, string> = {
  4001: "replaced by a newer connection of the same user",
  4004: "the tenant was removed",
  4005: "too many refused subscriptions",
  4008: "disconnected by the service",
};
const DRAINING = 1012;
const TOKEN_EXPIRED = 4007;
const NORMAL = 1000;

type Listener<T> = (detail: T) => void;

export class PushgateClient {
  private readonly options: Required<
    Omit<ClientOptions, "token" | "params" | "topics" | "WebSocket" | "EventSource">
  > &
    ClientOptions;
  private readonly listeners: { [K in keyof ClientEvents]: Set<Listener<ClientEvents[K]>> } = {
    message: new Set(),
    state: new Set(),
    recovered: new Set(),
    error: new Set(),
  };
  private socket?: Channel;
  private viaEventStream = false;
  private currentToken?: string;
  private webSocketTimer?: ReturnType<typeof setTimeout>;
  private firstFrameTimer?: ReturnType<typeof setTimeout>;
  private readonly recentIds: string[] = [];
  private readonly seenIds = new Set<string>();
  private currentState: ConnectionState = "closed";
  private lastPosition?: string;
  private readonly topics = new Set<string>();
  private attempt = 0;
  private freshTokenNeeded = false;
  private opened = false;
  private stopped = true;
  private reconnectTimer?: ReturnType<typeof setTimeout>;
  private pingTimer?: ReturnType<typeof setTimeout>;
  /** Pings when the server's pongs say, unless `pingIntervalMs` was set. */
  private readonly followsServerPings: boolean;
  private pongTimer?: ReturnType<typeof setTimeout>;
  private refreshTimer?: ReturnType<typeof setTimeout>;
  private readonly onVisibility = () => this.pingNowIfVisible();

  constructor(options: ClientOptions) {
    this.followsServerPings = options.pingIntervalMs === undefined;
    this.options = {
      minReconnectDelayMs: 500,
      maxReconnectDelayMs: 30_000,
      drainSpreadMs: 5_000,
      pingIntervalMs: 25_000,
      pongTimeoutMs: 10_000,
      refreshBeforeExpiryMs: 30_000,
      eventStream: true,
      webSocketRetryMs: 60_000,
      firstFrameTimeoutMs: 5_000,
      tokenParam: "token",
      ...options,
    };
    for (const topic of options.topics ?? []) {
      this.topics.add(topic);
    }
  }

  /** Where the connection stands. */
  get state(): ConnectionState {
    return this.currentState;
  }

  /** How the client is connected now, or was last. */
  get transport(): Transport {
    return this.viaEventStream ? "eventstream" : "websocket";
  }

  /** The position of the last message received (opaque). */
  get position(): string | undefined {
    return this.lastPosition;
  }

  /** Listens to `type`; returns a function that stops listening. */
  on<K extends keyof ClientEvents>(type: K, listener: Listener<ClientEvents[K]>): () => void {
    this.listeners[type].add(listener);
    return () => this.listeners[type].delete(listener);
  }

  /** Opens the connection (and keeps it open until `close()`). */
  connect(): void {
    if (!this.stopped) {
      return;
    }
    this.stopped = false;
    this.attempt = 0;
    if (typeof document !== "undefined") {
      document.addEventListener("visibilitychange", this.onVisibility);
    }
    void this.open();
  }

  /** Closes the connection for good. */
  close(): void {
    this.stopped = true;
    this.clearTimers();
    if (typeof document !== "undefined") {
      document.removeEventListener("visibilitychange", this.onVisibility);
    }
    const socket = this.socket;
    this.socket = undefined;
    socket?.close(NORMAL, "closed by the client");
    this.setState({ state: "closed", code: NORMAL });
  }

  /** Subscribes to `topic` now and after every reconnect. */
  subscribe(topic: string): void {
    this.topics.add(topic);
    this.send({ type: "subscribe", topic });
  }

  /** Unsubscribes from `topic`. */
  unsubscribe(topic: string): void {
    this.topics.delete(topic);
    this.send({ type: "unsubscribe", topic });
  }

  private emit<K extends keyof ClientEvents>(type: K, detail: ClientEvents[K]): void {
    for (const listener of this.listeners[type]) {
      try {
        listener(detail);
      } catch (err) {
        // A listener's bug must not stop the client.
        setTimeout(() => {
          throw err;
        });
      }
    }
  }

  private setState(change: StateChange): void {
    this.currentState = change.state;
    this.emit("state", change);
  }

  private send(command: object): boolean {
    if (this.socket && this.socket.readyState === 1) {
      this.socket.send(JSON.stringify(command));
      return true;
    }
    return false;
  }

  /** The URL of the next attempt: parameters, topics, and where to resume. */
  private connectUrl(): string {
    const url = new URL(this.options.url);
    for (const [name, value] of Object.entries(this.options.params ?? {})) {
      url.searchParams.set(name, value);
    }
    if (this.topics.size > 0) {
      url.searchParams.set("topics", [...this.topics].join(","));
    }
    if (this.lastPosition) {
      url.searchParams.set("since", this.lastPosition);
    }
    return url.toString();
  }

  private async open(): Promise<void> {
    this.setState({ state: "connecting" });
    let token: string | undefined;
    if (this.options.token) {
      try {
        token = await this.options.token(this.freshTokenNeeded);
      } catch (err) {
        this.emit("error", { code: "token_unavailable", message: String(err) });
        this.scheduleReconnect(undefined, "no token");
        return;
      }
      this.freshTokenNeeded = false;
    }
    if (this.stopped) {
      return;
    }
    this.currentToken = token;
    const channel = this.viaEventStream ? this.openEventStream(token) : this.openWebSocket(token);
    if (!channel) {
      this.scheduleReconnect(undefined, "cannot connect");
      return;
    }
    this.adopt(channel);
  }

  private openWebSocket(token: string | undefined): Channel | undefined {
    const Socket = this.options.WebSocket ?? globalThis.WebSocket;
    const protocols = token ? ["pushgate.v1", `bearer.${token}`] : ["pushgate.v1"];
    try {
      return new Socket(this.connectUrl(), protocols);
    } catch (err) {
      this.emit("error", { message: `cannot connect: ${String(err)}` });
      return undefined;
    }
  }

  private eventSource(): typeof EventSource | undefined {
    return this.options.eventStream ? (this.options.EventSource ?? globalThis.EventSource) : undefined;
  }

  /** The event stream beside the WebSocket endpoint: `/ws/x` → `/sse/x`. */
  private openEventStream(token: string | undefined): Channel | undefined {
    const Source = this.eventSource();
    if (!Source) {
      return undefined;
    }
    const url = new URL(this.connectUrl());
    url.protocol = url.protocol === "wss:" ? "https:" : "http:";
    url.pathname = url.pathname.replace(/\/ws\/([^/]+)$/, "/sse/$1");
    if (token) {
      url.searchParams.set(this.options.tokenParam, token);
    }
    const commands = new URL(url.toString());
    commands.search = "";
    commands.pathname += "/commands";
    try {
      return new EventStreamChannel(url.toString(), commands.toString(), Source);
    } catch (err) {
      this.emit("error", { message: `cannot connect: ${String(err)}` });
      return undefined;
    }
  }

  /** Makes `channel` the connection: its frames, its opening and end. */
  private adopt(channel: Channel): void {
    this.socket = channel;
    this.opened = false;
    channel.onopen = () => {
      if (this.socket !== channel) {
        return;
      }
      this.opened = true;
      this.attempt = 0;
      this.setState({ state: "connected", transport: this.transport });
      this.startPings();
      if (this.currentToken) {
        this.scheduleRefresh(this.currentToken);
      }
      if (this.viaEventStream) {
        this.scheduleWebSocketRetry();
      } else if (this.eventSource()) {
        // A WebSocket that opens but answers nothing passes no frame.
        this.send({ type: "ping" });
        this.firstFrameTimer = setTimeout(() => {
          if (this.socket === channel) {
            this.viaEventStream = true;
            this.socket = undefined;
            channel.close(4000, "no first frame");
            this.clearTimers();
            this.closed(1006, "the WebSocket answered nothing");
          }
        }, this.options.firstFrameTimeoutMs);
      }
    };
    channel.onmessage = (event: MessageEvent) => {
      if (this.socket === channel && typeof event.data === "string") {
        clearTimeout(this.firstFrameTimer);
        this.firstFrameTimer = undefined;
        this.receive(event.data);
      }
    };
    channel.onclose = (event: CloseEvent) => {
      if (this.socket !== channel) {
        return;
      }
      this.socket = undefined;
      this.clearTimers();
      if (!this.opened) {
        // Refused at the handshake (a browser is not told why): the token
        // may be stale, so the next attempt asks for a fresh one; a
        // WebSocket that never opened may be refused by a proxy, so the
        // next attempt is an event stream.
        this.freshTokenNeeded = true;
        if (!this.viaEventStream && this.eventSource()) {
          this.viaEventStream = true;
        }
      }
      this.closed(event.code, event.reason);
    };
  }

  /**
   * While on an event stream, tries a WebSocket now and then; once one
   * opens (resuming from the last position), it becomes the connection
   * and the stream is closed. A message both bring is passed on once.
   */
  private scheduleWebSocketRetry(): void {
    clearTimeout(this.webSocketTimer);
    this.webSocketTimer = setTimeout(() => {
      this.webSocketTimer = undefined;
      if (this.stopped || !this.viaEventStream || !this.socket) {
        return;
      }
      const probe = this.openWebSocket(this.currentToken);
      if (!probe) {
        this.scheduleWebSocketRetry();
        return;
      }
      probe.onopen = () => {
        if (this.stopped || !this.viaEventStream || !this.socket) {
          probe.close(NORMAL, "not needed");
          return;
        }
        const stream = this.socket;
        this.socket = undefined;
        stream.close();
        this.clearTimers();
        this.viaEventStream = false;
        this.adopt(probe);
        probe.onopen?.({});
      };
      probe.onclose = () => {
        if (this.socket !== probe) {
          this.scheduleWebSocketRetry();
        }
      };
    }, this.options.webSocketRetryMs);
  }

  private receive(text: string): void {
    let frame: Record<string, unknown>;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    switch (frame.type) {
      case "message": {
        const id = String(frame.id);
        if (this.seenIds.has(id)) {
          break;
        }
        this.seenIds.add(id);
        this.recentIds.push(id);
        if (this.recentIds.length > RECENT_IDS) {
          this.seenIds.delete(this.recentIds.shift()!);
        }
        const position = typeof frame.pos === "string" ? frame.pos : undefined;
        if (position) {
          this.lastPosition = position;
        }
        this.emit("message", {
          id,
          topic: typeof frame.topic === "string" ? frame.topic : undefined,
          data: frame.data,
          position,
        });
        break;
      }
      case "recovered":
        this.emit("recovered", {
          complete: frame.complete === true,
          replayed: Number(frame.replayed ?? 0),
        });
        break;
      case "pong":
        clearTimeout(this.pongTimer);
        this.pongTimer = undefined;
        if (
          this.followsServerPings &&
          this.pingTimer !== undefined &&
          typeof frame.next_ping_ms === "number" &&
          frame.next_ping_ms > 0
        ) {
          this.schedulePing(frame.next_ping_ms);
        }
        break;
      case "error":
        this.emit("error", {
          code: typeof frame.code === "string" ? frame.code : undefined,
          message: String(frame.message ?? "error"),
          topic: typeof frame.topic === "string" ? frame.topic : undefined,
        });
        break;
      default:
        break;
    }
  }

  private closed(code: number, reason: string): void {
    if (this.stopped) {
      this.setState({ state: "closed", code, reason });
      return;
    }
    const final = FINAL_CODES[code];
    if (final) {
      this.stopped = true;
      this.setState({ state: "closed", code, reason: reason || final });
      return;
    }
    if (code === TOKEN_EXPIRED) {
      this.freshTokenNeeded = true;
    }
    this.scheduleReconnect(code, reason);
  }

  /** Full-jitter exponential backoff; a drain spreads everyone out. */
  private scheduleReconnect(code: number | undefined, reason: string): void {
    const { minReconnectDelayMs, maxReconnectDelayMs, drainSpreadMs } = this.options;
    const ceiling = Math.min(maxReconnectDelayMs, minReconnectDelayMs * 2 ** this.attempt);
    this.attempt += 1;
    const spread = code === DRAINING ? Math.max(ceiling, drainSpreadMs) : ceiling;
    const delay = Math.floor(Math.random() * spread);
    this.setState({ state: "disconnected", code, reason, retryInMs: delay });
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      if (!this.stopped) {
        void this.open();
      }
    }, delay);
  }

  private startPings(): void {
    this.schedulePing(this.options.pingIntervalMs);
  }

  /** The next ping in `afterMs`, then every `pingIntervalMs` unless a pong says otherwise. */
  private schedulePing(afterMs: number): void {
    clearTimeout(this.pingTimer);
    this.pingTimer = setTimeout(() => {
      this.schedulePing(this.options.pingIntervalMs);
      this.pingNowIfVisible();
    }, afterMs);
  }

  /**
   * An application ping, unless the page is hidden (its timers are slowed
   * and the server's own pings keep the connection alive): a ping not
   * answered in time means the connection is dead, however it looks.
   */
  private pingNowIfVisible(): void {
    const hidden = typeof document !== "undefined" && document.visibilityState === "hidden";
    if (hidden || this.pongTimer || !this.send({ type: "ping" })) {
      return;
    }
    const socket = this.socket;
    this.pongTimer = setTimeout(() => {
      this.pongTimer = undefined;
      if (this.socket === socket) {
        socket?.close(4000, "no pong");
        this.socket = undefined;
        this.clearTimers();
        this.closed(1006, "no answer to a ping");
      }
    }, this.options.pongTimeoutMs);
  }

  /** Sends a fresh token on the open connection before `token` expires. */
  private scheduleRefresh(token: string): void {
    const expiresAt = jwtExpiry(token);
    if (expiresAt === undefined) {
      return;
    }
    const wait = Math.max(0, expiresAt - Date.now() - this.options.refreshBeforeExpiryMs);
    clearTimeout(this.refreshTimer);
    this.refreshTimer = setTimeout(async () => {
      this.refreshTimer = undefined;
      try {
        const fresh = await this.options.token!(true);
        this.currentToken = fresh;
        if (this.send({ type: "refresh", token: fresh })) {
          this.scheduleRefresh(fresh);
        }
      } catch (err) {
        this.emit("error", { code: "token_unavailable", message: String(err) });
      }
    }, wait);
  }

  private clearTimers(): void {
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.pingTimer);
    clearTimeout(this.pongTimer);
    clearTimeout(this.refreshTimer);
    clearTimeout(this.webSocketTimer);
    clearTimeout(this.firstFrameTimer);
    this.webSocketTimer = undefined;
    this.firstFrameTimer = undefined;
    this.reconnectTimer = undefined;
    this.pingTimer = undefined;
    this.pongTimer = undefined;
    this.refreshTimer = undefined;
  }
}

/** A JWT's `exp` in milliseconds, if `token` is a JWT that has one. */
export function jwtExpiry(token: string): number | undefined {
  const payload = token.split(".")[1];
  if (!payload) {
    return undefined;
  }
  try {
    const base64 = payload.replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(base64.padEnd(Math.ceil(base64.length / 4) * 4, "=")));
    return typeof claims.exp === "number" ? claims.exp * 1000 : undefined;
  } catch {
    return undefined;
  }
}
