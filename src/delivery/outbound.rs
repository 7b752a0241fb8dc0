//! One registered connection as delivery sees it: a bounded outbound
//! queue, a close request with its reason, a wake-up for the task that
//! serves the socket, and — for a plain TCP client — the socket's writing
//! side, so that a frame goes out from the thread that delivers it.
//!
//! Writes to sockets only through [`FrameSocket`]: something that takes
//! bytes without waiting or says it would block. Its one implementation
//! for a real socket, a plain TCP client's writing half (tokio's
//! `OwnedWriteHalf`), is here beside the trait; TLS clients have none and
//! are written by their task. The edge's connection task drains what the
//! socket did not take and obeys the close request.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::{Buf, Bytes};
use tokio::sync::Notify;

use super::close_reason::CloseReason;
use super::wire::WireFrame;
use crate::sync::lock;

/// Unique id of a connection within this node.
pub type ConnectionId = u64;

/// Session metadata: facts an authenticator established about a session.
pub type Metadata = BTreeMap<String, String>;

/// What became of a frame handed to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Written to the socket, or queued for the connection's task.
    Queued,
    /// The queue was full: the connection is being closed as a slow client.
    Overflowed,
    /// The connection had already ended.
    Gone,
}

/// Queues that grew past this many slots during a burst give their memory
/// back once drained: an idle connection should cost almost nothing.
const SHRINK_ABOVE_SLOTS: usize = 16;

/// Frames the connection's task writes in one system call.
const WRITE_BATCH: usize = 64;

/// A client socket's writing side, as delivery uses it: never waits.
pub trait FrameSocket: Send + Sync {
    /// Writes what the socket takes now; `WouldBlock` if nothing.
    fn try_write(&self, bytes: &[u8]) -> io::Result<usize>;
    /// The same for several buffers, in order, in one call.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

impl FrameSocket for tokio::net::tcp::OwnedWriteHalf {
    fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        tokio::net::tcp::OwnedWriteHalf::try_write(self, bytes)
    }

    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        tokio::net::tcp::OwnedWriteHalf::try_write_vectored(self, bufs)
    }
}

/// What waits to go out on one connection, and where it goes.
#[derive(Default)]
struct Outbound {
    /// Frames in order. A `VecDeque` allocates nothing until the first
    /// frame, unlike a channel, which allocates a block of slots up front:
    /// at a million idle connections that difference is gigabytes.
    frames: VecDeque<WireFrame>,
    /// The rest of the last write that the socket took only in part: it
    /// goes out before anything else, or the client would read a frame
    /// cut by another.
    unsent: Bytes,
    /// The client's socket, while a deliverer may write to it directly.
    /// `None` for a connection whose bytes must pass through its task
    /// (TLS), and once the connection ended.
    socket: Option<Arc<dyn FrameSocket>>,
}

/// A socket that took nothing of a non-empty write without saying it
/// would block is gone.
fn wrote_nothing() -> io::Error {
    io::Error::from(io::ErrorKind::WriteZero)
}

impl Outbound {
    /// The socket, for the connection's task (which writes only while it
    /// has one).
    fn socket(&self) -> io::Result<Arc<dyn FrameSocket>> {
        self.socket.clone().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotConnected,
                "the connection has no socket to write to",
            )
        })
    }

    /// Gives a queue's memory back once it is drained after a burst.
    fn shrink_if_drained(&mut self) {
        if self.frames.is_empty() && self.frames.capacity() > SHRINK_ABOVE_SLOTS {
            self.frames = VecDeque::new();
        }
    }

    /// Writes the unsent rest, if any; true when none is left.
    fn write_unsent(&mut self, socket: &dyn FrameSocket) -> io::Result<bool> {
        while !self.unsent.is_empty() {
            match socket.try_write(&self.unsent) {
                Ok(0) => return Err(wrote_nothing()),
                Ok(written) => self.unsent.advance(written),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(err) => return Err(err),
            }
        }
        Ok(true)
    }

    /// Writes queued frames, a batch per system call, until the queue is
    /// empty (true) or the socket takes no more (false).
    fn write_frames(&mut self, socket: &dyn FrameSocket) -> io::Result<bool> {
        if !self.write_unsent(socket)? {
            return Ok(false);
        }
        while !self.frames.is_empty() {
            let batch: Vec<IoSlice<'_>> = self
                .frames
                .iter()
                .take(WRITE_BATCH)
                .map(|f| IoSlice::new(f.as_bytes()))
                .collect();
            let result = socket.try_write_vectored(&batch);
            drop(batch);
            let mut written = match result {
                Ok(0) => return Err(wrote_nothing()),
                Ok(written) => written,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(err) => return Err(err),
            };
            while let Some(frame) = self.frames.front() {
                if written < frame.len() {
                    if written > 0 {
                        self.unsent = frame.tail(written);
                        self.frames.pop_front();
                    }
                    break;
                }
                written -= frame.len();
                self.frames.pop_front();
            }
            if !self.unsent.is_empty() {
                return Ok(false);
            }
        }
        self.shrink_if_drained();
        Ok(true)
    }
}

