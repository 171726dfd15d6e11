//! The catalog in PostgreSQL, shared by a fleet's servers on several machines.
//!
//! The same records and rules as the SQLite store (`sqlite.rs`), in PostgreSQL's dialect, through
//! tokio-postgres with a deadpool pool. Writes take one transaction-scoped advisory lock, so
//! versions and `is_latest` move as they do under SQLite's single writer, whichever server of the
//! fleet writes. The store runs its pool on a small runtime of its own: `CatalogStore` calls block
//! (they run on the blocking pool), and must not depend on the caller's runtime.
//!
//! The file is long because it is one `CatalogStore`: each method is one transaction, and its SQL
//! reads best next to the code that binds it.

use std::future::Future;

use deadpool_postgres::{GenericClient, Pool, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;

use super::ids::{self, now, uid, unix_millis};
use super::{
    ArtifactRecord, CatalogStore, CollectionRecord, Deleted, Entry, ManagedGuard, ManagedLock,
    NewArtifact, RecordFilter, Role, TokenRecord,
};
use crate::error::{Error, Result};

/// The advisory lock every write holds: one writer at a time across the fleet.
const WRITE_LOCK: i64 = 0x6172_7469_666c_6967; // "artiflig"
/// The advisory lock of [`CatalogStore::lock_managed`], held on a connection of its own.
const MANAGED_LOCK: i64 = 0x6d61_6e61_6765_6421; // "managed!"

const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE artifacts (
    uid            TEXT PRIMARY KEY,
    stem           TEXT NOT NULL,
    key            TEXT NOT NULL,
    description    TEXT,
    suffix         TEXT NOT NULL,
    otype          TEXT,
    size           BIGINT NOT NULL,
    hash           TEXT NOT NULL,
    hash_type      TEXT NOT NULL DEFAULT 'blake3',
    n_files        BIGINT,
    n_observations BIGINT,
    version        INTEGER NOT NULL,
    is_latest      BOOLEAN NOT NULL,
    created_at     TEXT NOT NULL,
    storage        TEXT NOT NULL,
    path           TEXT NOT NULL,
    managed        BOOLEAN NOT NULL,
    trusted        BOOLEAN NOT NULL,
    trashed_at     TEXT,
    arrow_schema   BYTEA
);
CREATE INDEX artifacts_key ON artifacts(key);
CREATE INDEX artifacts_hash ON artifacts(hash);
CREATE UNIQUE INDEX artifacts_one_latest ON artifacts(key) WHERE is_latest;

CREATE TABLE collections (
    uid         TEXT PRIMARY KEY,
    stem        TEXT NOT NULL,
    key         TEXT NOT NULL,
    description TEXT,
    hash        TEXT NOT NULL,
    version     INTEGER NOT NULL,
    is_latest   BOOLEAN NOT NULL,
    created_at  TEXT NOT NULL,
    trashed_at  TEXT
);
CREATE INDEX collections_key ON collections(key);
CREATE UNIQUE INDEX collections_one_latest ON collections(key) WHERE is_latest;

CREATE TABLE collection_members (
    collection_uid TEXT NOT NULL REFERENCES collections(uid) ON DELETE CASCADE,
    position       INTEGER NOT NULL,
    artifact_uid   TEXT NOT NULL REFERENCES artifacts(uid),
    PRIMARY KEY (collection_uid, position)
);

CREATE TABLE tokens (
    name       TEXT PRIMARY KEY,
    role       TEXT NOT NULL CHECK (role IN ('read', 'write')),
    hash       TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);

CREATE TABLE issued_versions (
    kind    TEXT NOT NULL,
    key     TEXT NOT NULL,
    stem    TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (kind, key)
);

CREATE TABLE servers (
    uri       TEXT PRIMARY KEY,
    last_seen BIGINT NOT NULL
);
"#];

const ARTIFACT_COLUMNS: &str = "uid, key, description, suffix, otype, size, hash, n_files, \
     n_observations, version, is_latest, created_at, storage, path, managed, trusted, trashed_at, \
     arrow_schema, hash_type";

const COLLECTION_COLUMNS: &str =
    "uid, key, description, hash, version, is_latest, created_at, trashed_at";

/// A PostgreSQL catalog: a pool of connections and the runtime that drives them.
pub struct PostgresCatalog {
    pool: Pool,
    /// Taken on drop and shut down in the background: dropping a runtime may not block.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for PostgresCatalog {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn pg(context: &str) -> impl FnOnce(tokio_postgres::Error) -> Error + '_ {
    move |e| Error::internal_from(format!("catalog (PostgreSQL): {context}"), e)
}

fn pool_error(e: deadpool_postgres::PoolError) -> Error {
    Error::internal_from("catalog (PostgreSQL): no connection", e)
}

impl PostgresCatalog {
    /// Connects to `url` (`postgres://USER@HOST:PORT/DB`) and migrates the schema.
    pub fn open(url: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("catalog-postgres")
            .enable_all()
            .build()
            .map_err(|e| Error::internal_from("catalog (PostgreSQL): runtime", e))?;
        let config = deadpool_postgres::Config {
            url: Some(url.to_string()),
            ..Default::default()
        };
        let pool = {
            let _entered = runtime.enter();
            config
                .create_pool(Some(Runtime::Tokio1), NoTls)
                .map_err(|e| Error::invalid(format!("--catalog: {e}")))?
        };
        let store = Self {
            pool,
            runtime: Some(runtime),
        };
        store.block(store.migrate())?;
        Ok(store)
    }

    /// Runs `work` on the store's runtime and waits for it, from any thread: one inside an
    /// async context hands the wait to a thread of its own.
    fn block<T: Send>(&self, work: impl Future<Output = Result<T>> + Send) -> Result<T> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| Error::internal("catalog (PostgreSQL): closed"))?;
        if tokio::runtime::Handle::try_current().is_err() {
            return runtime.block_on(work);
        }
        std::thread::scope(|scope| {
            scope
                .spawn(|| runtime.block_on(work))
                .join()
                .unwrap_or_else(|_| Err(Error::internal("catalog (PostgreSQL): call panicked")))
        })
    }

    async fn migrate(&self) -> Result<()> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(pg("begin"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
            .await
            .map_err(pg("lock"))?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            .await
            .map_err(pg("schema_version"))?;
        let applied: i32 = tx
            .query_opt("SELECT version FROM schema_version", &[])
            .await
            .map_err(pg("schema_version"))?
            .map_or(0, |r| r.get(0));
        let known = MIGRATIONS.len() as i32;
        if applied > known {
            return Err(Error::internal(format!(
                "catalog schema version {applied} is newer than this build knows ({known})"
            )));
        }
        for sql in &MIGRATIONS[applied as usize..] {
            tx.batch_execute(sql).await.map_err(pg("migration"))?;
        }
        tx.execute("DELETE FROM schema_version", &[])
            .await
            .map_err(pg("schema_version"))?;
        tx.execute("INSERT INTO schema_version VALUES ($1)", &[&known])
            .await
            .map_err(pg("schema_version"))?;
        tx.commit().await.map_err(pg("commit"))
    }

    /// Runs `f` in a transaction that holds the fleet's write lock.
    fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: for<'t> FnOnce(&'t deadpool_postgres::Transaction<'t>) -> BoxFut<'t, T> + Send,
    {
        self.block(async move {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg("begin"))?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
                .await
                .map_err(pg("lock"))?;
            let out = f(&tx).await?;
            tx.commit().await.map_err(pg("commit"))?;
            Ok(out)
        })
    }

    /// Runs `f` on a pooled connection, without a lock.
    fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: for<'c> FnOnce(&'c deadpool_postgres::Client) -> BoxFut<'c, T> + Send,
    {
        self.block(async move {
            let client = self.pool.get().await.map_err(pool_error)?;
            f(&client).await
        })
    }
}

