//! A WebSocket frame as it leaves the server: header and payload encoded
//! once, then written as they are to every recipient.
//!
//! A server's frames are unmasked (RFC 6455 §5.1), so their bytes on the
//! wire are the same for every client: a broadcast to 10,000 connections
//! encodes one frame and shares it (reference-counted), and each
//! recipient costs the write of those bytes to its socket, nothing more.
//!
//! Also the one JSON frame a client receives for each message
//! ([`message_frame`]), serialised once per message.

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::bus::envelope::{Envelope, Position, Target};

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
        std::str::from_utf8(&self.0[self.header_len()..]).expect("a text frame holds UTF-8")
    }

    /// The payload's bytes, sharing this frame's memory (an event stream
    /// writes them after its own prefix).
    pub fn payload_bytes(&self) -> Bytes {
        self.0.slice(self.header_len()..)
    }

    /// The header is 2, 4 or 10 bytes: 2, plus 2 for a 16-bit length
    /// (second byte 126) or 8 for a 64-bit one (127).
    fn header_len(&self) -> usize {
        match self.0[1] & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        }
    }
}

impl std::fmt::Debug for WireFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("WireFrame").field(&self.payload()).finish()
    }
}

/// The JSON frame a client receives for each message.
#[derive(Serialize)]
struct MessageFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    /// The event's name, if its publisher gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a str>,
    /// The Pusher socket the message skips (a Pusher client reads it; a
    /// native client has no socket id and ignores it).
    #[serde(skip_serializing_if = "Option::is_none")]
    except_socket: Option<&'a str>,
    /// Where the message sits in its tenant's stream: what a client that
    /// reconnects presents as `since`.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "as_text")]
    pos: Option<Position>,
    data: &'a RawValue,
}

/// Writes a position as its text, without an intermediate `String`.
fn as_text<S: serde::Serializer>(position: &Option<Position>, out: S) -> Result<S::Ok, S::Error> {
    match position {
        Some(position) => out.collect_str(position),
        None => out.serialize_none(),
    }
}

/// Serialises the client frame of `envelope` once.
pub fn message_frame(envelope: &Envelope) -> Result<WireFrame, serde_json::Error> {
    frame_with_data(envelope, &envelope.data)
}

/// The client frame of `envelope` carrying `data` (JSON text) instead of
/// its own data, e.g. as a plugin personalised it.
pub fn frame_with_data(envelope: &Envelope, data: &str) -> Result<WireFrame, serde_json::Error> {
    let data: &RawValue = serde_json::from_str(data)?;
    let topic = match &envelope.target {
        Target::Topic(topic) => Some(topic.as_str()),
        Target::Users(_) | Target::Broadcast => None,
    };
    let json = serde_json::to_string(&MessageFrame {
        kind: "message",
        id: &envelope.id,
        topic,
        event: envelope.event.as_deref(),
        except_socket: envelope.except_socket.as_deref(),
        pos: envelope.position.get().copied(),
        data,
    })?;
    Ok(WireFrame::text(json))
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

    #[test]
    fn frame_embeds_data_verbatim_and_names_the_topic() {
        let envelope = Envelope::new("t", Target::Topic("news".into()), r#"{"x":[1,2]}"#.into());
        let frame = message_frame(&envelope).unwrap();
        let parsed: serde_json::Value = serde_json::from_str(frame.payload()).unwrap();
        assert_eq!(parsed["type"], "message");
        assert_eq!(parsed["id"], envelope.id.as_str());
        assert_eq!(parsed["topic"], "news");
        assert_eq!(parsed["data"], serde_json::json!({"x":[1,2]}));
    }

    #[test]
    fn frame_of_a_user_message_has_no_topic() {
        let envelope = Envelope::new("t", Target::Users(vec!["u".into()]), "1".into());
        let frame = message_frame(&envelope).unwrap();
        assert!(!frame.payload().contains("topic"), "{frame:?}");
    }
}
