//! The accept loop of one listener: TCP (and on the public listener the
//! PROXY protocol and TLS, if configured), connections per address, HTTP/1
//! with upgrades, and a graceful end.
//!
//! Knows nothing of what the routes do: it serves the router it is given.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request};
use axum::response::IntoResponse;
use dashmap::DashMap;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::api_error::ApiError;
use crate::config::Config;
use crate::metrics;
use crate::sync::Stop;

/// Largest request head (request line + headers) on the public listener;
/// larger heads get 431. hyper's minimum is 8 KiB.
const PUBLIC_MAX_HEAD_BYTES: usize = 16 * 1024;
/// Pause after a failed accept (e.g. out of file descriptors) so that the
/// loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Facts about the TCP connection a request arrived on, available to
/// handlers as a request extension.
#[derive(Clone)]
pub(crate) struct ConnectionContext {
    /// The TCP peer: the client, or a trusted proxy in front of it.
    pub(crate) remote: SocketAddr,
    /// The connection's slot in its address's quota; held (by the WebSocket
    /// task after an upgrade) until the connection ends.
    _slot: Option<Arc<AddressSlot>>,
    /// For a connection from a trusted proxy: the quota to take the
    /// client's slot from, once its address is known from the request.
    deferred: Option<Arc<AddressLimiter>>,
    trusted_proxies: Arc<[IpNet]>,
}

impl ConnectionContext {
    /// The client's address: the peer's, or for a trusted proxy the last
    /// address of `X-Forwarded-For` that is not a trusted proxy's.
    pub(crate) fn client(&self, headers: &HeaderMap) -> SocketAddr {
        let trusted = |ip: &IpAddr| self.trusted_proxies.iter().any(|net| net.contains(ip));
        if !trusted(&self.remote.ip()) {
            return self.remote;
        }
        let forwarded: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|hop| hop.trim().parse().ok())
            .collect();
        forwarded
            .into_iter()
            .rev()
            .find(|ip| !trusted(ip))
            .map_or(self.remote, |ip| SocketAddr::new(ip, 0))
    }

    /// For a connection from a trusted proxy, takes the client's slot of
    /// the per-address quota (held until `self` and the slot are dropped);
    /// `false` when the client's address has no slot left.
    pub(crate) fn take_client_slot(&mut self, client: IpAddr) -> bool {
        let Some(limiter) = self.deferred.take() else {
            return true;
        };
        match limiter.acquire(client) {
            Some(slot) => {
                self._slot = Some(Arc::new(slot));
                true
            }
            None => {
                ::metrics::counter!(metrics::CONNECTIONS_REFUSED).increment(1);
                false
            }
        }
    }
}

/// Counts concurrent connections per client IP address.
struct AddressLimiter {
    max_per_address: usize,
    counts: DashMap<IpAddr, usize>,
}

struct AddressSlot {
    limiter: Arc<AddressLimiter>,
    ip: IpAddr,
}

impl AddressLimiter {
    fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let mut count = self.counts.entry(ip).or_insert(0);
        if *count >= self.max_per_address {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            limiter: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        self.limiter.counts.remove_if_mut(&self.ip, |_, count| {
            *count -= 1;
            *count == 0
        });
    }
}

/// An accept loop serving one router over HTTP/1 with upgrades, until its
/// stop signal is on.
pub(crate) struct AcceptLoop {
    tcp: TcpListener,
    /// What every connection of this listener is served with.
    serving: Arc<Serving>,
}

/// How a listener serves each connection.
struct Serving {
    router: Router,
    http: http1::Builder,
    limiter: Option<Arc<AddressLimiter>>,
    /// Time a request in flight is given to finish once the loop stops.
    grace: Duration,
    /// Time a TLS handshake or a PROXY header may take (the request head
    /// has the same bound).
    handshake_timeout: Duration,
    stop: Arc<Stop>,
    tls: Option<TlsAcceptor>,
    trusted_proxies: Arc<[IpNet]>,
    /// Every connection starts with a PROXY protocol header (v1 or v2)
    /// naming the client.
    proxy_protocol: bool,
    /// Serves a Server-Sent Events request on its socket, without hyper
    /// (the public listener, without TLS; see [`read_event_stream_head`]).
    event_streams: Option<EventStreamServer>,
}

