//! Where a command's records live: a running server, or the catalog in the data dir.

use anyhow::Result;
use artiflight_client::Client;
use artiflight_server::Server;
use artiflight_server::catalog::{Entry, RecordFilter};
use artiflight_server::service::{Caller, run_action};
use serde_json::Value;

use super::Global;

/// A running server (`--server`) or the catalog opened in this process. Both answer the same
/// actions with the same JSON: the local one runs the server's own action code.
pub(crate) enum Backend {
    Remote(Client),
    Local(Box<Server>),
}

impl Backend {
    /// The server given by `--server`, else the data dir's catalog.
    pub(crate) async fn open(global: &Global) -> Result<Self> {
        Ok(match &global.server {
            Some(url) => Backend::Remote(global.connect(url).await?),
            None => Backend::Local(Box::new(Server::open(&global.options())?)),
        })
    }

    /// Runs a DoAction (`register`, `describe`, `delete`, ...) and returns its answer.
    pub(crate) async fn action(&self, name: &str, body: Value) -> Result<Value> {
        Ok(match self {
            Backend::Remote(client) => client.action(name, body).await?,
            Backend::Local(server) => {
                let body = serde_json::to_vec(&body)?;
                run_action(server.registry(), name, &body, Caller::Operator).await?
            }
        })
    }

    /// The latest records that pass `filter`, as ListFlights describes them.
    pub(crate) async fn list(&self, filter: RecordFilter) -> Result<Vec<Value>> {
        Ok(match self {
            Backend::Remote(client) => client
                .list(Some(serde_json::to_value(&filter)?))
                .await?
                .iter()
                .filter_map(|info| serde_json::from_slice(&info.app_metadata).ok())
                .collect(),
            Backend::Local(server) => server
                .planner()
                .catalog()
                .list(filter)
                .await?
                .iter()
                .map(Entry::to_json)
                .collect(),
        })
    }
}
