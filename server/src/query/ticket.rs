//! Tickets: self-contained protobuf messages naming a command, the artifact versions it resolved
//! to, and one partition of its plan.

use artiflight_proto::{TICKET_VERSION, Ticket};
use prost::Message;

use super::Command;
use crate::error::{Error, Result};

/// A decoded, validated ticket.
#[derive(Debug, Clone, PartialEq)]
pub struct TicketSpec {
    pub command: Command,
    pub uids: Vec<String>,
    pub partition: usize,
    pub partition_count: usize,
    /// Which flight this ticket belongs to (random per GetFlightInfo); cancels go by it.
    pub flight: u64,
    /// The target partitions the flight was planned with; a server serving the ticket plans with
    /// the same, whatever its own (0: its own).
    pub target_partitions: usize,
}

impl TicketSpec {
    pub fn encode(&self) -> Vec<u8> {
        Ticket {
            version: TICKET_VERSION,
            command: self.command.to_json(),
            uids: self.uids.clone(),
            partition: self.partition as u32,
            partition_count: self.partition_count as u32,
            flight: self.flight,
            target_partitions: u32::try_from(self.target_partitions).unwrap_or(0),
        }
        .encode_to_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let ticket =
            Ticket::decode(bytes).map_err(|e| Error::invalid(format!("malformed ticket: {e}")))?;
        if ticket.version != TICKET_VERSION {
            return Err(Error::invalid(format!(
                "ticket version {} is not supported (this server reads version {TICKET_VERSION}); \
                 ask GetFlightInfo for a new ticket",
                ticket.version
            )));
        }
        if ticket.partition >= ticket.partition_count {
            return Err(Error::invalid("malformed ticket: partition out of range"));
        }
        Ok(Self {
            command: Command::from_json(ticket.command.as_bytes())?,
            uids: ticket.uids,
            partition: ticket.partition as usize,
            partition_count: ticket.partition_count as usize,
            flight: ticket.flight,
            target_partitions: ticket.target_partitions as usize,
        })
    }
}