type BoxFut<'a, T> = std::pin::Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

fn unsigned(value: Option<i64>) -> Option<u64> {
    value.and_then(|v| u64::try_from(v).ok())
}

fn signed(value: Option<u64>) -> Option<i64> {
    value.and_then(|v| i64::try_from(v).ok())
}

fn artifact_from_row(row: &tokio_postgres::Row) -> ArtifactRecord {
    ArtifactRecord {
        uid: row.get(0),
        key: row.get(1),
        description: row.get(2),
        suffix: row.get(3),
        otype: row.get(4),
        size: unsigned(row.get(5)).unwrap_or(0),
        hash: row.get(6),
        n_files: unsigned(row.get(7)),
        n_observations: unsigned(row.get(8)),
        version: u32::try_from(row.get::<_, i32>(9)).unwrap_or(0),
        is_latest: row.get(10),
        created_at: row.get(11),
        storage: row.get(12),
        path: row.get(13),
        managed: row.get(14),
        trusted: row.get(15),
        trashed_at: row.get(16),
        arrow_schema: row.get(17),
        hash_type: row.get(18),
    }
}

async fn artifact_where<C: GenericClient>(
    client: &C,
    clause: &str,
    args: &[&(dyn ToSql + Sync)],
) -> Result<Vec<ArtifactRecord>> {
    let sql = format!("SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE {clause}");
    let rows = client.query(&sql, args).await.map_err(pg("artifacts"))?;
    Ok(rows.iter().map(artifact_from_row).collect())
}

