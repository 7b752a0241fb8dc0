//! The message envelope that crosses the bus, and the versioned binary form
//! of everything that crosses it ([`Record`]: a message, a control event
//! of the cluster, or one of the bus's own probes and barriers).
//!
//! Wire form: one byte major version, one byte minor version, then the
//! postcard encoding of [`Record`]. Within a major version fields are only
//! ever appended, so a reader ignores what a newer minor added; a newer
//! major is refused with [`EnvelopeError::NewerMajor`] rather than misread.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::clock::now_micros;

/// Major version written by this build; readers refuse larger ones.
pub const ENVELOPE_MAJOR: u8 = 2;
/// Minor version written by this build.
pub const ENVELOPE_MINOR: u8 = 2;
/// Zero bytes that read, as the fields appended since minor 0, as "none"
/// each: an event name, an excepted socket, a probe's routing report.
/// (An older record ends where its appended fields begin, and trailing
/// bytes are ignored, so one padding serves every older minor.)
const APPENDED_AS_NONE: [u8; 3] = [0, 0, 0];

/// Whom a message is for, within its tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// Every connection of each of these users.
    Users(Vec<String>),
    /// Every connection subscribed to this topic.
    Topic(String),
    /// Every connection of the tenant.
    Broadcast,
}

/// One pushed message on its way to the nodes that deliver it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique, time-ordered message id (UUID v7), returned to the pusher.
    pub id: String,
    pub tenant: String,
    pub target: Target,
    /// The message payload: JSON text, validated when it was pushed.
    pub data: String,
    /// When the push API accepted it, in microseconds since the Unix epoch.
    pub published_at_micros: u64,
    /// The caller's key for this message: within a window, every node
    /// delivers at most one message of the tenant with the same key.
    pub idempotency_key: Option<String>,
    /// The event's name, when its publisher gave one (a Pusher API
    /// trigger, or `event` in a push): what a Pusher client binds to.
    /// (Appended in minor 1.)
    pub event: Option<String>,
    /// A Pusher client's `socket_id` that does not receive the message:
    /// the one whose action triggered it. (Appended in minor 1.)
    pub except_socket: Option<String>,
    /// Where the message sits in its tenant's stream, the same on every
    /// node: set by the bus as it hands the message to delivery (not on
    /// the wire: the broker's queue offset is the position).
    #[serde(skip)]
    pub position: OnceLock<Position>,
}

/// A message's place in its tenant's stream: which stream (a broker queue;
/// on the local bus, this run of the node) and the offset in it. Every
/// node gives a message the same position, so a client can resume from
/// it on any node. Clients see it as opaque text, `<stream hex>-<offset>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Position {
    pub stream: u64,
    pub offset: u64,
}

impl Position {
    /// The stream id of broker `broker`'s queue `queue`: the same on every
    /// node, for messages and control records alike.
    pub fn stream_of(broker: &str, queue: impl std::fmt::Display) -> u64 {
        crate::stable_hash::stable_hash(format!("{broker}/{queue}").as_bytes()) >> 16
    }

    /// Reads what `Display` wrote; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let (stream, offset) = text.split_once('-')?;
        if stream.is_empty() || stream.len() > 16 || offset.is_empty() || offset.len() > 20 {
            return None;
        }
        if !offset.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Self {
            stream: u64::from_str_radix(stream, 16).ok()?,
            offset: offset.parse().ok()?,
        })
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}-{}", self.stream, self.offset)
    }
}

/// One item on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub enum Record {
    Message(Envelope),
    /// A control event of the cluster, in the cluster's own binary form:
    /// the bus carries it to every node, this one included, in order.
    Control(Vec<u8>),
    /// A node is alive. Its own probe coming back also proves to a node
    /// that its consumer receives. A new `started_at_micros` means the
    /// node restarted.
    Probe {
        origin: String,
        started_at_micros: u64,
        /// Said by a node that routes pushes to their users' nodes
        /// (appended in minor 2).
        routing: Option<RoutingReport>,
    },
    /// Sent by a draining node to every queue of the topic: once all copies
    /// came back, it has received everything stored before. Others ignore it.
    Barrier {
        origin: String,
        id: u64,
    },
}