struct ConnectionShared {
    id: ConnectionId,
    /// When it was registered, in microseconds since the Unix epoch: the
    /// age that decides which connection a cap closes, on every node.
    opened_at_micros: u64,
    tenant: Arc<str>,
    user: Arc<str>,
    metadata: Arc<Metadata>,
    /// What waits to go out, and the socket it goes to: one lock, so that
    /// a frame written directly never overtakes one queued before it.
    outbound: Mutex<Outbound>,
    /// Frames the queue holds at most.
    capacity: usize,
    /// The topics it is subscribed to (kept with the index in
    /// [`SessionManager`](super::SessionManager)).
    topics: Mutex<Vec<Arc<str>>>,
    close_reason: OnceLock<CloseReason>,
    /// Set when the connection's task has ended.
    ended: AtomicBool,
    /// Wakes the connection's task: a frame was queued or a close was asked.
    wake: Notify,
}

/// A registered connection as the rest of the gateway sees it: where to
/// queue frames and how to ask it to close. Cheap to clone.
#[derive(Clone)]
pub struct ConnectionHandle(Arc<ConnectionShared>);

impl ConnectionHandle {
    /// A connection with an empty queue of at most `capacity` frames.
    pub(super) fn new(
        id: ConnectionId,
        tenant: Arc<str>,
        user: Arc<str>,
        metadata: Arc<Metadata>,
        capacity: usize,
    ) -> Self {
        Self(Arc::new(ConnectionShared {
            id,
            opened_at_micros: crate::clock::now_micros(),
            tenant,
            user,
            metadata,
            outbound: Mutex::default(),
            capacity,
            topics: Mutex::new(Vec::new()),
            close_reason: OnceLock::new(),
            ended: AtomicBool::new(false),
            wake: Notify::new(),
        }))
    }

    pub fn id(&self) -> ConnectionId {
        self.0.id
    }

    pub fn tenant(&self) -> &Arc<str> {
        &self.0.tenant
    }

    pub fn user(&self) -> &Arc<str> {
        &self.0.user
    }

    pub fn opened_at_micros(&self) -> u64 {
        self.0.opened_at_micros
    }

    /// The session's metadata. Sessions with equal metadata share one
    /// allocation (see [`SessionManager::register`](super::SessionManager::register)), so the pointer
    /// identifies the set.
    pub fn metadata(&self) -> &Arc<Metadata> {
        &self.0.metadata
    }