async fn collection_where<C: GenericClient>(
    client: &C,
    clause: &str,
    args: &[&(dyn ToSql + Sync)],
) -> Result<Vec<CollectionRecord>> {
    let sql = format!("SELECT {COLLECTION_COLUMNS} FROM collections WHERE {clause}");
    let rows = client.query(&sql, args).await.map_err(pg("collections"))?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let mut c = CollectionRecord {
            uid: row.get(0),
            key: row.get(1),
            description: row.get(2),
            hash: row.get(3),
            version: u32::try_from(row.get::<_, i32>(4)).unwrap_or(0),
            is_latest: row.get(5),
            created_at: row.get(6),
            trashed_at: row.get(7),
            members: Vec::new(),
            member_keys: Vec::new(),
        };
        let members = client
            .query(
                "SELECT m.artifact_uid, a.key FROM collection_members m \
                 JOIN artifacts a ON a.uid = m.artifact_uid \
                 WHERE m.collection_uid = $1 ORDER BY m.position",
                &[&c.uid],
            )
            .await
            .map_err(pg("collection members"))?;
        for member in members {
            c.members.push(member.get(0));
            c.member_keys.push(member.get(1));
        }
        out.push(c);
    }
    Ok(out)
}

/// The next version of `key` in `table`: (stem, counter, version); clears the old latest flag.
/// Versions only grow, past deleted ones too, so a uid is never issued twice.
async fn next_version<C: GenericClient>(
    tx: &C,
    table: &str,
    key: &str,
) -> Result<(String, u32, u32)> {
    let version_of = |v: i32| u32::try_from(v).unwrap_or(0);
    let latest = tx
        .query_opt(
            &format!(
                "SELECT uid, version FROM {table} WHERE key = $1 ORDER BY version DESC LIMIT 1"
            ),
            &[&key],
        )
        .await
        .map_err(pg("versions"))?
        .map(|r| (r.get::<_, String>(0), version_of(r.get(1))));
    let issued = tx
        .query_opt(
            "SELECT stem, version FROM issued_versions WHERE kind = $1 AND key = $2",
            &[&table, &key],
        )
        .await
        .map_err(pg("issued versions"))?
        .map(|r| (r.get::<_, String>(0), version_of(r.get(1))));
    if latest.is_some() {
        tx.execute(
            &format!("UPDATE {table} SET is_latest = FALSE WHERE key = $1"),
            &[&key],
        )
        .await
        .map_err(pg("latest"))?;
    }
    let (stem, version) = ids::next_version(key, latest, issued)?;
    let stored = i32::try_from(version)
        .map_err(|_| Error::invalid(format!("'{key}' has no versions left")))?;
    tx.execute(
        "INSERT INTO issued_versions (kind, key, stem, version) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (kind, key) DO UPDATE SET stem = excluded.stem, version = excluded.version",
        &[&table, &key, &stem, &stored],
    )
    .await
    .map_err(pg("issued versions"))?;
    Ok((stem, version - 1, version))
}

