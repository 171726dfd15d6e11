//! The versioned catalog of artifacts and collections.
//!
//! Records say where an artifact lives and what it is; they never hold data. The store sits behind
//! the small [`CatalogStore`] trait, implemented for SQLite (embedded, the default) and for
//! PostgreSQL (shared by a fleet on several machines); the [`Catalog`] handle runs the (blocking)
//! store calls off the async runtime.

mod ids;
mod postgres;
mod sqlite;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use postgres::PostgresCatalog;
pub use sqlite::SqliteCatalog;

/// One version of one artifact: a file or folder in a storage, registered under a key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    /// 16-character base62 stem shared by all versions, then a 4-digit version counter.
    pub uid: String,
    pub key: String,
    pub description: Option<String>,
    /// `.parquet`, `.csv`, `.arrow`, ... or `""` for a folder of shards.
    pub suffix: String,
    /// `DataFrame`, `AnnData`, `SpatialData`, or `None` when unknown.
    pub otype: Option<String>,
    /// Bytes, summed over a folder's files.
    pub size: u64,
    /// Content hash; a folder's derives from its files' hashes.
    pub hash: String,
    /// How `hash` was taken: `blake3` (every byte) or `etag` (a remote store's ETags and sizes,
    /// nothing downloaded).
    #[serde(default = "content_hash")]
    pub hash_type: String,
    pub n_files: Option<u64>,
    pub n_observations: Option<u64>,
    /// 1 for the first version of a key, then 2, 3, ...
    pub version: u32,
    pub is_latest: bool,
    /// UTC, RFC 3339.
    pub created_at: String,
    /// The root URL of the storage that holds the artifact.
    pub storage: String,
    /// The artifact's full URL (`file:///...`, `s3://bucket/...`).
    pub path: String,
    /// Set when the file lives in managed storage (DoPut uploads) and is deleted with its record.
    pub managed: bool,
    /// Set when the operator registered it from the command line: readable even outside the
    /// server's allowed roots.
    pub trusted: bool,
    /// When it was moved to the trash, if it was.
    pub trashed_at: Option<String>,
    /// The table's Arrow schema as an IPC message, recorded at registration so that listings
    /// need not open the artifact; `None` for array stores and older records.
    #[serde(skip)]
    pub arrow_schema: Option<Vec<u8>>,
}

fn content_hash() -> String {
    "blake3".into()
}

impl ArtifactRecord {
    /// The schema recorded at registration, if any.
    pub fn schema(&self) -> Option<arrow::datatypes::SchemaRef> {
        let bytes = self.arrow_schema.clone()?;
        let schema = arrow::datatypes::Schema::try_from(arrow_flight::IpcMessage(bytes.into()));
        schema.ok().map(std::sync::Arc::new)
    }
}

/// A schema as the bytes [`ArtifactRecord::schema`] reads: the encapsulated IPC message that a
/// `FlightInfo` carries, so that a listing sends the recorded bytes as they are.
pub fn encode_schema(schema: &arrow::datatypes::Schema) -> Option<Vec<u8>> {
    let options = arrow::ipc::writer::IpcWriteOptions::default();
    let message: arrow_flight::IpcMessage = arrow_flight::SchemaAsIpc::new(schema, &options)
        .try_into()
        .ok()?;
    Some(message.0.to_vec())
}

/// An ordered list of artifacts under a key; its table is the union of its members' tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionRecord {
    pub uid: String,
    pub key: String,
    pub description: Option<String>,
    pub hash: String,
    pub version: u32,
    pub is_latest: bool,
    pub created_at: String,
    /// Member artifacts' uids, in member order: a collection pins the versions it was made of.
    pub members: Vec<String>,
    pub member_keys: Vec<String>,
    pub trashed_at: Option<String>,
}

/// Whatever a key names.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    Artifact(ArtifactRecord),
    Collection(CollectionRecord),
}

impl Entry {
    pub fn key(&self) -> &str {
        match self {
            Entry::Artifact(a) => &a.key,
            Entry::Collection(c) => &c.key,
        }
    }

