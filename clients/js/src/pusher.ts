/**
 * Recovery for pusher-js against a pushgate app with `recovery = true`:
 * the client keeps the position of the last event it received, and each
 * subscription it makes again after a reconnect — on any node — asks for
 * what it missed since (`since`). pushgate sends the channel's missed
 * events, then `pushgate:recovered` with `{complete, replayed}`
 * (`complete: false`: events older than the tenant's history were lost,
 * reload the channel's state).
 *
 * The protocol has no positions: pushgate adds `pos` to each event frame
 * (other servers and clients ignore it) and reads `since` in
 * `pusher:subscribe`. pusher-js keeps neither, so this reads each frame
 * as it arrives and adds `since` to the subscriptions it sends.
 */

/** The parts of a pusher-js client this uses (pusher-js 8). */
export interface PusherClientLike {
  send_event(name: string, data: unknown, channel?: string): boolean;
  allChannels(): { name: string }[];
  subscribe(name: string): unknown;
  connection: {
    state: string;
    bind(event: string, callback: (change?: { current: string }) => void): void;
    connection?: {
      transport?: { bind(event: string, callback: (message: { data?: unknown }) => void): void };
    } | null;
  };
}

/** Where a recovering client stands: the position of the last event it
 * received, to carry over to a client made anew (another page, a node
 * chosen again). */
export interface PusherRecovery {
  since?: string;
}

/**
 * Makes `pusher` recover what it missed while disconnected. Pass the
 * `state` of an earlier client to carry its position over. Returns the
 * state it keeps up to date.
 */
export function recoverPusher(pusher: PusherClientLike, state: PusherRecovery = {}): PusherRecovery {
  // Where each channel resumes from: the position when the connection
  // was lost (or, for a channel first subscribed while disconnected, when
  // it was subscribed). Taken by the channel's next subscription, which
  // pusher-js sends once connected (a private one once authorised, after
  // others may have replayed events that moved the position on). A
  // channel first subscribed while connected asks for nothing.
  const pending = new Map<string, string | undefined>();
  const subscribe = pusher.subscribe.bind(pusher);
  pusher.subscribe = (name) => {
    const known = pusher.allChannels().some((channel) => channel.name === name);
    if (!known && pusher.connection.state !== "connected") {
      pending.set(name, state.since);
    }
    return subscribe(name);
  };
  const send = pusher.send_event.bind(pusher);
  pusher.send_event = (name, data, channel) => {
    const asked = typeof data === "object" && data !== null ? (data as { channel?: unknown }).channel : undefined;
    if (name === "pusher:subscribe" && typeof asked === "string" && pending.has(asked)) {
      const since = pending.get(asked);
      pending.delete(asked);
      if (since) {
        data = { ...(data as object), since };
      }
    }
    return send(name, data, channel);
  };
  pusher.connection.bind("state_change", (change) => {
    if (change?.current !== "connected") {
      for (const channel of pusher.allChannels()) {
        if (!pending.has(channel.name)) {
          pending.set(channel.name, state.since);
        }
      }
    }
  });
  const watch = () => {
    pusher.connection.connection?.transport?.bind("message", (message) => {
      if (typeof message.data !== "string" || !message.data.includes('"pos"')) {
        return;
      }
      try {
        const frame = JSON.parse(message.data);
        if (typeof frame.pos === "string") {
          state.since = frame.pos;
        }
      } catch {
        // Not JSON: pusher-js reports it.
      }
    });
  };
  pusher.connection.bind("connected", watch);
  watch();
  return state;
}