/// After a version left the untrashed set, the newest remaining one becomes the latest.
async fn promote_latest<C: GenericClient>(tx: &C, table: &str, key: &str) -> Result<()> {
    tx.execute(
        &format!("UPDATE {table} SET is_latest = FALSE WHERE key = $1"),
        &[&key],
    )
    .await
    .map_err(pg("latest"))?;
    tx.execute(
        &format!(
            "UPDATE {table} SET is_latest = TRUE WHERE uid = (SELECT uid FROM {table} \
             WHERE key = $1 AND trashed_at IS NULL ORDER BY version DESC LIMIT 1)"
        ),
        &[&key],
    )
    .await
    .map_err(pg("latest"))?;
    Ok(())
}

fn not_found(key: &str, uid: Option<&str>) -> Error {
    Error::not_found(match uid {
        Some(uid) => format!("no version '{uid}' of key '{key}'"),
        None => format!("no artifact or collection with key '{key}'"),
    })
}

impl CatalogStore for PostgresCatalog {
    fn register(&self, new: NewArtifact) -> Result<(ArtifactRecord, bool)> {
        self.write(move |tx| {
            Box::pin(async move {
                let known = artifact_where(
                    tx,
                    "hash = $1 AND trashed_at IS NULL ORDER BY version DESC LIMIT 1",
                    &[&new.hash],
                )
                .await?;
                if let Some(existing) = known.into_iter().next() {
                    return Ok((existing, false));
                }
                let clash =
                    collection_where(tx, "key = $1 AND trashed_at IS NULL", &[&new.key]).await?;
                if !clash.is_empty() {
                    return Err(Error::invalid(format!(
                        "key '{}' already names a collection",
                        new.key
                    )));
                }
                let (stem, counter, version) = next_version(tx, "artifacts", &new.key).await?;
                let uid = uid(&stem, counter);
                tx.execute(
                    &format!(
                        "INSERT INTO artifacts ({ARTIFACT_COLUMNS}, stem) VALUES ($1, $2, $3, $4, \
                         $5, $6, $7, $8, $9, $10, TRUE, $11, $12, $13, $14, $15, NULL, $16, $17, $18)"
                    ),
                    &[
                        &uid,
                        &new.key,
                        &new.description,
                        &new.suffix,
                        &new.otype,
                        &signed(Some(new.size)),
                        &new.hash,
                        &signed(new.n_files),
                        &signed(new.n_observations),
                        &(version as i32),
                        &now(),
                        &new.storage,
                        &new.path,
                        &new.managed,
                        &new.trusted,
                        &new.arrow_schema,
                        &new.hash_type,
                        &stem,
                    ],
                )
                .await
                .map_err(pg("register"))?;
                let record = artifact_where(tx, "uid = $1", &[&uid])
                    .await?
                    .pop()
                    .ok_or_else(|| {
                        Error::internal(format!("artifact {uid} vanished after insert"))
                    })?;
                Ok((record, true))
            })
        })
    }