    pub fn uid(&self) -> &str {
        match self {
            Entry::Artifact(a) => &a.uid,
            Entry::Collection(c) => &c.uid,
        }
    }

    /// The record as the JSON that actions and `app_metadata` return.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// A filter over artifact records, as ListFlights criteria and query sets take it.
///
/// ```
/// use artiflight_server::catalog::RecordFilter;
/// let f: RecordFilter = serde_json::from_str(r#"{"suffix": ".parquet"}"#).unwrap();
/// assert_eq!(f.suffix.as_deref(), Some(".parquet"));
/// assert!(serde_json::from_str::<RecordFilter>(r#"{"sufix": ".parquet"}"#).is_err());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordFilter {
    pub key: Option<String>,
    pub key_prefix: Option<String>,
    pub suffix: Option<String>,
    pub otype: Option<String>,
}

impl RecordFilter {
    /// Parses criteria bytes: empty means everything.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        serde_json::from_slice(bytes)
            .map_err(|e| Error::invalid(format!("invalid record filter: {e}")))
    }

    /// Whether the filter only admits artifacts (collections have no suffix or otype).
    pub fn is_artifact_only(&self) -> bool {
        self.suffix.is_some() || self.otype.is_some()
    }

    pub fn matches_key(&self, key: &str) -> bool {
        self.key.as_deref().is_none_or(|k| k == key)
            && self
                .key_prefix
                .as_deref()
                .is_none_or(|p| key.starts_with(p))
    }
}

/// What registering needs to know about new content; the catalog fills in uid, version and time.
#[derive(Debug, Clone)]
pub struct NewArtifact {
    pub key: String,
    pub description: Option<String>,
    pub suffix: String,
    pub otype: Option<String>,
    pub size: u64,
    pub hash: String,
    /// `blake3` or `etag`: see [`ArtifactRecord::hash_type`].
    pub hash_type: String,
    pub n_files: Option<u64>,
    pub n_observations: Option<u64>,
    pub storage: String,
    pub path: String,
    pub managed: bool,
    pub trusted: bool,
    /// The table's Arrow schema as an IPC message, where the format knows it at registration.
    pub arrow_schema: Option<Vec<u8>>,
}

/// A bearer token as the catalog keeps it: its name, role and hash (never the token itself).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenRecord {
    /// Unique; the user name in basic auth.
    pub name: String,
    pub role: Role,
    /// [`crate::token::Token::hash_of`] the token; never listed.
    #[serde(skip)]
    pub hash: String,
    /// UTC, RFC 3339.
    pub created_at: String,
}

/// The outcome of a delete: what was removed or trashed, and managed files now safe to remove.
#[derive(Debug, Clone)]
pub struct Deleted {
    pub entries: Vec<Entry>,
    pub orphaned_paths: Vec<String>,
}

