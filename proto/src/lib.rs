//! artiflight's wire messages, generated at build time from `proto/artiflight.proto`.
//!
//! ```
//! use artiflight_proto::Ticket;
//! use prost::Message;
//!
//! let ticket = Ticket { version: 1, command: "{\"key\":\"demo\"}".into(), ..Default::default() };
//! let bytes = ticket.encode_to_vec();
//! assert_eq!(Ticket::decode(bytes.as_slice()).unwrap(), ticket);
//! ```

#![allow(unreachable_pub, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/artiflight.v1.rs"));

/// The ticket layout this build writes and reads.
pub const TICKET_VERSION: u32 = 1;

/// The [`SqlStatement`] layout this build writes and reads.
pub const SQL_STATEMENT_VERSION: u32 = 1;
