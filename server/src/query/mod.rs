//! From a command to a DataFusion plan: resolve the key (or query set) in the catalog, open each
//! artifact through its format's table provider, apply filter, columns and limit, and plan. The
//! plan's output partitions become the flight's endpoints.

mod command;
mod long;
mod plan;
mod planned;
mod prune;
mod sql;
mod ticket;

pub use command::{Command, Layout};
pub use plan::{Planner, Resolved, session_config, statistics, unify_schemas};
pub(crate) use planned::LeaseBag;
pub use planned::Planned;
pub use sql::{
    CATALOG, Distribution, SCHEMA, SqlPlan, SqlPlanner, SqlTable, Statement, TABLE_TYPE,
};
pub use ticket::TicketSpec;