/// [`Record`] by reference, for encoding without a copy: serde writes both
/// the same way (same variant names, same order).
#[derive(Serialize)]
enum RecordRef<'a> {
    Message(&'a Envelope),
    Control(&'a [u8]),
    Probe {
        origin: &'a str,
        started_at_micros: u64,
        routing: Option<RoutingReport>,
    },
    Barrier {
        origin: &'a str,
        id: u64,
    },
}

fn encode(record: &RecordRef<'_>) -> Vec<u8> {
    let mut out = vec![ENVELOPE_MAJOR, ENVELOPE_MINOR];
    postcard::to_io(record, &mut out).expect("writing to a Vec cannot fail");
    out
}

/// The wire form of a control event's bytes.
pub fn encode_control(event: &[u8]) -> Vec<u8> {
    encode(&RecordRef::Control(event))
}

/// What a node that routes pushes to their users' nodes says in its
/// probes: that it routes, and how far its routing is fenced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingReport {
    /// The control queue (its stream id, as a position's) and the offset
    /// in it up to which this node applied connection announcements, with
    /// every push it routed before them stored: a connection announced
    /// there or before is routed to by this node from now on.
    pub control_stream: u64,
    pub fenced_through: u64,
}

/// The wire form of node `origin`'s probe.
pub(crate) fn encode_probe(
    origin: &str,
    started_at_micros: u64,
    routing: Option<RoutingReport>,
) -> Vec<u8> {
    encode(&RecordRef::Probe {
        origin,
        started_at_micros,
        routing,
    })
}

/// The wire form of node `origin`'s barrier `id`.
pub(crate) fn encode_barrier(origin: &str, id: u64) -> Vec<u8> {
    encode(&RecordRef::Barrier { origin, id })
}

impl Record {
    /// Reads the wire form written by this or an older-minor/same-major build.
    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let [major, minor, body @ ..] = bytes else {
            return Err(EnvelopeError::Truncated);
        };
        if *major > ENVELOPE_MAJOR {
            return Err(EnvelopeError::NewerMajor(*major));
        }
        if *minor < ENVELOPE_MINOR {
            // An older writer's record ends where the fields it lacks
            // begin (they are the last thing in it): read it as if each
            // said `None` (one zero byte apiece). A record of another kind
            // ignores the bytes, as it would a newer minor's.
            let mut body = body.to_vec();
            body.extend_from_slice(&APPENDED_AS_NONE);
            let (record, _appended) = postcard::take_from_bytes(&body)?;
            return Ok(record);
        }
        // take_from_bytes ignores what a newer minor appended.
        let (record, _appended) = postcard::take_from_bytes(body)?;
        Ok(record)
    }
}

/// Why bytes could not be read as an envelope.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope shorter than its version header")]
    Truncated,
    #[error("envelope major version {0} is newer than this node's {ENVELOPE_MAJOR}")]
    NewerMajor(u8),
    #[error("malformed envelope: {0}")]
    Malformed(#[from] postcard::Error),
}

impl EnvelopeError {
    /// The `reason` label of the rejected-envelopes metric.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Truncated | Self::Malformed(_) => "malformed",
            Self::NewerMajor(_) => "newer_major",
        }
    }
}

/// The id prefix of markers.
const MARKER_ID: &str = "marker-";

/// A marker in `tenant`'s stream: a message for nobody that a node sends
/// to itself (see `Bus::mark`). Never delivered nor kept.
pub fn marker(tenant: &str) -> Envelope {
    let mut marker = Envelope::new(tenant, Target::Users(Vec::new()), "null".to_owned());
    marker.id = format!("{MARKER_ID}{}", marker.id);
    marker
}

impl Envelope {
    /// True for a marker (see [`marker`]): pushes always name someone.
    pub fn is_marker(&self) -> bool {
        matches!(&self.target, Target::Users(users) if users.is_empty())
            && self.id.starts_with(MARKER_ID)
    }

