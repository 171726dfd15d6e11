//! The embedded SQLite catalog: WAL mode, a busy timeout and immediate transactions, so that a
//! server and the command line can write at once without corrupting it or failing spuriously.
//!
//! The file is long because it is one `CatalogStore`: each method is one transaction, and its SQL
//! reads best beside the invariants it keeps (one latest version per key, uids never issued
//! twice, members kept while a collection names them). The migrations open the file.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};

use super::ids::{self, now, uid, unix_millis};
use super::{
    ArtifactRecord, CatalogStore, CollectionRecord, Deleted, Entry, ManagedGuard, ManagedLock,
    NewArtifact, RecordFilter, Role, TokenRecord,
};
use crate::error::{Error, Result};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE artifacts (
    uid            TEXT PRIMARY KEY,
    stem           TEXT NOT NULL,
    key            TEXT NOT NULL,
    description    TEXT,
    suffix         TEXT NOT NULL,
    otype          TEXT,
    size           INTEGER NOT NULL,
    hash           TEXT NOT NULL,
    n_files        INTEGER,
    n_observations INTEGER,
    version        INTEGER NOT NULL,
    is_latest      INTEGER NOT NULL,
    created_at     TEXT NOT NULL,
    storage        TEXT NOT NULL,
    path           TEXT NOT NULL,
    managed        INTEGER NOT NULL,
    trusted        INTEGER NOT NULL,
    trashed_at     TEXT
);
CREATE INDEX artifacts_key ON artifacts(key);
CREATE INDEX artifacts_hash ON artifacts(hash);
CREATE UNIQUE INDEX artifacts_one_latest ON artifacts(key) WHERE is_latest = 1;

CREATE TABLE collections (
    uid         TEXT PRIMARY KEY,
    stem        TEXT NOT NULL,
    key         TEXT NOT NULL,
    description TEXT,
    hash        TEXT NOT NULL,
    version     INTEGER NOT NULL,
    is_latest   INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    trashed_at  TEXT
);
CREATE INDEX collections_key ON collections(key);
CREATE UNIQUE INDEX collections_one_latest ON collections(key) WHERE is_latest = 1;

CREATE TABLE collection_members (
    collection_uid TEXT NOT NULL REFERENCES collections(uid) ON DELETE CASCADE,
    position       INTEGER NOT NULL,
    artifact_uid   TEXT NOT NULL REFERENCES artifacts(uid),
    PRIMARY KEY (collection_uid, position)
);
"#,
    r#"
ALTER TABLE artifacts ADD COLUMN arrow_schema BLOB;
"#,
    r#"
CREATE TABLE tokens (
    name       TEXT PRIMARY KEY,
    role       TEXT NOT NULL CHECK (role IN ('read', 'write')),
    hash       TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
"#,
    r#"
-- The highest version ever issued per key, so that no uid is issued twice, even after the newest
-- versions were deleted permanently (a ticket naming a uid reads that content or nothing).
CREATE TABLE issued_versions (
    kind    TEXT NOT NULL,
    key     TEXT NOT NULL,
    stem    TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (kind, key)
);
INSERT INTO issued_versions SELECT 'artifacts', key, substr(uid, 1, 16), max(version)
    FROM artifacts GROUP BY key;
INSERT INTO issued_versions SELECT 'collections', key, substr(uid, 1, 16), max(version)
    FROM collections GROUP BY key;
"#,
    r#"
-- How each hash was taken: every byte (blake3), or a remote store's ETags (etag).
ALTER TABLE artifacts ADD COLUMN hash_type TEXT NOT NULL DEFAULT 'blake3';
"#,
    r#"
-- A fleet's servers: each renews its row while it serves (last_seen in Unix milliseconds).
CREATE TABLE servers (
    uri       TEXT PRIMARY KEY,
    last_seen INTEGER NOT NULL
);
"#,
];

