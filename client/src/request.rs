//! Naming what to read: a key (with element, filter, columns, limit...) or a query set.

use arrow_flight::FlightDescriptor;
use serde_json::{Map, Value, json};

/// A JSON command descriptor, built field by field (docs/PROTOCOL.md section 3).
///
/// ```
/// use artiflight_client::Request;
/// let r = Request::key("pbmc68k.h5ad").element(["obsm", "X_pca"]).filter("louvain = '1'").limit(10);
/// assert_eq!(r.to_json()["element"], serde_json::json!(["obsm", "X_pca"]));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    fields: Map<String, Value>,
}

impl Request {
    /// The artifact or collection under `key`.
    pub fn key(key: impl Into<String>) -> Self {
        Self::with("key", json!(key.into()))
    }

    /// Every artifact that matches a record filter, e.g. `{"suffix": ".parquet"}`.
    pub fn query(filter: Value) -> Self {
        Self::with("query", filter)
    }

    fn with(name: &str, value: Value) -> Self {
        let mut fields = Map::new();
        fields.insert(name.to_string(), value);
        Self { fields }
    }

    fn set(mut self, name: &str, value: Value) -> Self {
        self.fields.insert(name.to_string(), value);
        self
    }

    /// A version's uid instead of the latest.
    pub fn version(self, uid: impl Into<String>) -> Self {
        self.set("version", json!(uid.into()))
    }

    /// An element path, e.g. `["X"]` or `["layers", "counts"]`.
    pub fn element<S: Into<String>>(self, path: impl IntoIterator<Item = S>) -> Self {
        self.set(
            "element",
            json!(path.into_iter().map(Into::into).collect::<Vec<String>>()),
        )
    }

    /// A SQL boolean expression over the table (or obs, for AnnData matrices).
    pub fn filter(self, expr: impl Into<String>) -> Self {
        self.set("filter", json!(expr.into()))
    }

    /// Output columns, in order.
    pub fn columns<S: Into<String>>(self, columns: impl IntoIterator<Item = S>) -> Self {
        self.set(
            "columns",
            json!(columns.into_iter().map(Into::into).collect::<Vec<String>>()),
        )
    }

    /// At most this many rows across all endpoints.
    pub fn limit(self, n: u64) -> Self {
        self.set("limit", json!(n))
    }

    /// Any other command field (`var_names`, `obs_range`, `layout`, ...).
    pub fn field(self, name: &str, value: Value) -> Self {
        self.set(name, value)
    }

    /// The command as JSON.
    pub fn to_json(&self) -> Value {
        Value::Object(self.fields.clone())
    }

    /// The Flight descriptor that carries it.
    pub fn descriptor(&self) -> FlightDescriptor {
        FlightDescriptor::new_cmd(self.to_json().to_string())
    }
}
