//! A WebSocket connection's loop: writes what deliverers queued, answers
//! the client's commands, pings a client that went quiet (with a grace
//! for one that pings on its own), and ends the connection on the idle
//! timeout, an expired token, or a close from either side.

use std::sync::LazyLock;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::{
    CLOSE_TIMEOUT, ClientStream, ConnectionSettings, EndLabel, Registration, Writer, close,
    command, error_frame, fail,
};
use crate::delivery::{CloseReason, ConnectionHandle};

/// Frames a task without direct writes (TLS) writes before it flushes.
const WRITE_BATCH: usize = 64;

/// How much longer than the ping interval a client that pings on its own
/// may stay silent before the server pings it: a fifth of the interval,
/// within the idle timeout. A client pinging at the server's own interval
/// (the JavaScript client: 25 s against 25 s) would otherwise race the
/// server's timer on every turn, and whenever the timer won, both sides
/// paid for a ping nobody needed on top of the client's.
pub(super) fn ping_grace(ping_interval: Duration, idle_timeout: Duration) -> Duration {
    (ping_interval / 5).min(idle_timeout.saturating_sub(ping_interval) / 2)
}

/// The spacing of the node's heartbeat grid: a second, less for short
/// intervals, always well within the grace and the idle timeout.
///
/// Every heartbeat of the node falls on it: the server's pings, and the
/// pings of clients that follow the hint in its pong. An idle connection
/// costs the node little but the wake-up its heartbeat takes — measured
/// here at ~50–70 µs for a ping that arrives alone, against ~20 µs for
/// one of many handled in the same wake-up — so a node's heartbeats of a
/// second are better taken together than spread over it.
pub(super) fn heartbeat_grid(ping_interval: Duration, idle_timeout: Duration) -> Duration {
    Duration::from_secs(1)
        .min(ping_interval / 10)
        .min(idle_timeout.saturating_sub(ping_interval) / 4)
        .max(Duration::from_millis(1))
}

/// The first point of the grid of spacing `grid` at or after `at`.
fn on_grid(at: Instant, grid: Duration) -> Instant {
    static EPOCH: LazyLock<std::time::Instant> = LazyLock::new(std::time::Instant::now);
    let epoch = Instant::from_std(*EPOCH);
    let grid = grid.as_nanos().max(1);
    let since = at.saturating_duration_since(epoch).as_nanos();
    let offset = since.div_ceil(grid) * grid;
    epoch + Duration::from_nanos(u64::try_from(offset).unwrap_or(u64::MAX))
}

/// The application ping as the JavaScript client writes it (any other
/// spelling of a ping goes through [`command`], answered the same).
const PING_COMMAND: &str = r#"{"type":"ping"}"#;

/// The answer to an application ping: a pong saying when to ping next —
/// the server's interval, on the node's heartbeat grid.
pub(super) fn pong(settings: &ConnectionSettings) -> Message {
    let now = Instant::now();
    let next = on_grid(now + settings.ping_interval, settings.heartbeat_grid);
    let next_ping_ms = next.saturating_duration_since(now).as_millis();
    Message::Text(Utf8Bytes::from(format!(
        r#"{{"type":"pong","next_ping_ms":{next_ping_ms}}}"#
    )))
}