/// Serves one `GET /sse/…` request (its head read, its connection's
/// context in its extensions) on the client's socket.
pub(crate) type EventStreamServer =
    Arc<dyn Fn(Request<Body>, TcpStream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

impl AcceptLoop {
    /// The public listener: a short deadline and a small buffer for the
    /// request head, connections per address, TLS and the PROXY protocol
    /// if configured.
    pub(crate) fn public(
        tcp: TcpListener,
        (router, event_streams): (Router, EventStreamServer),
        config: &Config,
        tls: Option<TlsAcceptor>,
        stop: Arc<Stop>,
    ) -> Self {
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(config.websocket.handshake_timeout)
            .max_buf_size(PUBLIC_MAX_HEAD_BYTES);
        let serving = Serving {
            router,
            http,
            limiter: Some(Arc::new(AddressLimiter {
                max_per_address: config.websocket.max_connections_per_ip,
                counts: DashMap::new(),
            })),
            grace: config.shutdown.grace_period,
            handshake_timeout: config.websocket.handshake_timeout,
            stop,
            tls,
            trusted_proxies: config.listen.trusted_proxies.clone().into(),
            proxy_protocol: config.listen.proxy_protocol,
            event_streams: Some(event_streams),
        };
        Self {
            tcp,
            serving: Arc::new(serving),
        }
    }

    /// The internal listener: operators and business services only.
    pub(crate) fn internal(
        tcp: TcpListener,
        router: Router,
        config: &Config,
        stop: Arc<Stop>,
    ) -> Self {
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new());
        let serving = Serving {
            router,
            http,
            limiter: None,
            grace: config.shutdown.grace_period,
            handshake_timeout: config.websocket.handshake_timeout,
            stop,
            tls: None,
            trusted_proxies: Arc::from([]),
            proxy_protocol: false,
            event_streams: None,
        };
        Self {
            tcp,
            serving: Arc::new(serving),
        }
    }

    pub(crate) async fn run(self) {
        let mut stopping = pin!(self.serving.stop.triggered());
        loop {
            let accepted = tokio::select! {
                () = &mut stopping => break,
                accepted = self.tcp.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(self.serving.clone().serve(stream, peer));
                }
                Err(err) => {
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }
}

impl Serving {
    /// Serves one connection from `peer`.
    async fn serve(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let (stream, remote) = if self.proxy_protocol {
            match tokio::time::timeout(self.handshake_timeout, read_proxy_header(stream, peer))
                .await
            {
                Ok(Ok(read)) => read,
                Ok(Err(err)) => {
                    tracing::debug!(%peer, %err, "no valid PROXY header: connection dropped");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "no PROXY header in time: connection dropped");
                    return;
                }
            }
        } else {
            (Prefixed::new(Vec::new(), stream), peer)
        };
        let mut http = self.http.clone();
        let from_proxy = self
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&remote.ip()));
        let (router, slot, slot_ok) = match &self.limiter {
            None => (self.router.clone(), None, true),
            // The client behind a proxy is known from its request only.
            Some(_) if from_proxy => (self.router.clone(), None, true),
            Some(limiter) => match limiter.acquire(remote.ip()) {
                Some(slot) => (self.router.clone(), Some(Arc::new(slot)), true),
                None => {
                    ::metrics::counter!(metrics::CONNECTIONS_REFUSED).increment(1);
                    http.keep_alive(false);
                    (too_many_connections_router(), None, false)
                }
            },
        };
        let context = ConnectionContext {
            remote,
            _slot: slot,
            deferred: self.limiter.clone().filter(|_| from_proxy),
            trusted_proxies: self.trusted_proxies.clone(),
        };
        // An event stream lives for hours: served on its socket, it holds
        // none of hyper's buffers (16 KiB a connection).
        let mut stream = stream;
        if let (None, Some(serve_events), true) = (&self.tls, &self.event_streams, slot_ok) {
            match read_event_stream_head(stream, self.handshake_timeout).await {
                HeadRead::EventStream(mut request, tcp) => {
                    request.extensions_mut().insert(context);
                    serve_events(*request, tcp).await;
                    return;
                }
                HeadRead::Other(other) => stream = other,
                HeadRead::Gone => return,
            }
        }
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(context.clone());
            router.clone().oneshot(request.map(Body::new))
        });
        let stopping = self.stop.triggered();
        let grace = self.grace;
        match &self.tls {
            None => serve_http(http, stream, service, stopping, grace, remote).await,
            Some(acceptor) => {
                // The TLS handshake counts against the same timeout as
                // the request head: a slow one is a slowloris too.
                match tokio::time::timeout(self.handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        serve_http(http, stream, service, stopping, grace, remote).await;
                    }
                    Ok(Err(err)) => tracing::debug!(%remote, %err, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            }
        }
    }
}