const ARTIFACT_COLUMNS: &str = "uid, key, description, suffix, otype, size, hash, n_files, \
     n_observations, version, is_latest, created_at, storage, path, managed, trusted, trashed_at, \
     arrow_schema, hash_type";

/// The SQLite implementation of [`CatalogStore`].
pub struct SqliteCatalog {
    conn: Mutex<Connection>,
    /// Locked for [`CatalogStore::lock_managed`]: every process on this catalog file shares it.
    managed_lock: std::path::PathBuf,
}

impl SqliteCatalog {
    /// Opens the catalog file, creating and migrating it as needed.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
        }
        let mut conn = Connection::open(path)?;
        // Another process (the CLI next to a server) may hold the write lock for a moment.
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a committed record is on disk when the commit returns, as an answer promises.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        let mut managed_lock = path.as_os_str().to_owned();
        managed_lock.push(".managed.lock");
        Ok(Self {
            conn: Mutex::new(conn),
            managed_lock: managed_lock.into(),
        })
    }

    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.lock()?;
        // IMMEDIATE takes the write lock up front, so two writers queue on the busy timeout
        // instead of failing when a read transaction tries to upgrade.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.lock()?;
        f(&conn)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.conn
            .lock()
            .map_err(|_| Error::internal("catalog connection poisoned"))
    }
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let applied: usize = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if applied > MIGRATIONS.len() {
        return Err(Error::internal(format!(
            "catalog schema version {applied} is newer than this build knows ({})",
            MIGRATIONS.len()
        )));
    }
    for sql in &MIGRATIONS[applied..] {
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", MIGRATIONS.len())?;
    tx.commit()?;
    Ok(())
}

fn artifact_from_row(row: &Row<'_>) -> rusqlite::Result<ArtifactRecord> {
    Ok(ArtifactRecord {
        uid: row.get(0)?,
        key: row.get(1)?,
        description: row.get(2)?,
        suffix: row.get(3)?,
        otype: row.get(4)?,
        size: row.get(5)?,
        hash: row.get(6)?,
        n_files: row.get(7)?,
        n_observations: row.get(8)?,
        version: row.get(9)?,
        is_latest: row.get(10)?,
        created_at: row.get(11)?,
        storage: row.get(12)?,
        path: row.get(13)?,
        managed: row.get(14)?,
        trusted: row.get(15)?,
        trashed_at: row.get(16)?,
        arrow_schema: row.get(17)?,
        hash_type: row.get(18)?,
    })
}

