//! The byte stream under a client's WebSocket.
//!
//! A plain TCP client's socket is split: deliverers write whole frames to
//! its writing side directly, from the thread that delivers them (see
//! [`ConnectionHandle::enqueue`]), and the connection task writes its own
//! frames (pongs, replies, the close) through [`SharedTcp`], which goes
//! through the same lock and so never cuts a frame in two. A TLS client's
//! bytes must pass through the TLS session: its task writes everything.

use std::io::{self, Cursor};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Chain, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::delivery::ConnectionHandle;
use crate::edge::listener::Prefixed;

/// A client's connection after the upgrade.
pub(super) enum ClientIo {
    /// Plain TCP: split, for direct writes.
    Tcp(TcpHalves),
    /// Anything else (TLS): bytes pass through the connection task.
    Other(TokioIo<hyper::upgrade::Upgraded>),
}

/// A plain TCP client's socket, split.
pub(super) struct TcpHalves {
    /// What the client sent past the handshake, then the socket.
    read: Chain<Cursor<Vec<u8>>, OwnedReadHalf>,
    write: Arc<OwnedWriteHalf>,
}

impl ClientIo {
    pub(super) fn of(upgraded: hyper::upgrade::Upgraded) -> Self {
        match plain_tcp(upgraded) {
            Ok((early, stream)) => {
                let (read, write) = stream.into_split();
                Self::Tcp(TcpHalves {
                    read: Cursor::new(early).chain(read),
                    write: Arc::new(write),
                })
            }
            Err(upgraded) => Self::Other(TokioIo::new(upgraded)),
        }
    }
}

/// A plain TCP client's socket out of its upgraded connection, with the
/// bytes read ahead of it (the listener's and hyper's); the connection as
/// it was for anything else (TLS).
pub(in crate::edge) fn plain_tcp(
    upgraded: hyper::upgrade::Upgraded,
) -> Result<(Vec<u8>, TcpStream), hyper::upgrade::Upgraded> {
    let parts = upgraded.downcast::<TokioIo<Prefixed<TcpStream>>>()?;
    let (mut early, stream) = parts.io.into_inner().into_parts();
    early.extend_from_slice(&parts.read_buf);
    Ok((early, stream))
}

impl TcpHalves {
    /// The socket's writing side, for deliverers and for waiting until
    /// it drains.
    pub(super) fn writer(&self) -> Arc<OwnedWriteHalf> {
        self.write.clone()
    }

    /// The stream the WebSocket protocol runs on, writing through
    /// `handle`'s lock.
    pub(super) fn into_stream(self, handle: ConnectionHandle) -> SharedTcp {
        SharedTcp {
            read: self.read,
            write: self.write,
            handle,
        }
    }
}

/// A plain TCP client's stream as its task sees it: reads from the
/// socket, writes behind whatever a deliverer left half-written.
pub(super) struct SharedTcp {
    read: Chain<Cursor<Vec<u8>>, OwnedReadHalf>,
    write: Arc<OwnedWriteHalf>,
    handle: ConnectionHandle,
}

impl SharedTcp {
    fn tcp(&self) -> &TcpStream {
        (*self.write).as_ref()
    }
}

impl AsyncRead for SharedTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.handle.write_own(buf)? {
                Some(taken) => return Poll::Ready(Ok(taken)),
                None => ready!(self.tcp().poll_write_ready(cx))?,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.handle.write_unsent()? {
            ready!(self.tcp().poll_write_ready(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    /// The socket closes when the connection ends and its last holder
    /// lets go of it.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}
