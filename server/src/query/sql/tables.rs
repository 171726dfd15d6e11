//! Our schema `public`, as DataFusion sees it: table names are looked up in the catalog when a
//! query names them, and each resolved version is kept for the statement's tickets.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::prelude::SessionContext;

use super::{SqlPlanner, SqlTable};
use crate::catalog::RecordFilter;

/// Our schema `public`: looks tables up in the catalog as queries name them.
pub(super) struct Tables {
    pub(super) sql: SqlPlanner,
    /// Tables open in a session of their own: holding the query's session here would make a
    /// reference cycle through its catalog.
    pub(super) open_ctx: SessionContext,
    pub(super) pinned: BTreeMap<String, String>,
    /// Names looked up so far, with the entry uid each resolved to.
    pub(super) resolved: Mutex<BTreeMap<String, String>>,
}

impl fmt::Debug for Tables {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tables")
            .field("pinned", &self.pinned)
            .finish()
    }
}

#[async_trait]
impl SchemaProvider for Tables {
    /// Only `information_schema` and `SHOW TABLES` list names; it is one short catalog read.
    fn table_names(&self) -> Vec<String> {
        // DataFusion asks synchronously, from async code: the catalog read (which may wait on
        // another process's write lock) must not stall the worker thread it runs on.
        let list = || {
            self.sql
                .planner()
                .catalog()
                .store()
                .list(&RecordFilter::default())
        };
        let listed = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(list),
            _ => list(),
        };
        match listed {
            Ok(entries) => entries
                .iter()
                .flat_map(SqlTable::of)
                .map(|t| t.name)
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list tables");
                Vec::new()
            }
        }
    }

    async fn table(&self, name: &str) -> datafusion::error::Result<Option<Arc<dyn TableProvider>>> {
        let pinned = self.pinned.get(name).map(String::as_str);
        let Some(table) = self.sql.table(name, pinned).await? else {
            return Ok(None);
        };
        self.resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), table.entry.uid().to_string());
        Ok(Some(self.sql.open_table(&self.open_ctx, &table).await?))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.table_names().iter().any(|n| n == name)
    }
}