/// A catalog backend. Calls block; use them through [`Catalog`].
pub trait CatalogStore: Send + Sync {
    /// Registers content; returns the record and whether it is new (`false`: the hash was known).
    fn register(&self, new: NewArtifact) -> Result<(ArtifactRecord, bool)>;
    /// Makes a collection (or a new version of one) from the latest versions of `member_keys`.
    fn create_collection(
        &self,
        key: &str,
        member_keys: &[String],
        description: Option<String>,
    ) -> Result<(CollectionRecord, bool)>;
    /// The latest untrashed entry under `key`, or the exact version `uid` when given.
    fn resolve(&self, key: &str, uid: Option<&str>) -> Result<Entry>;
    /// Artifacts by uid, in the order asked.
    fn artifacts(&self, uids: &[String]) -> Result<Vec<ArtifactRecord>>;
    /// Latest untrashed artifacts and collections that match, in key order.
    fn list(&self, filter: &RecordFilter) -> Result<Vec<Entry>>;
    /// Every version under `key`, oldest first, trashed ones included.
    fn versions(&self, key: &str) -> Result<Vec<Entry>>;
    /// Trashes (or with `permanent`, deletes) one version, or every version of the key.
    fn delete(&self, key: &str, uid: Option<&str>, permanent: bool) -> Result<Deleted>;
    /// Every path that an artifact record uses, managed or not, trashed ones included: what
    /// managed storage must keep.
    fn artifact_paths(&self) -> Result<Vec<String>>;
    /// Stores a new token's hash under a name not yet in use.
    fn create_token(&self, name: &str, role: Role, hash: &str) -> Result<TokenRecord>;
    /// The live tokens, by name.
    fn tokens(&self) -> Result<Vec<TokenRecord>>;
    /// Deletes the token `name`; it stops working at once.
    fn revoke_token(&self, name: &str) -> Result<TokenRecord>;
    /// Records that the server reachable at `uri` is alive now: a fleet's membership.
    fn heartbeat(&self, uri: &str) -> Result<()>;
    /// The servers whose last heartbeat is at most `window` old, by uri in ascending order.
    fn live_servers(&self, window: std::time::Duration) -> Result<Vec<String>>;
    /// Removes the server at `uri` from the fleet (it is stopping).
    fn leave(&self, uri: &str) -> Result<()>;
    /// Takes the managed-storage lock of every server on this catalog, waiting for it: shared
    /// from an upload's write into managed storage to its record's commit, exclusive while a
    /// delete removes files that no record names. A delete then never removes the object that an
    /// identical upload on another server has just written. Held until the guard is dropped; a
    /// process that dies lets go.
    fn lock_managed(&self, how: ManagedLock) -> Result<ManagedGuard>;
}

/// How [`CatalogStore::lock_managed`] is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManagedLock {
    /// An upload, between writing its file and committing its record.
    Shared,
    /// A delete, between reading which files records use and removing the rest.
    Exclusive,
}

