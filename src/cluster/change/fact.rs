//! The connection facts a batch of them carries.

use serde::{Deserialize, Serialize};

use super::Change;

/// A connection fact carried in [`Change::Connections`]: the same as its
/// single-record form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectionFact {
    /// As [`Change::ConnectionHeld`]; `awaited` when the connection waits
    /// for every node's fence to pass it (a resume): the others probe
    /// early for it. (A ramp of fresh connections has fifty nodes probe
    /// ten times a second each otherwise, each probe read by all.)
    Held {
        owner: String,
        tenant: String,
        user: String,
        connection: u64,
        opened_at_micros: u64,
        awaited: bool,
    },
    /// As [`Change::ConnectionClosed`].
    Closed {
        tenant: String,
        user: String,
        connection: u64,
    },
}

impl ConnectionFact {
    /// The fact of `change`, if it is one a batch carries (else the
    /// change back).
    pub fn of(change: Change) -> Result<Self, Box<Change>> {
        match change {
            Change::ConnectionHeld {
                owner,
                tenant,
                user,
                connection,
                opened_at_micros,
            } => Ok(Self::Held {
                owner,
                tenant,
                user,
                connection,
                opened_at_micros,
                awaited: false,
            }),
            Change::ConnectionClosed {
                tenant,
                user,
                connection,
            } => Ok(Self::Closed {
                tenant,
                user,
                connection,
            }),
            other => Err(Box::new(other)),
        }
    }

    /// Its single-record form.
    pub fn into_change(self) -> Change {
        match self {
            Self::Held {
                owner,
                tenant,
                user,
                connection,
                opened_at_micros,
                awaited: _,
            } => Change::ConnectionHeld {
                owner,
                tenant,
                user,
                connection,
                opened_at_micros,
            },
            Self::Closed {
                tenant,
                user,
                connection,
            } => Change::ConnectionClosed {
                tenant,
                user,
                connection,
            },
        }
    }
}