    fn create_collection(
        &self,
        key: &str,
        member_keys: &[String],
        description: Option<String>,
    ) -> Result<(CollectionRecord, bool)> {
        if member_keys.is_empty() {
            return Err(Error::invalid("a collection needs at least one member"));
        }
        let (key, member_keys) = (key.to_owned(), member_keys.to_vec());
        self.write(move |tx| {
            Box::pin(async move {
                let mut uids = Vec::with_capacity(member_keys.len());
                for member in &member_keys {
                    let found = artifact_where(tx, "key = $1 AND is_latest", &[member]).await?;
                    let record = found.first().ok_or_else(|| {
                        Error::not_found(format!("no artifact with key '{member}'"))
                    })?;
                    uids.push(record.uid.clone());
                }
                if !artifact_where(tx, "key = $1 AND trashed_at IS NULL", &[&key])
                    .await?
                    .is_empty()
                {
                    return Err(Error::invalid(format!(
                        "key '{key}' already names an artifact"
                    )));
                }
                let hash = crate::storage::hash_parts(uids.iter().map(String::as_bytes));
                let same = collection_where(
                    tx,
                    "key = $1 AND hash = $2 AND trashed_at IS NULL",
                    &[&key, &hash],
                )
                .await?;
                if let Some(existing) = same.into_iter().next() {
                    return Ok((existing, false));
                }
                let (stem, counter, version) = next_version(tx, "collections", &key).await?;
                let uid = uid(&stem, counter);
                tx.execute(
                    "INSERT INTO collections (uid, stem, key, description, hash, version, \
                     is_latest, created_at) VALUES ($1, $2, $3, $4, $5, $6, TRUE, $7)",
                    &[
                        &uid,
                        &stem,
                        &key,
                        &description,
                        &hash,
                        &(version as i32),
                        &now(),
                    ],
                )
                .await
                .map_err(pg("collection"))?;
                for (position, member) in uids.iter().enumerate() {
                    tx.execute(
                        "INSERT INTO collection_members (collection_uid, position, artifact_uid) \
                         VALUES ($1, $2, $3)",
                        &[&uid, &(position as i32), member],
                    )
                    .await
                    .map_err(pg("collection members"))?;
                }
                let record = collection_where(tx, "uid = $1", &[&uid])
                    .await?
                    .pop()
                    .ok_or_else(|| {
                        Error::internal(format!("collection {uid} vanished after insert"))
                    })?;
                Ok((record, true))
            })
        })
    }

    fn resolve(&self, key: &str, uid: Option<&str>) -> Result<Entry> {
        let (key, uid) = (key.to_owned(), uid.map(str::to_owned));
        self.read(move |c| {
            Box::pin(async move {
                let (artifacts, collections) = match &uid {
                    Some(uid) => (
                        artifact_where(c, "uid = $1 AND key = $2", &[&uid, &key]).await?,
                        collection_where(c, "uid = $1 AND key = $2", &[&uid, &key]).await?,
                    ),
                    None => (
                        artifact_where(c, "key = $1 AND is_latest", &[&key]).await?,
                        collection_where(c, "key = $1 AND is_latest", &[&key]).await?,
                    ),
                };
                if let Some(a) = artifacts.into_iter().next() {
                    return Ok(Entry::Artifact(a));
                }
                if let Some(c) = collections.into_iter().next() {
                    return Ok(Entry::Collection(c));
                }
                Err(not_found(&key, uid.as_deref()))
            })
        })
    }

    fn artifacts(&self, uids: &[String]) -> Result<Vec<ArtifactRecord>> {
        let uids = uids.to_vec();
        self.read(move |c| {
            Box::pin(async move {
                let mut out = Vec::with_capacity(uids.len());
                for uid in &uids {
                    let found = artifact_where(c, "uid = $1", &[uid]).await?.pop();
                    out.push(found.ok_or_else(|| {
                        Error::not_found(format!("no artifact with uid '{uid}'"))
                    })?);
                }
                Ok(out)
            })
        })
    }

    fn list(&self, filter: &RecordFilter) -> Result<Vec<Entry>> {
        let filter = filter.clone();
        self.read(move |c| {
            Box::pin(async move {
                let mut entries: Vec<Entry> = artifact_where(
                    c,
                    "is_latest AND ($1::TEXT IS NULL OR suffix = $1) \
                     AND ($2::TEXT IS NULL OR otype = $2) ORDER BY key",
                    &[&filter.suffix, &filter.otype],
                )
                .await?
                .into_iter()
                .filter(|a| filter.matches_key(&a.key))
                .map(Entry::Artifact)
                .collect();
                if !filter.is_artifact_only() {
                    entries.extend(
                        collection_where(c, "is_latest ORDER BY key", &[])
                            .await?
                            .into_iter()
                            .filter(|c| filter.matches_key(&c.key))
                            .map(Entry::Collection),
                    );
                    entries.sort_by(|a, b| a.key().cmp(b.key()));
                }
                Ok(entries)
            })
        })
    }