/// The connection's loop; returns how it ended.
pub(super) async fn drive(
    socket: &mut WebSocketStream<impl ClientStream>,
    registration: &mut Registration,
    settings: &ConnectionSettings,
    writer: &Writer,
) -> EndLabel {
    let handle = registration.handle.clone();
    let mut last_heard = Instant::now();
    // The handshake counts as the client speaking on its own.
    let mut next_ping = on_grid(
        last_heard + settings.ping_interval + settings.ping_grace,
        settings.heartbeat_grid,
    );
    // A write that cannot finish within the idle timeout means the client
    // stopped reading.
    let write_timeout = settings.idle_timeout;

    loop {
        // Checked before every wait: a wake-up consumed elsewhere (e.g. by
        // `closed()` during a write) never strands a frame or a close.
        if let Some(reason) = handle.close_reason() {
            if reason.flushes_queue() {
                // Boxed, as every ending below: a connection ends once,
                // and its task should not hold room for it all its life.
                let flushed = Box::pin(async {
                    while handle.has_frames() {
                        write_queued(socket, &handle, writer).await?;
                    }
                    Ok::<_, std::io::Error>(())
                });
                if !matches!(timeout(CLOSE_TIMEOUT, flushed).await, Ok(Ok(()))) {
                    return reason.label();
                }
            }
            close(socket, reason.code(), reason.text()).await;
            return reason.label();
        }
        if handle.has_frames() {
            tokio::select! {
                biased;
                reason = handle.closed() => {
                    // The socket may hold half a frame: drop it without
                    // waiting on a client that does not read.
                    return reason.label();
                }
                written = timeout(write_timeout, write_queued(socket, &handle, writer)) => match written {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) => return "write_error",
                    Err(_) => return "write_timeout",
                },
            }
        }
        // Checked on every turn: a client that keeps sending cannot hold
        // the expiry off (the timer below is the last branch).
        if registration
            .expires_at
            .is_some_and(|at| at <= Instant::now())
        {
            let reason = CloseReason::TokenExpired;
            close(socket, reason.code(), reason.text()).await;
            return reason.label();
        }
        tokio::select! {
            biased;
            () = handle.woken() => {}
            incoming = socket.next() => {
                last_heard = Instant::now();
                // A client heard from is alive: a ping of ours would only
                // cost both sides a frame and a wake-up. Put off here, not
                // when the timer fires, so that a client pinging on its
                // own (as the JavaScript client does) never wakes its task
                // for the timer: the answer to our ping puts the next one
                // an interval off, anything of the client's own the grace
                // more, for its next ping to arrive before ours.
                let grace = if matches!(incoming, Some(Ok(Message::Pong(_)))) {
                    Duration::ZERO
                } else {
                    settings.ping_grace
                };
                next_ping = on_grid(
                    last_heard + settings.ping_interval + grace,
                    settings.heartbeat_grid,
                );
                match incoming {
                    // Protocol pings and pongs cost a read (a ping also a
                    // reply): counted like commands.
                    Some(Ok(Message::Text(_) | Message::Binary(_) | Message::Ping(_) | Message::Pong(_)))
                        if !registration.admit_command() =>
                    {
                        let reason = CloseReason::CommandFlood;
                        close(socket, reason.code(), reason.text()).await;
                        return reason.label();
                    }
                    Some(Ok(Message::Text(text))) if text.as_str() == PING_COMMAND => {
                        // The JavaScript client's heartbeat, a million of
                        // them every 25 s: answered without parsing it.
                        if !send_within(socket, pong(settings), write_timeout).await {
                            return "write_timeout";
                        }
                    }
                    Some(Ok(Message::Text(text))) => {
                        // Boxed: commands are rare, and an idle connection's
                        // task should not hold room for one.
                        let (reply, then_close) =
                            Box::pin(command(&text, registration, settings)).await;
                        if !send_within(socket, reply, write_timeout).await {
                            return "write_timeout";
                        }
                        if let Some(reason) = then_close {
                            close(socket, reason.code(), reason.text()).await;
                            return reason.label();
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        let reply = error_frame("binary frames are not accepted; send JSON text");
                        if !send_within(socket, reply, write_timeout).await {
                            return "write_timeout";
                        }
                    }
                    Some(Ok(Message::Close(_))) => {
                        // tungstenite queued the close reply; send it.
                        let _ = timeout(CLOSE_TIMEOUT, socket.flush()).await;
                        return "client_closed";
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Err(err)) => return Box::pin(fail(socket, err)).await,
                    None => return "client_gone",
                }
            }
            // One timer for the ping and the token's expiry: an idle
            // connection holds no more than it did.
            () = sleep_until(registration.expires_at.map_or(next_ping, |at| at.min(next_ping))) => {
                if registration.expires_at.is_some_and(|at| at <= Instant::now()) {
                    let reason = CloseReason::TokenExpired;
                    close(socket, reason.code(), reason.text()).await;
                    return reason.label();
                }
                if Instant::now() < next_ping {
                    continue;
                }
                if last_heard.elapsed() >= settings.idle_timeout {
                    let reason = CloseReason::IdleTimeout;
                    close(socket, reason.code(), reason.text()).await;
                    return reason.label();
                }
                next_ping = on_grid(Instant::now() + settings.ping_interval, settings.heartbeat_grid)
                    .min(last_heard + settings.idle_timeout);
                if !send_within(socket, Message::Ping(Default::default()), write_timeout).await {
                    return "write_timeout";
                }
            }
        }
    }
}

/// Writes what deliverers left queued: all of it as the socket drains
/// (direct), or a batch with one flush (through the stream).
async fn write_queued(
    socket: &mut WebSocketStream<impl ClientStream>,
    handle: &ConnectionHandle,
    writer: &Writer,
) -> std::io::Result<()> {
    match writer {
        Writer::Direct(tcp) => {
            while !handle.write_queued()? {
                tcp.as_ref().writable().await?;
            }
            Ok(())
        }
        Writer::Stream => {
            // The protocol's own frames (a pong) first: frames are
            // written whole, never into the middle of another.
            socket.flush().await.map_err(std::io::Error::other)?;
            let stream = socket.get_mut();
            for _ in 0..WRITE_BATCH {
                match handle.next_frame() {
                    Some(frame) => stream.write_all(frame.as_bytes()).await?,
                    None => break,
                }
            }
            stream.flush().await
        }
    }
}

/// Sends `message`; false if the client did not take it within `limit`.
/// Boxed: an idle connection's task holds no room for a send.
fn send_within(
    socket: &mut WebSocketStream<impl ClientStream>,
    message: Message,
    limit: Duration,
) -> BoxFuture<'_, bool> {
    async move { timeout(limit, socket.send(message)).await.is_ok() }.boxed()
}
