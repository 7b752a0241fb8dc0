/**
 * The pushgate client: one WebSocket connection to a pushgate gateway that
 * stays up. It reconnects with full-jitter exponential backoff, resumes from
 * the last message it received (nothing pushed while it was away is lost,
 * within the tenant's history window), resubscribes its topics, refreshes
 * its token before it expires, and follows each close code's meaning (no
 * retry after a service logged the user out).
 *
 * No runtime dependencies: it needs a WebSocket (browsers and Node.js 22+
 * have one; pass `WebSocket` otherwise).
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

export interface StateChange {
  state: ConnectionState;
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
  /** Application ping interval while the page is visible, ms (default 25 000). */
  pingIntervalMs?: number;
  /** A ping not answered within this closes and reconnects, ms (default 10 000). */
  pongTimeoutMs?: number;
  /** Refresh the token this long before `exp`, ms (default 30 000). */
  refreshBeforeExpiryMs?: number;
  /** The WebSocket implementation, where the runtime has none. */
  WebSocket?: typeof WebSocket;
}

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
    Omit<ClientOptions, "token" | "params" | "topics" | "WebSocket">
  > &
    ClientOptions;
  private readonly listeners: { [K in keyof ClientEvents]: Set<Listener<ClientEvents[K]>> } = {
    message: new Set(),
    state: new Set(),
    recovered: new Set(),
    error: new Set(),
  };
  private socket?: WebSocket;
  private currentState: ConnectionState = "closed";
  private lastPosition?: string;
  private readonly topics = new Set<string>();
  private attempt = 0;
  private freshTokenNeeded = false;
  private opened = false;
  private stopped = true;
  private reconnectTimer?: ReturnType<typeof setTimeout>;
  private pingTimer?: ReturnType<typeof setInterval>;
  private pongTimer?: ReturnType<typeof setTimeout>;
  private refreshTimer?: ReturnType<typeof setTimeout>;
  private readonly onVisibility = () => this.pingNowIfVisible();

  constructor(options: ClientOptions) {
    this.options = {
      minReconnectDelayMs: 500,
      maxReconnectDelayMs: 30_000,
      drainSpreadMs: 5_000,
      pingIntervalMs: 25_000,
      pongTimeoutMs: 10_000,
      refreshBeforeExpiryMs: 30_000,
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
    const Socket = this.options.WebSocket ?? globalThis.WebSocket;
    const protocols = token ? ["pushgate.v1", `bearer.${token}`] : ["pushgate.v1"];
    let socket: WebSocket;
    try {
      socket = new Socket(this.connectUrl(), protocols);
    } catch (err) {
      this.emit("error", { message: `cannot connect: ${String(err)}` });
      this.scheduleReconnect(undefined, "cannot connect");
      return;
    }
    this.socket = socket;
    this.opened = false;
    socket.onopen = () => {
      if (this.socket !== socket) {
        return;
      }
      this.opened = true;
      this.attempt = 0;
      this.setState({ state: "connected" });
      this.startPings();
      if (token) {
        this.scheduleRefresh(token);
      }
    };
    socket.onmessage = (event: MessageEvent) => {
      if (this.socket === socket && typeof event.data === "string") {
        this.receive(event.data);
      }
    };
    socket.onclose = (event: CloseEvent) => {
      if (this.socket !== socket) {
        return;
      }
      this.socket = undefined;
      this.clearTimers();
      if (!this.opened) {
        // Refused at the handshake (a browser is not told why): the token
        // may be stale, so the next attempt asks for a fresh one.
        this.freshTokenNeeded = true;
      }
      this.closed(event.code, event.reason);
    };
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
        const position = typeof frame.pos === "string" ? frame.pos : undefined;
        if (position) {
          this.lastPosition = position;
        }
        this.emit("message", {
          id: String(frame.id),
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
    clearInterval(this.pingTimer);
    this.pingTimer = setInterval(() => this.pingNowIfVisible(), this.options.pingIntervalMs);
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
    clearInterval(this.pingTimer);
    clearTimeout(this.pongTimer);
    clearTimeout(this.refreshTimer);
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