    fn versions(&self, key: &str) -> Result<Vec<Entry>> {
        let key = key.to_owned();
        self.read(move |c| {
            Box::pin(async move {
                let mut entries: Vec<Entry> =
                    artifact_where(c, "key = $1 ORDER BY version", &[&key])
                        .await?
                        .into_iter()
                        .map(Entry::Artifact)
                        .collect();
                entries.extend(
                    collection_where(c, "key = $1 ORDER BY version", &[&key])
                        .await?
                        .into_iter()
                        .map(Entry::Collection),
                );
                if entries.is_empty() {
                    return Err(not_found(&key, None));
                }
                Ok(entries)
            })
        })
    }

    fn delete(&self, key: &str, uid: Option<&str>, permanent: bool) -> Result<Deleted> {
        let (key, uid) = (key.to_owned(), uid.map(str::to_owned));
        self.write(move |tx| {
            Box::pin(async move {
                let (artifacts, collections) = match &uid {
                    Some(uid) => (
                        artifact_where(tx, "key = $1 AND uid = $2", &[&key, &uid]).await?,
                        collection_where(tx, "key = $1 AND uid = $2", &[&key, &uid]).await?,
                    ),
                    None => (
                        artifact_where(tx, "key = $1", &[&key]).await?,
                        collection_where(tx, "key = $1", &[&key]).await?,
                    ),
                };
                if artifacts.is_empty() && collections.is_empty() {
                    return Err(not_found(&key, uid.as_deref()));
                }
                let when = now();
                let mut deleted = Deleted {
                    entries: Vec::new(),
                    orphaned_paths: Vec::new(),
                };
                for artifact in artifacts {
                    if permanent {
                        let holder = tx
                            .query_opt(
                                "SELECT c.key FROM collection_members m JOIN collections c \
                                 ON c.uid = m.collection_uid WHERE m.artifact_uid = $1 LIMIT 1",
                                &[&artifact.uid],
                            )
                            .await
                            .map_err(pg("delete"))?;
                        if let Some(holder) = holder {
                            let holder: String = holder.get(0);
                            return Err(Error::invalid(format!(
                                "artifact '{}' ({}) is a member of collection '{holder}'; \
                                 delete the collection first",
                                artifact.key, artifact.uid
                            )));
                        }
                        tx.execute("DELETE FROM artifacts WHERE uid = $1", &[&artifact.uid])
                            .await
                            .map_err(pg("delete"))?;
                        // Managed files are content-addressed: another record may use the file.
                        let users: i64 = tx
                            .query_one(
                                "SELECT count(*) FROM artifacts WHERE path = $1",
                                &[&artifact.path],
                            )
                            .await
                            .map_err(pg("delete"))?
                            .get(0);
                        if artifact.managed && users == 0 {
                            deleted.orphaned_paths.push(artifact.path.clone());
                        }
                    } else {
                        tx.execute(
                            "UPDATE artifacts SET trashed_at = coalesce(trashed_at, $2), \
                             is_latest = FALSE WHERE uid = $1",
                            &[&artifact.uid, &when],
                        )
                        .await
                        .map_err(pg("trash"))?;
                    }
                    deleted.entries.push(Entry::Artifact(artifact));
                }
                for collection in collections {
                    if permanent {
                        tx.execute("DELETE FROM collections WHERE uid = $1", &[&collection.uid])
                            .await
                            .map_err(pg("delete"))?;
                    } else {
                        tx.execute(
                            "UPDATE collections SET trashed_at = coalesce(trashed_at, $2), \
                             is_latest = FALSE WHERE uid = $1",
                            &[&collection.uid, &when],
                        )
                        .await
                        .map_err(pg("trash"))?;
                    }
                    deleted.entries.push(Entry::Collection(collection));
                }
                promote_latest(tx, "artifacts", &key).await?;
                promote_latest(tx, "collections", &key).await?;
                Ok(deleted)
            })
        })
    }

    fn artifact_paths(&self) -> Result<Vec<String>> {
        self.read(|c| {
            Box::pin(async move {
                let rows = c
                    .query("SELECT DISTINCT path FROM artifacts", &[])
                    .await
                    .map_err(pg("paths"))?;
                Ok(rows.iter().map(|r| r.get(0)).collect())
            })
        })
    }