    pub(super) fn lock_topics(&self) -> std::sync::MutexGuard<'_, Vec<Arc<str>>> {
        lock(&self.0.topics)
    }

    fn lock_outbound(&self) -> std::sync::MutexGuard<'_, Outbound> {
        lock(&self.0.outbound)
    }

    /// Lets deliverers write frames straight to `socket` while nothing
    /// waits in the queue.
    pub fn attach_socket(&self, socket: Arc<dyn FrameSocket>) {
        self.lock_outbound().socket = Some(socket);
    }

    /// Ends direct writes (the connection is ending): the socket is then
    /// held by its task only, and closes with it.
    pub fn detach_socket(&self) {
        self.lock_outbound().socket = None;
    }

    /// Hands `frame` over without waiting: written to the socket at once
    /// when nothing is queued before it and the socket takes it, queued
    /// for the connection's task otherwise. A full queue closes the
    /// connection: one slow client must never hold up the others.
    pub fn enqueue(&self, frame: WireFrame) -> Enqueued {
        if self.0.close_reason.get().is_some() || self.0.ended.load(Ordering::Acquire) {
            return Enqueued::Gone;
        }
        let mut outbound = self.lock_outbound();
        // Checked again under the lock: once the task saw a close request,
        // it writes the close frame under this lock, and nothing may follow.
        if self.0.close_reason.get().is_some() {
            return Enqueued::Gone;
        }
        if outbound.frames.is_empty()
            && outbound.unsent.is_empty()
            && let Some(socket) = &outbound.socket
        {
            let written = socket.try_write(frame.as_bytes());
            match written {
                Ok(written) if written == frame.len() => return Enqueued::Queued,
                Ok(written) if written > 0 => {
                    // The rest goes first, from the task, when the socket
                    // drains.
                    outbound.unsent = frame.tail(written);
                    drop(outbound);
                    self.0.wake.notify_one();
                    return Enqueued::Queued;
                }
                // Full, or broken (the task finds out when it reads):
                // queued like any other frame.
                _ => {}
            }
        }
        if outbound.frames.len() >= self.0.capacity {
            drop(outbound);
            self.close(CloseReason::SlowClient);
            return Enqueued::Overflowed;
        }
        outbound.frames.push_back(frame);
        drop(outbound);
        // notify_one keeps a permit if the task is not waiting right now.
        self.0.wake.notify_one();
        Enqueued::Queued
    }

    /// Puts `frames`, in their order, ahead of every queued frame: what a
    /// resuming connection missed goes before what was delivered live to
    /// it meanwhile. Only before its task writes anything (nothing was
    /// written directly either: its socket is not attached yet).
    pub(super) fn enqueue_ahead(&self, frames: Vec<WireFrame>) {
        if self.0.close_reason.get().is_some() || self.0.ended.load(Ordering::Acquire) {
            return;
        }
        let mut outbound = self.lock_outbound();
        debug_assert!(outbound.socket.is_none() && outbound.unsent.is_empty());
        for frame in frames.into_iter().rev() {
            outbound.frames.push_front(frame);
        }
        drop(outbound);
        self.0.wake.notify_one();
    }

    /// Frames queued now (a resume counts what was delivered live to it
    /// before its marker, see `recovery`).
    pub(super) fn queued(&self) -> usize {
        self.lock_outbound().frames.len()
    }

    /// Drops the `count` oldest queued frames: before its task writes
    /// anything, what a resume reads back instead.
    pub(super) fn drop_oldest_queued(&self, count: usize) {
        let mut outbound = self.lock_outbound();
        debug_assert!(outbound.socket.is_none() && outbound.unsent.is_empty());
        let count = count.min(outbound.frames.len());
        outbound.frames.drain(..count);
    }

    /// A queue for this connection's user and metadata that no deliverer
    /// knows: frames made for the client (a resume's, through a plugin)
    /// before they join its real queue.
    pub(super) fn scratch(&self, capacity: usize) -> Self {
        Self::new(
            self.0.id,
            self.0.tenant.clone(),
            self.0.user.clone(),
            self.0.metadata.clone(),
            capacity.max(1),
        )
    }

    /// Takes the oldest queued frame, for a task that writes frames itself
    /// (a connection without a [`FrameSocket`]).
    pub fn next_frame(&self) -> Option<WireFrame> {
        let mut outbound = self.lock_outbound();
        let frame = outbound.frames.pop_front();
        outbound.shrink_if_drained();
        frame
    }

    /// Writes what waits (the unsent rest, then queued frames) while the
    /// socket takes it: true when nothing is left, false when the socket
    /// is full (wait until it is writable, then call again).
    pub fn write_queued(&self) -> io::Result<bool> {
        let mut outbound = self.lock_outbound();
        let socket = outbound.socket()?;
        outbound.write_frames(&*socket)
    }

    /// Writes `bytes` (whole frames the connection's task encoded: pongs,
    /// replies, close) behind the unsent rest. `None` while the socket
    /// still holds back that rest (wait until it is writable); otherwise
    /// all of `bytes` is taken, and what the socket did not take now is
    /// kept as the unsent rest.
    pub fn write_own(&self, bytes: &[u8]) -> io::Result<Option<usize>> {
        let mut outbound = self.lock_outbound();
        let socket = outbound.socket()?;
        if !outbound.write_unsent(&*socket)? {
            return Ok(None);
        }
        let written = match socket.try_write(bytes) {
            Ok(written) => written,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
            Err(err) => return Err(err),
        };
        if written < bytes.len() {
            outbound.unsent = Bytes::copy_from_slice(&bytes[written..]);
        }
        Ok(Some(bytes.len()))
    }

    /// Writes the unsent rest: true when none is left.
    pub fn write_unsent(&self) -> io::Result<bool> {
        let mut outbound = self.lock_outbound();
        match outbound.socket.clone() {
            Some(socket) => outbound.write_unsent(&*socket),
            None => Ok(true),
        }
    }

    /// True if frames (or the rest of one) wait for the connection's task.
    pub fn has_frames(&self) -> bool {
        let outbound = self.lock_outbound();
        !outbound.frames.is_empty() || !outbound.unsent.is_empty()
    }

    /// Asks the connection to close for `reason`. The first reason wins.
    pub fn close(&self, reason: CloseReason) {
        if self.0.close_reason.set(reason).is_ok() {
            self.0.wake.notify_one();
        }
    }

    /// Why the connection was asked to close, if it was.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.0.close_reason.get().copied()
    }

    /// Resolves when a frame was queued or a close was asked since the last
    /// wake-up (or right away if that happened while nobody waited).
    pub async fn woken(&self) {
        self.0.wake.notified().await;
    }

    /// Resolves once [`close`](Self::close) was called; returns the reason.
    pub async fn closed(&self) -> CloseReason {
        loop {
            if let Some(reason) = self.close_reason() {
                return reason;
            }
            self.woken().await;
        }
    }

    /// True once the connection was unregistered.
    pub(super) fn has_ended(&self) -> bool {
        self.0.ended.load(Ordering::Acquire)
    }

    /// Marks the connection as ended; true the first time only.
    pub(super) fn mark_ended(&self) -> bool {
        !self.0.ended.swap(true, Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A socket with room for a set number of bytes: what it took, in
    /// order, as a client would read it.
    #[derive(Default)]
    struct RoomySocket {
        room: AtomicUsize,
        taken: Mutex<Vec<u8>>,
    }

    impl RoomySocket {
        fn take(&self, bytes: &[u8]) -> io::Result<usize> {
            let room = self.room.load(Ordering::SeqCst);
            if room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = room.min(bytes.len());
            self.room.fetch_sub(n, Ordering::SeqCst);
            lock(&self.taken).extend_from_slice(&bytes[..n]);
            Ok(n)
        }
    }

    impl FrameSocket for RoomySocket {
        fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
            self.take(bytes)
        }

        fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let mut total = 0;
            for buf in bufs {
                match self.take(buf) {
                    Ok(n) => {
                        total += n;
                        if n < buf.len() {
                            break;
                        }
                    }
                    Err(err) if total == 0 => return Err(err),
                    Err(_) => break,
                }
            }
            Ok(total)
        }
    }

    fn connection(socket: &Arc<RoomySocket>, capacity: usize) -> ConnectionHandle {
        let handle =
            ConnectionHandle::new(1, Arc::from("t"), Arc::from("u"), Arc::default(), capacity);
        handle.attach_socket(socket.clone());
        handle
    }

    #[test]
    fn frames_go_out_whole_and_in_order_whoever_writes_them() {
        let socket = Arc::new(RoomySocket::default());
        let handle = connection(&socket, 8);
        let (a, b, c) = (
            WireFrame::text("first frame"),
            WireFrame::text("second"),
            WireFrame::text("third"),
        );
        // Room for part of the first frame: its rest waits, and what
        // follows queues behind it.
        socket.room.store(5, Ordering::SeqCst);
        assert_eq!(handle.enqueue(a.clone()), Enqueued::Queued);
        assert_eq!(handle.enqueue(b.clone()), Enqueued::Queued);
        assert!(handle.has_frames());
        // The task's own frame waits for the rest too.
        let own = WireFrame::text("pong");
        assert_eq!(handle.write_own(own.as_bytes()).unwrap(), None);
        assert!(!handle.write_queued().unwrap());

        socket.room.store(usize::MAX / 2, Ordering::SeqCst);
        assert!(handle.write_queued().unwrap());
        assert!(!handle.has_frames());
        assert_eq!(handle.write_own(own.as_bytes()).unwrap(), Some(own.len()));
        // Nothing waits: the next frame goes out at once.
        assert_eq!(handle.enqueue(c.clone()), Enqueued::Queued);
        assert!(!handle.has_frames());

        let expected: Vec<u8> = [&a, &b, &own, &c]
            .iter()
            .flat_map(|f| f.as_bytes().to_vec())
            .collect();
        assert_eq!(*lock(&socket.taken), expected);
    }

    #[test]
    fn a_full_socket_fills_the_queue_and_then_closes_a_slow_client() {
        let socket = Arc::new(RoomySocket::default());
        let handle = connection(&socket, 2);
        assert_eq!(handle.enqueue(WireFrame::text("a")), Enqueued::Queued);
        assert_eq!(handle.enqueue(WireFrame::text("b")), Enqueued::Queued);
        assert_eq!(handle.enqueue(WireFrame::text("c")), Enqueued::Overflowed);
        assert_eq!(handle.close_reason(), Some(CloseReason::SlowClient));
        assert_eq!(handle.enqueue(WireFrame::text("d")), Enqueued::Gone);
        assert!(lock(&socket.taken).is_empty());
    }

    #[test]
    fn a_detached_socket_takes_nothing_more() {
        let socket = Arc::new(RoomySocket::default());
        socket.room.store(1000, Ordering::SeqCst);
        let handle = connection(&socket, 4);
        handle.detach_socket();
        assert_eq!(handle.enqueue(WireFrame::text("late")), Enqueued::Queued);
        assert!(lock(&socket.taken).is_empty());
        assert_eq!(handle.next_frame(), Some(WireFrame::text("late")));
    }
}
