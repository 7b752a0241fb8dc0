//! The byte stream under a Pusher client's WebSocket. Its task writes
//! every byte itself (deliverers queue the gateway's frames, which it
//! translates), so a plain TCP client's socket is taken whole out of the
//! HTTP server's wrapper, with the bytes read ahead of the upgrade: the
//! connection then holds nothing of the handshake.

use std::io::{self, Cursor};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::edge::ws::plain_tcp;

/// A Pusher client's stream after the upgrade.
pub(super) enum PusherIo {
    /// Plain TCP: what was read ahead, then the socket.
    Tcp(Cursor<Vec<u8>>, TcpStream),
    /// Anything else (TLS): through the upgraded connection.
    Other(TokioIo<hyper::upgrade::Upgraded>),
}

impl PusherIo {
    pub(super) fn of(upgraded: hyper::upgrade::Upgraded) -> Self {
        match plain_tcp(upgraded) {
            Ok((mut early, tcp)) => {
                early.shrink_to_fit();
                Self::Tcp(Cursor::new(early), tcp)
            }
            Err(upgraded) => Self::Other(TokioIo::new(upgraded)),
        }
    }
}

impl AsyncRead for PusherIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(early, tcp) => {
                if (early.position() as usize) < early.get_ref().len() {
                    return Pin::new(early).poll_read(cx, buf);
                }
                if !early.get_ref().is_empty() {
                    // Read: its memory goes.
                    *early = Cursor::new(Vec::new());
                }
                Pin::new(tcp).poll_read(cx, buf)
            }
            Self::Other(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PusherIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(_, tcp) => Pin::new(tcp).poll_write(cx, bytes),
            Self::Other(io) => Pin::new(io).poll_write(cx, bytes),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(_, tcp) => Pin::new(tcp).poll_flush(cx),
            Self::Other(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(_, tcp) => Pin::new(tcp).poll_shutdown(cx),
            Self::Other(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}