/// Longest PROXY header read (v1 is at most 107 bytes; v2 is 16 bytes and
/// its addresses, plus TLVs a load balancer may add).
const MAX_PROXY_HEADER_BYTES: usize = 1024;

/// Why a connection from a load balancer brought no usable PROXY header.
#[derive(Debug, thiserror::Error)]
enum ProxyHeaderError {
    #[error("reading the PROXY header: {0}")]
    Read(#[from] std::io::Error),
    #[error("closed before a PROXY header")]
    Closed,
    #[error("PROXY header too long")]
    TooLong,
    #[error("PROXY v1: {0}")]
    V1(#[source] ppp::v1::BinaryParseError),
    #[error("PROXY v2: {0}")]
    V2(#[source] ppp::v2::ParseError),
}

/// Reads the PROXY protocol header (v1 or v2) a load balancer sends before
/// anything else, and returns the stream with what came after the header,
/// and the client's address (the peer's for `UNKNOWN`/`LOCAL`).
async fn read_proxy_header(
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Result<(Prefixed<TcpStream>, SocketAddr), ProxyHeaderError> {
    use ppp::{HeaderResult, PartialResult};
    use tokio::io::AsyncReadExt;
    let mut buffer = Vec::with_capacity(256);
    loop {
        let mut chunk = [0u8; 256];
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        buffer.extend_from_slice(&chunk[..read]);
        let header = HeaderResult::parse(&buffer);
        if header.is_incomplete() {
            if buffer.len() > MAX_PROXY_HEADER_BYTES {
                return Err(ProxyHeaderError::TooLong);
            }
            continue;
        }
        let (length, client) = match header {
            HeaderResult::V1(Ok(header)) => {
                let client = match header.addresses {
                    ppp::v1::Addresses::Tcp4(ip) => {
                        SocketAddr::from((ip.source_address, ip.source_port))
                    }
                    ppp::v1::Addresses::Tcp6(ip) => {
                        SocketAddr::from((ip.source_address, ip.source_port))
                    }
                    ppp::v1::Addresses::Unknown => peer,
                };
                (header.header.len(), client)
            }
            HeaderResult::V2(Ok(header)) => {
                let client = match header.addresses {
                    ppp::v2::Addresses::IPv4(ip) => {
                        SocketAddr::from((ip.source_address, ip.source_port))
                    }
                    ppp::v2::Addresses::IPv6(ip) => {
                        SocketAddr::from((ip.source_address, ip.source_port))
                    }
                    ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => peer,
                };
                (header.len(), client)
            }
            HeaderResult::V1(Err(err)) => return Err(ProxyHeaderError::V1(err)),
            HeaderResult::V2(Err(err)) => return Err(ProxyHeaderError::V2(err)),
        };
        let rest = buffer.split_off(length);
        return Ok((Prefixed::new(rest, stream), client));
    }
}

/// What the first bytes of a connection on the public listener are.
enum HeadRead {
    /// The head of a `GET /sse/{tenant}` request (no body), and the socket.
    EventStream(Box<Request<Body>>, TcpStream),
    /// Anything else: for hyper, with the bytes read so far.
    Other(Prefixed<TcpStream>),
    /// The client left, or sent no head in time.
    Gone,
}

/// The request line an event stream starts with.
const EVENT_STREAM_REQUEST: &[u8] = b"GET /sse/";

/// Reads a connection's first bytes: the whole head of an event stream's
/// request, or (as soon as they cannot be one) what hyper will read first.
async fn read_event_stream_head(stream: Prefixed<TcpStream>, patience: Duration) -> HeadRead {
    use tokio::io::AsyncReadExt;
    let mut stream = stream;
    let mut head = Vec::new();
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let mut chunk = [0u8; 2048];
        let read = match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return HeadRead::Gone,
            Ok(Ok(read)) => read,
        };
        head.extend_from_slice(&chunk[..read]);
        let starts = head.len().min(EVENT_STREAM_REQUEST.len());
        let hand_over = |head: Vec<u8>, stream: Prefixed<TcpStream>| {
            let (mut unread, tcp) = stream.into_parts();
            let mut bytes = head;
            bytes.append(&mut unread);
            HeadRead::Other(Prefixed::new(bytes, tcp))
        };
        if head[..starts] != EVENT_STREAM_REQUEST[..starts] || head.len() > PUBLIC_MAX_HEAD_BYTES {
            return hand_over(head, stream);
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                let mut request = Request::builder()
                    .method(axum::http::Method::GET)
                    .uri(parsed.path.unwrap_or("/"));
                for header in parsed.headers.iter() {
                    request = request.header(header.name, header.value);
                }
                // One tenant name after `/sse/`: anything else is hyper's
                // to answer (a 404, a bad request).
                let one_segment = parsed.path.is_some_and(|path| {
                    let name = path.split('?').next().unwrap_or("");
                    name.len() > EVENT_STREAM_REQUEST.len() - 4
                        && !name[EVENT_STREAM_REQUEST.len() - 4..].contains('/')
                });
                match request.body(Body::empty()) {
                    Ok(request) if one_segment && parsed.version == Some(1) => {
                        let (_, tcp) = stream.into_parts();
                        return HeadRead::EventStream(Box::new(request), tcp);
                    }
                    _ => return hand_over(head, stream),
                }
            }
            Ok(httparse::Status::Partial) => {}
            Err(_) => return hand_over(head, stream),
        }
    }
}

/// A stream that first yields bytes already read from it.
pub(crate) struct Prefixed<S> {
    prefix: Vec<u8>,
    read: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            read: 0,
            inner,
        }
    }

    /// The bytes not read yet of those read ahead, and the stream.
    pub(crate) fn into_parts(mut self) -> (Vec<u8>, S) {
        let unread = self.prefix.split_off(self.read);
        (unread, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.read < this.prefix.len() {
            let left = &this.prefix[this.read..];
            let take = left.len().min(buf.remaining());
            buf.put_slice(&left[..take]);
            this.read += take;
            if this.read == this.prefix.len() {
                this.prefix = Vec::new();
                this.read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Serves HTTP/1 (with upgrades) on one connection until it ends or the
/// listener stops, then lets requests in flight finish within `grace`.
async fn serve_http<I, S>(
    http: http1::Builder,
    io: I,
    service: S,
    stopping: impl Future<Output = ()>,
    grace: Duration,
    remote: SocketAddr,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = Body> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut connection = pin!(
        http.serve_connection(TokioIo::new(io), service)
            .with_upgrades()
    );
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(err) = result {
                tracing::debug!(%remote, %err, "HTTP connection ended with an error");
            }
        }
        () = stopping => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(grace, connection).await;
        }
    }
}

fn too_many_connections_router() -> Router {
    Router::new().fallback(|| async {
        ApiError::too_many_requests("too many connections from your address").into_response()
    })
}
