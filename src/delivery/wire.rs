//! A WebSocket frame as it leaves the server: header and payload encoded
//! once, then written as they are to every recipient.
//!
//! A server's frames are unmasked (RFC 6455 §5.1), so their bytes on the
//! wire are the same for every client: a broadcast to 10,000 connections
//! encodes one frame and shares it (reference-counted), and each
//! recipient costs the write of those bytes to its socket, nothing more.

use bytes::Bytes;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// An encoded, final, unmasked text frame. Cheap to clone.
#[derive(Clone, PartialEq, Eq)]
pub struct WireFrame(Bytes);

impl WireFrame {
    /// The text frame carrying `text` (JSON, in practice).
    pub fn text(text: impl Into<Bytes>) -> Self {
        let frame = Frame::message(text, OpCode::Data(Data::Text), true);
        let mut encoded = Vec::with_capacity(frame.len());
        frame
            .format(&mut encoded)
            .expect("writing to a Vec cannot fail");
        Self(Bytes::from(encoded))
    }

    /// The bytes as they go on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The bytes from `offset` on, sharing this frame's memory: what is
    /// left to write after a socket took part of it.
    pub fn tail(&self, offset: usize) -> Bytes {
        self.0.slice(offset..)
    }

    /// Bytes on the wire (header and payload).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The payload: the text a client receives.
    pub fn payload(&self) -> &str {
        // The header is 2, 4 or 10 bytes: 2, plus 2 for a 16-bit length
        // (second byte 126) or 8 for a 64-bit one (127).
        let header = match self.0[1] & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        std::str::from_utf8(&self.0[header..]).expect("a text frame holds UTF-8")
    }
}

impl std::fmt::Debug for WireFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("WireFrame").field(&self.payload()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

    /// Every length class of the header parses back (with tungstenite's
    /// own parser) to the same text, final and unmasked.
    #[test]
    fn frames_of_every_length_class_parse_back_to_their_text() {
        for length in [0, 1, 125, 126, 65_535, 65_536, 200_000] {
            let text = "x".repeat(length);
            let frame = WireFrame::text(text.clone());
            let mut cursor = Cursor::new(frame.as_bytes());
            let (header, payload_length) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert!(header.is_final);
            assert!(header.mask.is_none());
            assert_eq!(header.opcode, OpCode::Data(Data::Text));
            assert_eq!(payload_length, length as u64);
            assert_eq!(cursor.position() as usize + length, frame.len());
            assert_eq!(frame.payload(), text);
        }
    }

    #[test]
    fn a_tail_shares_the_frame_from_an_offset() {
        let frame = WireFrame::text("hello");
        assert_eq!(&frame.tail(2)[..], &frame.as_bytes()[2..]);
        assert_eq!(&frame.tail(2)[..], b"hello");
    }
}