    fn create_token(&self, name: &str, role: Role, hash: &str) -> Result<TokenRecord> {
        ids::check_token_name(name)?;
        let (name, hash) = (name.to_owned(), hash.to_owned());
        self.write(move |tx| {
            Box::pin(async move {
                let exists = tx
                    .query_opt("SELECT name FROM tokens WHERE name = $1", &[&name])
                    .await
                    .map_err(pg("tokens"))?;
                if exists.is_some() {
                    return Err(Error::invalid(format!(
                        "a token named '{name}' exists; revoke it first or pick another name"
                    )));
                }
                let created_at = now();
                tx.execute(
                    "INSERT INTO tokens (name, role, hash, created_at) VALUES ($1, $2, $3, $4)",
                    &[&name, &role.as_str(), &hash, &created_at],
                )
                .await
                .map_err(pg("tokens"))?;
                Ok(TokenRecord {
                    name,
                    role,
                    hash,
                    created_at,
                })
            })
        })
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.read(|c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT name, role, hash, created_at FROM tokens ORDER BY name",
                        &[],
                    )
                    .await
                    .map_err(pg("tokens"))?;
                rows.iter()
                    .map(|r| {
                        Ok(TokenRecord {
                            name: r.get(0),
                            role: r.get::<_, String>(1).parse()?,
                            hash: r.get(2),
                            created_at: r.get(3),
                        })
                    })
                    .collect()
            })
        })
    }

    fn revoke_token(&self, name: &str) -> Result<TokenRecord> {
        let name = name.to_owned();
        self.write(move |tx| {
            Box::pin(async move {
                let found = tx
                    .query_opt(
                        "DELETE FROM tokens WHERE name = $1 RETURNING role, hash, created_at",
                        &[&name],
                    )
                    .await
                    .map_err(pg("tokens"))?
                    .ok_or_else(|| Error::not_found(format!("no token named '{name}'")))?;
                Ok(TokenRecord {
                    name,
                    role: found.get::<_, String>(0).parse()?,
                    hash: found.get(1),
                    created_at: found.get(2),
                })
            })
        })
    }

    fn heartbeat(&self, uri: &str) -> Result<()> {
        let (uri, now) = (uri.to_owned(), unix_millis(std::time::SystemTime::now()));
        self.read(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO servers (uri, last_seen) VALUES ($1, $2) \
                     ON CONFLICT (uri) DO UPDATE SET last_seen = excluded.last_seen",
                    &[&uri, &now],
                )
                .await
                .map_err(pg("heartbeat"))?;
                Ok(())
            })
        })
    }

    fn live_servers(&self, window: std::time::Duration) -> Result<Vec<String>> {
        let since = std::time::SystemTime::now()
            .checked_sub(window)
            .map_or(0, unix_millis);
        self.read(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT uri FROM servers WHERE last_seen >= $1 ORDER BY uri",
                        &[&since],
                    )
                    .await
                    .map_err(pg("servers"))?;
                Ok(rows.iter().map(|r| r.get(0)).collect())
            })
        })
    }

    fn leave(&self, uri: &str) -> Result<()> {
        let uri = uri.to_owned();
        self.read(move |c| {
            Box::pin(async move {
                c.execute("DELETE FROM servers WHERE uri = $1", &[&uri])
                    .await
                    .map_err(pg("leave"))?;
                Ok(())
            })
        })
    }

    fn lock_managed(&self, how: ManagedLock) -> Result<ManagedGuard> {
        let sql = match how {
            ManagedLock::Shared => "SELECT pg_advisory_lock_shared($1)",
            ManagedLock::Exclusive => "SELECT pg_advisory_lock($1)",
        };
        self.block(async move {
            let client = self.pool.get().await.map_err(pool_error)?;
            client
                .execute(sql, &[&MANAGED_LOCK])
                .await
                .map_err(pg("managed-storage lock"))?;
            // A session lock: the connection leaves the pool, and closing it (when the guard is
            // dropped, or the process dies) is what lets go.
            Ok(ManagedGuard::new(deadpool_postgres::Object::take(client)))
        })
    }
}