fn artifact_where(
    conn: &Connection,
    clause: &str,
    args: impl rusqlite::Params,
) -> Result<Vec<ArtifactRecord>> {
    let sql = format!("SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE {clause}");
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(args, artifact_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn collection_where(
    conn: &Connection,
    clause: &str,
    args: impl rusqlite::Params,
) -> Result<Vec<CollectionRecord>> {
    let sql = format!(
        "SELECT uid, key, description, hash, version, is_latest, created_at, trashed_at \
         FROM collections WHERE {clause}"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let heads = stmt
        .query_map(args, |row| {
            Ok(CollectionRecord {
                uid: row.get(0)?,
                key: row.get(1)?,
                description: row.get(2)?,
                hash: row.get(3)?,
                version: row.get(4)?,
                is_latest: row.get(5)?,
                created_at: row.get(6)?,
                trashed_at: row.get(7)?,
                members: Vec::new(),
                member_keys: Vec::new(),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut members = conn.prepare_cached(
        "SELECT m.artifact_uid, a.key FROM collection_members m JOIN artifacts a ON a.uid = m.artifact_uid \
         WHERE m.collection_uid = ?1 ORDER BY m.position",
    )?;
    heads
        .into_iter()
        .map(|mut c| {
            let rows = members.query_map([&c.uid], |r| Ok((r.get(0)?, r.get(1)?)))?;
            for row in rows {
                let (uid, key): (String, String) = row?;
                c.members.push(uid);
                c.member_keys.push(key);
            }
            Ok(c)
        })
        .collect()
}

/// The next version of `key` in `table`: (stem, counter, version), and clears the old latest flag.
///
/// Versions only grow: the next one follows the highest ever issued for the key, including
/// versions since deleted, so a uid is never issued twice.
fn next_version(tx: &Transaction<'_>, table: &str, key: &str) -> Result<(String, u32, u32)> {
    let latest: Option<(String, u32)> = tx
        .query_row(
            &format!(
                "SELECT uid, version FROM {table} WHERE key = ?1 ORDER BY version DESC LIMIT 1"
            ),
            [key],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let issued: Option<(String, u32)> = tx
        .query_row(
            "SELECT stem, version FROM issued_versions WHERE kind = ?1 AND key = ?2",
            [table, key],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if latest.is_some() {
        tx.execute(
            &format!("UPDATE {table} SET is_latest = 0 WHERE key = ?1"),
            [key],
        )?;
    }
    let (stem, version) = ids::next_version(key, latest, issued)?;
    tx.execute(
        "INSERT INTO issued_versions (kind, key, stem, version) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (kind, key) DO UPDATE SET stem = excluded.stem, version = excluded.version",
        params![table, key, stem, version],
    )?;
    Ok((stem, version - 1, version))
}

/// After a version left the untrashed set, the newest remaining one becomes the latest.
fn promote_latest(tx: &Transaction<'_>, table: &str, key: &str) -> Result<()> {
    tx.execute(
        &format!("UPDATE {table} SET is_latest = 0 WHERE key = ?1"),
        [key],
    )?;
    tx.execute(
        &format!(
            "UPDATE {table} SET is_latest = 1 WHERE uid = (SELECT uid FROM {table} \
             WHERE key = ?1 AND trashed_at IS NULL ORDER BY version DESC LIMIT 1)"
        ),
        [key],
    )?;
    Ok(())
}

impl CatalogStore for SqliteCatalog {
    fn register(&self, new: NewArtifact) -> Result<(ArtifactRecord, bool)> {
        self.write(|tx| {
            if let Some(existing) =
                artifact_where(tx, "hash = ?1 AND trashed_at IS NULL ORDER BY version DESC LIMIT 1", [&new.hash])?
                    .pop()
            {
                return Ok((existing, false));
            }
            if !collection_where(tx, "key = ?1 AND trashed_at IS NULL", [&new.key])?.is_empty() {
                return Err(Error::invalid(format!("key '{}' already names a collection", new.key)));
            }
            let (stem, counter, version) = next_version(tx, "artifacts", &new.key)?;
            let uid = uid(&stem, counter);
            tx.execute(
                &format!(
                    "INSERT INTO artifacts ({ARTIFACT_COLUMNS}, stem) VALUES \
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 1, ?11, ?12, ?13, ?14, ?15, NULL, ?17, ?18, ?16)"
                ),
                params![
                    uid,
                    new.key,
                    new.description,
                    new.suffix,
                    new.otype,
                    new.size,
                    new.hash,
                    new.n_files,
                    new.n_observations,
                    version,
                    now(),
                    new.storage,
                    new.path,
                    new.managed,
                    new.trusted,
                    stem,
                    new.arrow_schema,
                    new.hash_type,
                ],
            )?;
            let record = artifact_where(tx, "uid = ?1", [&uid])?
                .pop()
                .ok_or_else(|| Error::internal(format!("artifact {uid} vanished after insert")))?;
            Ok((record, true))
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
        self.write(|tx| {
            let mut uids = Vec::with_capacity(member_keys.len());
            for member in member_keys {
                let found = artifact_where(tx, "key = ?1 AND is_latest = 1", [member])?;
                let record = found
                    .first()
                    .ok_or_else(|| Error::not_found(format!("no artifact with key '{member}'")))?;
                uids.push(record.uid.clone());
            }
            if !artifact_where(tx, "key = ?1 AND trashed_at IS NULL", [key])?.is_empty() {
                return Err(Error::invalid(format!("key '{key}' already names an artifact")));
            }
            let hash = crate::storage::hash_parts(uids.iter().map(String::as_bytes));
            if let Some(existing) =
                collection_where(tx, "key = ?1 AND hash = ?2 AND trashed_at IS NULL", params![key, hash])?.pop()
            {
                return Ok((existing, false));
            }
            let (stem, counter, version) = next_version(tx, "collections", key)?;
            let uid = uid(&stem, counter);
            tx.execute(
                "INSERT INTO collections (uid, stem, key, description, hash, version, is_latest, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?7)",
                params![uid, stem, key, description, hash, version, now()],
            )?;
            for (position, member) in uids.iter().enumerate() {
                tx.execute(
                    "INSERT INTO collection_members (collection_uid, position, artifact_uid) VALUES (?1, ?2, ?3)",
                    params![uid, position, member],
                )?;
            }
            let record = collection_where(tx, "uid = ?1", [&uid])?
                .pop()
                .ok_or_else(|| Error::internal(format!("collection {uid} vanished after insert")))?;
            Ok((record, true))
        })
    }

    fn resolve(&self, key: &str, uid: Option<&str>) -> Result<Entry> {
        self.read(|conn| {
            let (artifacts, collections) = match uid {
                Some(uid) => (
                    artifact_where(conn, "uid = ?1 AND key = ?2", [uid, key])?,
                    collection_where(conn, "uid = ?1 AND key = ?2", [uid, key])?,
                ),
                None => (
                    artifact_where(conn, "key = ?1 AND is_latest = 1", [key])?,
                    collection_where(conn, "key = ?1 AND is_latest = 1", [key])?,
                ),
            };
            if let Some(a) = artifacts.into_iter().next() {
                return Ok(Entry::Artifact(a));
            }
            if let Some(c) = collections.into_iter().next() {
                return Ok(Entry::Collection(c));
            }
            Err(Error::not_found(match uid {
                Some(uid) => format!("no version '{uid}' of key '{key}'"),
                None => format!("no artifact or collection with key '{key}'"),
            }))
        })
    }

    fn artifacts(&self, uids: &[String]) -> Result<Vec<ArtifactRecord>> {
        self.read(|conn| {
            uids.iter()
                .map(|uid| {
                    artifact_where(conn, "uid = ?1", [uid])?
                        .pop()
                        .ok_or_else(|| Error::not_found(format!("no artifact with uid '{uid}'")))
                })
                .collect()
        })
    }

    fn list(&self, filter: &RecordFilter) -> Result<Vec<Entry>> {
        self.read(|conn| {
            let mut entries: Vec<Entry> = artifact_where(
                conn,
                "is_latest = 1 AND (?1 IS NULL OR suffix = ?1) AND (?2 IS NULL OR otype = ?2) ORDER BY key",
                params![filter.suffix, filter.otype],
            )?
            .into_iter()
            .filter(|a| filter.matches_key(&a.key))
            .map(Entry::Artifact)
            .collect();
            if !filter.is_artifact_only() {
                entries.extend(
                    collection_where(conn, "is_latest = 1 ORDER BY key", [])?
                        .into_iter()
                        .filter(|c| filter.matches_key(&c.key))
                        .map(Entry::Collection),
                );
                entries.sort_by(|a, b| a.key().cmp(b.key()));
            }
            Ok(entries)
        })
    }

    fn versions(&self, key: &str) -> Result<Vec<Entry>> {
        self.read(|conn| {
            let mut entries: Vec<Entry> = artifact_where(conn, "key = ?1 ORDER BY version", [key])?
                .into_iter()
                .map(Entry::Artifact)
                .collect();
            entries.extend(
                collection_where(conn, "key = ?1 ORDER BY version", [key])?
                    .into_iter()
                    .map(Entry::Collection),
            );
            if entries.is_empty() {
                return Err(Error::not_found(format!(
                    "no artifact or collection with key '{key}'"
                )));
            }
            Ok(entries)
        })
    }

    fn delete(&self, key: &str, uid: Option<&str>, permanent: bool) -> Result<Deleted> {
        self.write(|tx| {
            let (artifacts, collections) = match uid {
                Some(uid) => (
                    artifact_where(tx, "key = ?1 AND uid = ?2", [key, uid])?,
                    collection_where(tx, "key = ?1 AND uid = ?2", [key, uid])?,
                ),
                None => (
                    artifact_where(tx, "key = ?1", [key])?,
                    collection_where(tx, "key = ?1", [key])?,
                ),
            };
            if artifacts.is_empty() && collections.is_empty() {
                return Err(Error::not_found(match uid {
                    Some(uid) => format!("no version '{uid}' of key '{key}'"),
                    None => format!("no artifact or collection with key '{key}'"),
                }));
            }
            let when = now();
            let mut deleted = Deleted { entries: Vec::new(), orphaned_paths: Vec::new() };
            for artifact in artifacts {
                if permanent {
                    let holder: Option<String> = tx
                        .query_row(
                            "SELECT c.key FROM collection_members m JOIN collections c ON c.uid = m.collection_uid \
                             WHERE m.artifact_uid = ?1 LIMIT 1",
                            [&artifact.uid],
                            |r| r.get(0),
                        )
                        .optional()?;
                    if let Some(holder) = holder {
                        return Err(Error::invalid(format!(
                            "artifact '{}' ({}) is a member of collection '{holder}'; delete the collection first",
                            artifact.key, artifact.uid
                        )));
                    }
                    tx.execute("DELETE FROM artifacts WHERE uid = ?1", [&artifact.uid])?;
                    // Managed files are content-addressed: another record may still use the file.
                    let users: i64 = tx.query_row(
                        "SELECT count(*) FROM artifacts WHERE path = ?1",
                        [&artifact.path],
                        |r| r.get(0),
                    )?;
                    if artifact.managed && users == 0 {
                        deleted.orphaned_paths.push(artifact.path.clone());
                    }
                } else {
                    tx.execute(
                        "UPDATE artifacts SET trashed_at = coalesce(trashed_at, ?2), is_latest = 0 WHERE uid = ?1",
                        [&artifact.uid, &when],
                    )?;
                }
                deleted.entries.push(Entry::Artifact(artifact));
            }
            for collection in collections {
                if permanent {
                    tx.execute("DELETE FROM collections WHERE uid = ?1", [&collection.uid])?;
                } else {
                    tx.execute(
                        "UPDATE collections SET trashed_at = coalesce(trashed_at, ?2), is_latest = 0 WHERE uid = ?1",
                        [&collection.uid, &when],
                    )?;
                }
                deleted.entries.push(Entry::Collection(collection));
            }
            promote_latest(tx, "artifacts", key)?;
            promote_latest(tx, "collections", key)?;
            Ok(deleted)
        })
    }

    fn artifact_paths(&self) -> Result<Vec<String>> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT DISTINCT path FROM artifacts")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    fn create_token(&self, name: &str, role: Role, hash: &str) -> Result<TokenRecord> {
        ids::check_token_name(name)?;
        self.write(|tx| {
            let exists: Option<String> = tx
                .query_row("SELECT name FROM tokens WHERE name = ?1", [name], |r| {
                    r.get(0)
                })
                .optional()?;
            if exists.is_some() {
                return Err(Error::invalid(format!(
                    "a token named '{name}' exists; revoke it first or pick another name"
                )));
            }
            let created_at = now();
            tx.execute(
                "INSERT INTO tokens (name, role, hash, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![name, role.as_str(), hash, created_at],
            )?;
            Ok(TokenRecord {
                name: name.to_string(),
                role,
                hash: hash.to_string(),
                created_at,
            })
        })
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT name, role, hash, created_at FROM tokens ORDER BY name")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get(2)?,
                    r.get(3)?,
                ))
            })?;
            rows.map(|row| {
                let (name, role, hash, created_at) = row?;
                Ok(TokenRecord {
                    name,
                    role: role.parse()?,
                    hash,
                    created_at,
                })
            })
            .collect()
        })
    }

    fn revoke_token(&self, name: &str) -> Result<TokenRecord> {
        self.write(|tx| {
            let found = tx
                .query_row(
                    "SELECT role, hash, created_at FROM tokens WHERE name = ?1",
                    [name],
                    |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let Some((role, hash, created_at)) = found else {
                return Err(Error::not_found(format!("no token named '{name}'")));
            };
            tx.execute("DELETE FROM tokens WHERE name = ?1", [name])?;
            Ok(TokenRecord {
                name: name.to_string(),
                role: role.parse()?,
                hash,
                created_at,
            })
        })
    }

    fn heartbeat(&self, uri: &str) -> Result<()> {
        let now = unix_millis(std::time::SystemTime::now());
        self.write(|tx| {
            tx.execute(
                "INSERT INTO servers (uri, last_seen) VALUES (?1, ?2) \
                 ON CONFLICT(uri) DO UPDATE SET last_seen = excluded.last_seen",
                params![uri, now],
            )?;
            Ok(())
        })
    }

    fn live_servers(&self, window: Duration) -> Result<Vec<String>> {
        let since = std::time::SystemTime::now()
            .checked_sub(window)
            .map_or(0, unix_millis);
        let conn = self.lock()?;
        let mut stmt =
            conn.prepare("SELECT uri FROM servers WHERE last_seen >= ?1 ORDER BY uri")?;
        let uris = stmt
            .query_map([since], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        Ok(uris)
    }

    fn leave(&self, uri: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute("DELETE FROM servers WHERE uri = ?1", [uri])?;
            Ok(())
        })
    }

    fn lock_managed(&self, how: ManagedLock) -> Result<ManagedGuard> {
        let path = &self.managed_lock;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path.display(), e))?;
        match how {
            ManagedLock::Shared => file.lock_shared(),
            ManagedLock::Exclusive => file.lock(),
        }
        .map_err(|e| Error::io(path.display(), e))?;
        Ok(ManagedGuard::new(file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_artifact(key: &str, hash: &str) -> NewArtifact {
        NewArtifact {
            hash_type: "blake3".into(),
            key: key.into(),
            description: None,
            suffix: ".parquet".into(),
            otype: Some("DataFrame".into()),
            size: 10,
            hash: hash.into(),
            n_files: None,
            n_observations: Some(3),
            storage: "file:///tmp".into(),
            path: format!("file:///tmp/{key}"),
            managed: false,
            trusted: false,
            arrow_schema: None,
        }
    }

    #[test]
    fn versions_share_a_stem_and_move_latest() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let catalog = SqliteCatalog::open(&dir.path().join("catalog.sqlite"))?;
        let (v1, created) = catalog.register(new_artifact("a", "h1"))?;
        assert!(created);
        assert_eq!(v1.uid.len(), 20);
        assert!(v1.uid.ends_with("0000"));
        let (same, created) = catalog.register(new_artifact("a", "h1"))?;
        assert!(!created);
        assert_eq!(same.uid, v1.uid);
        let (v2, _) = catalog.register(new_artifact("a", "h2"))?;
        assert_eq!(&v2.uid[..16], &v1.uid[..16]);
        assert!(v2.uid.ends_with("0001"));
        assert_eq!(v2.version, 2);
        let Entry::Artifact(latest) = catalog.resolve("a", None)? else {
            panic!("not an artifact")
        };
        assert_eq!(latest.uid, v2.uid);
        let Entry::Artifact(old) = catalog.resolve("a", Some(&v1.uid))? else {
            panic!("not an artifact")
        };
        assert!(!old.is_latest);
        // Trashing the latest version promotes the previous one.
        catalog.delete("a", Some(&v2.uid), false)?;
        let Entry::Artifact(latest) = catalog.resolve("a", None)? else {
            panic!("not an artifact")
        };
        assert_eq!(latest.uid, v1.uid);
        Ok(())
    }

    #[test]
    fn tokens_are_kept_hashed_and_revocable() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let catalog = SqliteCatalog::open(&dir.path().join("catalog.sqlite"))?;
        let t = catalog.create_token("ci", Role::Write, "hash-1")?;
        assert_eq!((t.name.as_str(), t.role), ("ci", Role::Write));
        assert!(matches!(
            catalog.create_token("ci", Role::Read, "hash-2"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            catalog.create_token("a:b", Role::Read, "hash-3"),
            Err(Error::InvalidArgument(_))
        ));
        catalog.create_token("bi", Role::Read, "hash-4")?;
        let names: Vec<String> = catalog.tokens()?.into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["bi", "ci"]);
        assert_eq!(catalog.revoke_token("ci")?.hash, "hash-1");
        assert!(matches!(
            catalog.revoke_token("ci"),
            Err(Error::NotFound(_))
        ));
        assert_eq!(catalog.tokens()?.len(), 1);
        Ok(())
    }

    #[test]
    fn reopening_keeps_records() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = dir.path().join("catalog.sqlite");
        let (a, _) = SqliteCatalog::open(&path)?.register(new_artifact("a", "h1"))?;
        let reopened = SqliteCatalog::open(&path)?;
        assert_eq!(reopened.resolve("a", None)?, Entry::Artifact(a));
        Ok(())
    }

    #[test]
    fn commits_are_synced_to_disk() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let catalog = SqliteCatalog::open(&dir.path().join("catalog.sqlite"))?;
        let synchronous: i64 =
            catalog.read(|c| Ok(c.query_row("PRAGMA synchronous", [], |r| r.get(0))?))?;
        assert_eq!(synchronous, 2, "synchronous = FULL");
        Ok(())
    }

    #[test]
    fn uids_are_never_issued_twice() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let catalog = SqliteCatalog::open(&dir.path().join("catalog.sqlite"))?;
        let (v1, _) = catalog.register(new_artifact("k", "h1"))?;
        let (v2, _) = catalog.register(new_artifact("k", "h2"))?;
        catalog.delete("k", Some(&v2.uid), true)?;
        let (v3, _) = catalog.register(new_artifact("k", "h3"))?;
        assert_ne!(v3.uid, v2.uid);
        assert_eq!((v1.version, v3.version), (1, 3));
        // Every version gone: the key's counter still goes on.
        catalog.delete("k", None, true)?;
        let (v4, _) = catalog.register(new_artifact("k", "h4"))?;
        assert!(![&v1.uid, &v2.uid, &v3.uid].contains(&&v4.uid));
        assert_eq!(v4.version, 4);
        Ok(())
    }

    #[test]
    fn concurrent_writers_do_not_fail() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = dir.path().join("catalog.sqlite");
        SqliteCatalog::open(&path)?;
        let handles: Vec<_> = (0..4)
            .map(|w| {
                let path = path.clone();
                std::thread::spawn(move || -> Result<()> {
                    // A connection per thread stands in for separate processes.
                    let catalog = SqliteCatalog::open(&path)?;
                    for i in 0..25 {
                        catalog
                            .register(new_artifact(&format!("k{}", i % 5), &format!("h{w}-{i}")))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| Error::internal("writer panicked"))??;
        }
        let catalog = SqliteCatalog::open(&path)?;
        let total: usize = (0..5)
            .map(|k| catalog.versions(&format!("k{k}")).map(|v| v.len()))
            .sum::<Result<usize>>()?;
        assert_eq!(total, 100);
        assert_eq!(catalog.list(&RecordFilter::default())?.len(), 5);
        Ok(())
    }
}