/// Holds the managed-storage lock until dropped.
pub struct ManagedGuard(#[allow(dead_code)] Box<dyn Send + Sync>);

impl ManagedGuard {
    pub(crate) fn new(held: impl Send + Sync + 'static) -> Self {
        Self(Box::new(held))
    }
}

/// A cheap, cloneable handle on a catalog store.
#[derive(Clone)]
pub struct Catalog(Arc<dyn CatalogStore>);

impl Catalog {
    pub fn new(store: impl CatalogStore + 'static) -> Self {
        Self(Arc::new(store))
    }

    /// Opens the catalog a `--catalog` URL names: `sqlite://PATH` (`sqlite:///abs/path` or
    /// `sqlite://relative/path`), or `postgres://USER@HOST:PORT/DB` for a fleet on several
    /// machines.
    pub fn open_url(url: &str) -> Result<Self> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(Error::invalid("--catalog sqlite:// needs a path"));
            }
            return Self::open_sqlite(std::path::Path::new(path));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::new(PostgresCatalog::open(url)?));
        }
        Err(Error::invalid(format!(
            "--catalog '{url}' is not a catalog URL: expected sqlite://PATH or postgres://..."
        )))
    }

    /// Opens (and migrates) the SQLite catalog at `path`.
    pub fn open_sqlite(path: &std::path::Path) -> Result<Self> {
        Ok(Self::new(SqliteCatalog::open(path)?))
    }

    /// Runs a store call on the blocking pool: SQLite may wait on another process's lock.
    async fn run<T, F>(&self, call: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn CatalogStore) -> Result<T> + Send + 'static,
    {
        let store = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || call(store.as_ref()))
            .await
            .map_err(|e| Error::internal_from("catalog task failed", e))?
    }

    /// [`CatalogStore::heartbeat`], off the async runtime.
    pub async fn heartbeat(&self, uri: &str) -> Result<()> {
        let uri = uri.to_string();
        self.run(move |c| c.heartbeat(&uri)).await
    }

    /// [`CatalogStore::live_servers`], off the async runtime.
    pub async fn live_servers(&self, window: std::time::Duration) -> Result<Vec<String>> {
        self.run(move |c| c.live_servers(window)).await
    }

    /// [`CatalogStore::leave`], off the async runtime.
    pub async fn leave(&self, uri: &str) -> Result<()> {
        let uri = uri.to_string();
        self.run(move |c| c.leave(&uri)).await
    }

    /// [`CatalogStore::lock_managed`], off the async runtime.
    pub async fn lock_managed(&self, how: ManagedLock) -> Result<ManagedGuard> {
        self.run(move |c| c.lock_managed(how)).await
    }

    /// [`CatalogStore::register`], off the async runtime.
    pub async fn register(&self, new: NewArtifact) -> Result<(ArtifactRecord, bool)> {
        self.run(move |c| c.register(new)).await
    }

    /// [`CatalogStore::create_collection`], off the async runtime.
    pub async fn create_collection(
        &self,
        key: &str,
        member_keys: Vec<String>,
        description: Option<String>,
    ) -> Result<(CollectionRecord, bool)> {
        let key = key.to_string();
        self.run(move |c| c.create_collection(&key, &member_keys, description))
            .await
    }

    /// [`CatalogStore::resolve`], off the async runtime.
    pub async fn resolve(&self, key: &str, uid: Option<&str>) -> Result<Entry> {
        let (key, uid) = (key.to_string(), uid.map(str::to_string));
        self.run(move |c| c.resolve(&key, uid.as_deref())).await
    }

    /// [`CatalogStore::artifacts`], off the async runtime.
    pub async fn artifacts(&self, uids: Vec<String>) -> Result<Vec<ArtifactRecord>> {
        self.run(move |c| c.artifacts(&uids)).await
    }

    /// [`CatalogStore::list`], off the async runtime.
    pub async fn list(&self, filter: RecordFilter) -> Result<Vec<Entry>> {
        self.run(move |c| c.list(&filter)).await
    }

    /// [`CatalogStore::versions`], off the async runtime.
    pub async fn versions(&self, key: &str) -> Result<Vec<Entry>> {
        let key = key.to_string();
        self.run(move |c| c.versions(&key)).await
    }

    /// [`CatalogStore::delete`], off the async runtime.
    pub async fn delete(&self, key: &str, uid: Option<&str>, permanent: bool) -> Result<Deleted> {
        let (key, uid) = (key.to_string(), uid.map(str::to_string));
        self.run(move |c| c.delete(&key, uid.as_deref(), permanent))
            .await
    }

    /// [`CatalogStore::artifact_paths`], off the async runtime.
    pub async fn artifact_paths(&self) -> Result<Vec<String>> {
        self.run(|c| c.artifact_paths()).await
    }

    /// [`CatalogStore::create_token`], off the async runtime.
    pub async fn create_token(&self, name: &str, role: Role, hash: &str) -> Result<TokenRecord> {
        let (name, hash) = (name.to_string(), hash.to_string());
        self.run(move |c| c.create_token(&name, role, &hash)).await
    }

    /// [`CatalogStore::tokens`], off the async runtime.
    pub async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.run(|c| c.tokens()).await
    }

    /// [`CatalogStore::revoke_token`], off the async runtime.
    pub async fn revoke_token(&self, name: &str) -> Result<TokenRecord> {
        let name = name.to_string();
        self.run(move |c| c.revoke_token(&name)).await
    }

    /// The store itself, for synchronous callers such as the command line.
    pub fn store(&self) -> &dyn CatalogStore {
        self.0.as_ref()
    }
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// List, describe and read.
    Read,
    /// Also DoPut, register, create collections, delete and add columns.
    Write,
}

impl Role {
    /// Whether a holder of `self` may do what `needed` allows.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }

    /// The role's name, as `--role` and the catalog spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "read" => Ok(Role::Read),
            "write" => Ok(Role::Write),
            other => Err(Error::invalid(format!(
                "unknown role '{other}': expected 'read' or 'write'"
            ))),
        }
    }
}
