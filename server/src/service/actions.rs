//! DoAction bodies (docs/PROTOCOL.md section 8): JSON in, the record (or list of records) as JSON
//! out.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::catalog::Entry;
use crate::error::{Error, Result};
use crate::registry::Registry;

/// Every action, with the description ListActions shows.
pub(crate) const ACTIONS: &[(&str, &str)] = &[
    (
        "register",
        r#"Register a file or folder: {"path", "key", "description"?}"#,
    ),
    (
        "create_collection",
        r#"Make a collection: {"key", "members": [KEY, ...], "description"?}"#,
    ),
    ("describe", r#"The record of a key: {"key", "version"?}"#),
    ("list_versions", r#"Every version of a key: {"key"}"#),
    (
        "delete",
        r#"Trash (or with "permanent", delete) a key or one version: {"key", "version"?, "permanent"?}"#,
    ),
    (
        "add_column",
        r#"A new version of a zarr AnnData with one more column: {"key", "element": "obs"|"var", "name", "values": [...]}"#,
    ),
];

/// Flight's own actions that the server answers besides its JSON actions and Flight SQL's.
pub(super) const FLIGHT_ACTIONS: &[(&str, &str)] = &[
    (
        "CancelFlightInfo",
        "Cancel a flight: its running streams end with CANCELLED and its tickets are refused",
    ),
    ("CloseSession", "Close the session (the server keeps none)"),
    (
        "SetSessionOptions",
        "Accepted; the server keeps no session options",
    ),
    ("GetSessionOptions", "No session options are kept"),
];

/// The actions that change the catalog or storage: they need a write token.
pub(crate) const WRITES: &[&str] = &["register", "create_collection", "delete", "add_column"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddColumn {
    key: String,
    element: String,
    name: String,
    values: Vec<Value>,
}

/// The command descriptor of a DoPut that adds a column (the values are the uploaded column).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddColumnPut {
    #[allow(dead_code)]
    action: AddColumnAction,
    pub(crate) key: String,
    pub(crate) element: String,
    pub(crate) name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum AddColumnAction {
    AddColumn,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Register {
    path: String,
    key: String,
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateCollection {
    key: String,
    members: Vec<String>,
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyVersion {
    key: String,
    version: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Key {
    key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Delete {
    key: String,
    version: Option<String>,
    #[serde(default)]
    permanent: bool,
}

fn parse<'a, T: Deserialize<'a>>(action: &str, body: &'a [u8]) -> Result<T> {
    serde_json::from_slice(body)
        .map_err(|e| Error::invalid(format!("invalid body for action '{action}': {e}")))
}

/// Who runs an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A Flight client: registering is confined to the allowed roots.
    Client,
    /// The operator's own command line, on the server's data dir: it may register any path.
    Operator,
}

/// Runs one action and returns its JSON answer. Whether a client may write is checked by the
/// service before this; the command line runs the same function without a server (`Caller::Operator`).
///
/// ```no_run
/// # async fn f(server: &artiflight_server::Server) -> artiflight_server::error::Result<()> {
/// use artiflight_server::service::{Caller, run_action};
/// let record = run_action(server.registry(), "describe", br#"{"key": "pbmc68k"}"#, Caller::Operator).await?;
/// println!("{}", record["uid"]);
/// # Ok(()) }
/// ```
pub async fn run(registry: &Registry, action: &str, body: &[u8], caller: Caller) -> Result<Value> {
    let catalog = registry.planner().catalog();
    match action {
        "register" => {
            let r: Register = parse(action, body)?;
            let (record, _) = registry
                .register(&r.path, &r.key, r.description, caller == Caller::Operator)
                .await?;
            Ok(Entry::Artifact(record).to_json())
        }
        "create_collection" => {
            let r: CreateCollection = parse(action, body)?;
            let (record, _) = registry
                .create_collection(&r.key, r.members, r.description)
                .await?;
            Ok(Entry::Collection(record).to_json())
        }
        "describe" => {
            let r: KeyVersion = parse(action, body)?;
            let entry = catalog.resolve(&r.key, r.version.as_deref()).await?;
            let mut value = entry.to_json();
            if let Entry::Artifact(record) = &entry
                && let Some(structure) = registry.planner().describe(record, true).await?
                && let Some(map) = value.as_object_mut()
            {
                map.insert("structure".into(), structure);
            }
            Ok(value)
        }
        "add_column" => {
            let r: AddColumn = parse(action, body)?;
            let values = crate::formats::json_values(&r.values)?;
            let (record, _) = registry
                .add_column(&r.key, &r.element, &r.name, values)
                .await?;
            Ok(Entry::Artifact(record).to_json())
        }
        "list_versions" => {
            let r: Key = parse(action, body)?;
            let versions = catalog.versions(&r.key).await?;
            Ok(Value::Array(versions.iter().map(Entry::to_json).collect()))
        }
        "delete" => {
            let r: Delete = parse(action, body)?;
            let single = r.version.is_some();
            let deleted = registry.delete(&r.key, r.version, r.permanent).await?;
            let mut records: Vec<Value> = deleted.iter().map(Entry::to_json).collect();
            Ok(if single && records.len() == 1 {
                records.remove(0)
            } else {
                json!(records)
            })
        }
        other => Err(Error::invalid(format!(
            "unknown action '{other}'; ListActions lists the actions this server runs"
        ))),
    }
}