    /// A new envelope with a fresh id, stamped now.
    pub fn new(tenant: &str, target: Target, data: String) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            tenant: tenant.to_owned(),
            target,
            data,
            published_at_micros: now_micros(),
            idempotency_key: None,
            event: None,
            except_socket: None,
            position: OnceLock::new(),
        }
    }

    /// The binary wire form, as a [`Record::Message`].
    pub fn encode(&self) -> Vec<u8> {
        encode(&RecordRef::Message(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope::new(
            "acme",
            Target::Users(vec!["alice".into()]),
            r#"{"a":1}"#.into(),
        )
    }

    fn decode_message(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
        match Record::decode(bytes)? {
            Record::Message(envelope) => Ok(envelope),
            other => panic!("a message was expected, not {other:?}"),
        }
    }

    #[test]
    fn positions_read_back_what_they_write_and_nothing_else() {
        let position = Position {
            stream: 0xabc_def,
            offset: 42,
        };
        assert_eq!(position.to_string(), "abcdef-42");
        assert_eq!(Position::parse("abcdef-42"), Some(position));
        for bad in [
            "", "-", "abc", "abc-", "-1", "xyz-1", "1-+2", "1-2-3", "1- 2",
        ] {
            assert_eq!(Position::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn fuzz_position_parsing_never_panics_and_round_trips() {
        arbtest::arbtest(|u| {
            let text: &str = u.arbitrary()?;
            if let Some(position) = Position::parse(text) {
                assert_eq!(Position::parse(&position.to_string()), Some(position));
            }
            Ok(())
        })
        .run();
    }

    #[test]
    fn round_trips() {
        let envelope = sample();
        assert_eq!(decode_message(&envelope.encode()).unwrap(), envelope);
    }

    #[test]
    fn control_records_probes_and_barriers_round_trip() {
        let control = vec![0, 97, 115, 109];
        assert_eq!(
            Record::decode(&encode_control(&control)).unwrap(),
            Record::Control(control)
        );
        assert_eq!(
            Record::decode(&encode_probe("node-a", 42, None)).unwrap(),
            Record::Probe {
                origin: "node-a".into(),
                started_at_micros: 42,
                routing: None,
            }
        );
        let report = RoutingReport {
            control_stream: 9,
            fenced_through: 1_000,
        };
        assert!(matches!(
            Record::decode(&encode_probe("node-a", 42, Some(report))).unwrap(),
            Record::Probe { routing: Some(r), .. } if r == report
        ));
        assert_eq!(
            Record::decode(&encode_barrier("node-a", 7)).unwrap(),
            Record::Barrier {
                origin: "node-a".into(),
                id: 7
            }
        );
    }

    #[test]
    fn newer_major_is_refused() {
        let mut bytes = sample().encode();
        bytes[0] = ENVELOPE_MAJOR + 1;
        assert!(matches!(
            decode_message(&bytes),
            Err(EnvelopeError::NewerMajor(_))
        ));
    }

    #[test]
    fn appended_fields_of_a_newer_minor_are_ignored() {
        let envelope = sample();
        let mut bytes = envelope.encode();
        bytes[1] = ENVELOPE_MINOR + 1;
        bytes.extend_from_slice(&[7, 7, 7]);
        assert_eq!(decode_message(&bytes).unwrap(), envelope);
    }

    #[test]
    fn a_message_of_minor_0_reads_as_one_without_event() {
        // What a node of minor 0 wrote: the envelope without its last
        // two fields.
        #[derive(Serialize)]
        struct EnvelopeMinor0<'a> {
            id: &'a str,
            tenant: &'a str,
            target: &'a Target,
            data: &'a str,
            published_at_micros: u64,
            idempotency_key: Option<&'a str>,
        }
        #[derive(Serialize)]
        enum RecordMinor0<'a> {
            Message(EnvelopeMinor0<'a>),
        }
        let envelope = sample();
        let mut bytes = vec![ENVELOPE_MAJOR, 0];
        postcard::to_io(
            &RecordMinor0::Message(EnvelopeMinor0 {
                id: &envelope.id,
                tenant: &envelope.tenant,
                target: &envelope.target,
                data: &envelope.data,
                published_at_micros: envelope.published_at_micros,
                idempotency_key: Some("k"),
            }),
            &mut bytes,
        )
        .unwrap();
        let read = decode_message(&bytes).unwrap();
        assert_eq!(read.idempotency_key.as_deref(), Some("k"));
        assert_eq!((read.event, read.except_socket), (None, None));
        // Other records of minor 0 read as before.
        let mut probe = encode_probe("node-a", 42, None);
        probe[1] = 0;
        assert!(matches!(Record::decode(&probe), Ok(Record::Probe { .. })));
        // A minor-1 probe (without a routing report) reads as one without.
        let mut probe = encode_probe("node-a", 42, None);
        probe.pop();
        probe[1] = 1;
        assert!(matches!(
            Record::decode(&probe),
            Ok(Record::Probe {
                routing: None,
                started_at_micros: 42,
                ..
            })
        ));
    }

    #[test]
    fn an_event_name_and_an_excepted_socket_round_trip() {
        let mut envelope = sample();
        envelope.event = Some("order-shipped".into());
        envelope.except_socket = Some("123.456".into());
        assert_eq!(decode_message(&envelope.encode()).unwrap(), envelope);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Record::decode(&[]).is_err());
        assert!(Record::decode(&[1, 0, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn fuzz_decoding_arbitrary_bytes_never_panics() {
        arbtest::arbtest(|u| {
            let body: &[u8] = u.arbitrary()?;
            let _ = Record::decode(body);
            // Past the version header, to reach the body's decoding.
            let mut bytes = vec![ENVELOPE_MAJOR, ENVELOPE_MINOR];
            bytes.extend_from_slice(body);
            if let Ok(Record::Message(envelope)) = Record::decode(&bytes) {
                // What decodes encodes back the same.
                assert_eq!(decode_message(&envelope.encode()).unwrap(), envelope);
            }
            Ok(())
        })
        .run();
    }
}
