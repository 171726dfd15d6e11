//! The write side: registering artifacts, making collections, storing uploads and deleting.
//! Shared by the Flight actions and the command line (which registers directly, as the operator).

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::SchemaRef;
use futures::{Stream, StreamExt};
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use url::Url;

use crate::catalog::{ArtifactRecord, CollectionRecord, Entry, ManagedLock, NewArtifact};
use crate::error::{Error, Result, guard_reader};
use crate::formats::{self, ReadRequest};
use crate::query::{Planner, unify_schemas};
use crate::storage::managed::{self, Upload, sync_dir, sync_tree};
use crate::storage::{Doomed, HashKind, ManagedStorage};

/// Writes to the catalog and managed storage.
#[derive(Clone)]
pub struct Registry {
    planner: Planner,
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > 1024 || key.chars().any(char::is_control) {
        return Err(Error::invalid(format!(
            "invalid key {key:?}: expected 1 to 1024 printable characters"
        )));
    }
    Ok(())
}

impl Registry {
    pub fn new(planner: Planner) -> Self {
        Self { planner }
    }

    pub fn planner(&self) -> &Planner {
        &self.planner
    }

    /// Registers the file or folder at `location` (a path or URL) under `key`. `trusted` is for the
    /// operator's own command line: it may register outside the allowed roots.
    ///
    /// Returns the record and whether it is new; content already registered returns its record.
    pub async fn register(
        &self,
        location: &str,
        key: &str,
        description: Option<String>,
        trusted: bool,
    ) -> Result<(ArtifactRecord, bool)> {
        check_key(key)?;
        let storage = self.planner.storage();
        let url = storage.resolve(location, !trusted)?;
        self.register_url(url, key, description, trusted, None)
            .await
    }

    /// Registers what `url` names. `managed` is the content hash of an upload just committed to
    /// managed storage: it names the file already, so the bytes are not read a second time.
    async fn register_url(
        &self,
        url: Url,
        key: &str,
        description: Option<String>,
        trusted: bool,
        managed: Option<String>,
    ) -> Result<(ArtifactRecord, bool)> {
        let storage = self.planner.storage();
        let located = storage.locate(&url).await?;
        let suffix = formats::artifact_suffix(&located);
        let format = formats::format_for(&located, &suffix)?;
        self.planner.use_store(&located);
        let ctx = self.planner.session();
        let inspection = guard_reader(&url, format.inspect(&ctx, &located)).await?;
        let (hash, hash_kind) = match &managed {
            Some(hash) => (hash.clone(), HashKind::Content),
            None => storage.identify(&located).await?,
        };
        let new = NewArtifact {
            key: key.to_string(),
            description,
            suffix,
            otype: inspection.otype,
            size: located.size(),
            hash,
            hash_type: hash_kind.as_str().into(),
            n_files: located.is_folder.then_some(located.files.len() as u64),
            n_observations: inspection.n_observations,
            // The located URL: a remote folder named without its slash is recorded with it.
            storage: storage.storage_root(&located.url),
            path: located.url.to_string(),
            managed: managed.is_some(),
            trusted,
            arrow_schema: inspection
                .schema
                .as_deref()
                .and_then(crate::catalog::encode_schema),
        };
        let (record, created) = self.planner.catalog().register(new).await?;
        tracing::info!(key, uid = %record.uid, created, "registered");
        Ok((record, created))
    }

    /// Makes a collection of the latest versions of `members`, refusing members whose columns clash.
    pub async fn create_collection(
        &self,
        key: &str,
        members: Vec<String>,
        description: Option<String>,
    ) -> Result<(CollectionRecord, bool)> {
        check_key(key)?;
        let ctx = self.planner.session();
        let mut schemas = Vec::with_capacity(members.len());
        for member in &members {
            let entry = self.planner.catalog().resolve(member, None).await?;
            let Entry::Artifact(record) = entry else {
                return Err(Error::invalid(format!(
                    "member '{member}' is a collection, not an artifact"
                )));
            };
            let table = self
                .planner
                .open(&ctx, &record, &ReadRequest::default())
                .await?
                .table;
            schemas.push((member.clone(), table.schema()));
        }
        unify_schemas(&schemas)?;
        self.planner
            .catalog()
            .create_collection(key, members, description)
            .await
    }

    /// Stores a stream of record batches as a parquet artifact in managed storage.
    pub async fn put<S>(
        &self,
        key: &str,
        description: Option<String>,
        schema: SchemaRef,
        mut batches: S,
    ) -> Result<(ArtifactRecord, bool)>
    where
        S: Stream<Item = Result<RecordBatch>> + Unpin,
    {
        check_key(key)?;
        let lease = self.hold_uploads().await?;
        let upload = Upload::new(&self.planner.storage().managed_dir(), "parquet");
        let path = upload.path.clone();
        let written = async {
            let file = tokio::fs::File::create(&path)
                .await
                .map_err(|e| Error::io(path.display(), e))?;
            let props = WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .build();
            let mut writer = AsyncArrowWriter::try_new(file, schema, Some(props))
                .map_err(|e| Error::invalid(format!("cannot write this schema as parquet: {e}")))?;
            while let Some(batch) = batches.next().await {
                writer
                    .write(&batch?)
                    .await
                    .map_err(|e| Error::invalid(format!("cannot write batch: {e}")))?;
            }
            writer
                .close()
                .await
                .map_err(|e| Error::internal_from("cannot finish upload", e))?;
            Ok::<_, Error>(())
        }
        .await;
        // A failed or abandoned write leaves nothing: `upload` removes its file when dropped.
        written?;
        self.commit(upload, lease, key, description).await
    }

    /// Finishes a complete upload: hashes it, renames it to its content address and registers it.
    ///
    /// Runs as a task of its own that holds the locks: a client that goes away (or a request
    /// timeout) drops the request, not this, so a renamed file never lacks the record it was
    /// renamed for, and no sweep or delete runs between the two.
    async fn commit(
        &self,
        upload: Upload,
        lease: std::fs::File,
        key: &str,
        description: Option<String>,
    ) -> Result<(ArtifactRecord, bool)> {
        let this = self.clone();
        let key = key.to_string();
        tokio::spawn(async move {
            let _lease = lease;
            let catalog = this.planner.catalog();
            let _commit = catalog.lock_managed(ManagedLock::Shared).await?;
            let storage = this.planner.storage();
            let folder = upload.path.is_dir();
            let url = |path: &std::path::Path| {
                if folder {
                    Url::from_directory_path(path)
                } else {
                    Url::from_file_path(path)
                }
                .map_err(|_| Error::internal(format!("bad managed path {}", path.display())))
            };
            // What a success answer promises survives a power loss: the data is on disk before
            // the rename, and the rename before the record.
            let written = upload.path.clone();
            tokio::task::spawn_blocking(move || sync_tree(&written))
                .await
                .map_err(|e| Error::internal_from("sync failed", e))?
                .map_err(|e| Error::io(upload.path.display(), e))?;
            let hash = storage
                .hash(&storage.locate(&url(&upload.path)?).await?)
                .await?;
            let name = format!("{hash}.{}", upload.extension);
            if let ManagedStorage::Remote(prefix) = storage.managed() {
                // Content-addressed: the same upload twice is the same object, written twice.
                // The staged file goes when `upload` is dropped.
                let target = prefix
                    .join(&name)
                    .map_err(|e| Error::internal_from("managed object URL", e))?;
                let (store, path) = storage.object_store(&target)?;
                managed::copy_to_store(&upload.path, store.as_ref(), &path).await?;
                return this
                    .register_url(target, &key, description, true, Some(hash))
                    .await;
            }
            // Content-addressed: the same upload twice is one file.
            let target = storage.managed_dir().join(name);
            if !(folder && target.exists()) {
                // A file renames over its identical twin; a folder cannot, and need not.
                tokio::fs::rename(&upload.path, &target)
                    .await
                    .map_err(|e| Error::io(target.display(), e))?;
                upload.keep();
                let managed = storage.managed_dir();
                tokio::task::spawn_blocking(move || sync_dir(&managed))
                    .await
                    .map_err(|e| Error::internal_from("sync failed", e))?
                    .map_err(|e| Error::io(target.display(), e))?;
            }
            this.register_url(url(&target)?, &key, description, true, Some(hash))
                .await
        })
        .await
        .map_err(|e| Error::internal_from("upload commit failed", e))?
    }

    /// Writes a new version of the zarr AnnData `key` with one more column in `element` (`obs` or
    /// `var`). The old version is untouched; unchanged files are shared by hard links.
    pub async fn add_column(
        &self,
        key: &str,
        element: &str,
        name: &str,
        values: ArrayRef,
    ) -> Result<(ArtifactRecord, bool)> {
        if !matches!(element, "obs" | "var") {
            return Err(Error::invalid(format!(
                "add_column adds to 'obs' or 'var', not '{element}'"
            )));
        }
        let entry = self.planner.catalog().resolve(key, None).await?;
        let Entry::Artifact(record) = entry else {
            return Err(Error::invalid(format!(
                "'{key}' is a collection, not an AnnData artifact"
            )));
        };
        if record.suffix != ".zarr" || record.otype.as_deref() != Some("AnnData") {
            return Err(Error::invalid(format!(
                "add_column writes new versions of zarr AnnData artifacts, and '{key}' is {} {}. \
                 An .h5ad is one HDF5 file whose versions could share nothing: convert it with \
                 `anndata.read_h5ad(path).write_zarr(path_zarr)` and register the .zarr",
                record.otype.as_deref().unwrap_or("an artifact"),
                if record.suffix.is_empty() {
                    "(a folder)"
                } else {
                    record.suffix.as_str()
                },
            )));
        }
        let source = Url::parse(&record.path)
            .ok()
            .and_then(|u| u.to_file_path().ok())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "add_column needs a local store; '{key}' is at {}",
                    record.path
                ))
            })?;
        let shape = self
            .planner
            .describe(&record, false)
            .await?
            .and_then(|s| s.get("shape").cloned())
            .and_then(|s| serde_json::from_value::<[u64; 2]>(s).ok())
            .ok_or_else(|| Error::invalid(format!("'{key}' has no AnnData shape")))?;
        let expected = if element == "obs" { shape[0] } else { shape[1] };
        if values.len() as u64 != expected {
            return Err(Error::invalid(format!(
                "add_column got {} values, but '{key}' has {expected} rows in {element}",
                values.len()
            )));
        }
        if let ManagedStorage::Remote(prefix) = self.planner.storage().managed() {
            return Err(Error::invalid(format!(
                "add_column writes new versions into local managed storage, and this server \
                 keeps uploads at {prefix}: run add_column on a server without --managed-storage"
            )));
        }
        let lease = self.hold_uploads().await?;
        let upload = Upload::new(&self.planner.storage().managed_dir(), "zarr");
        let (to, frame, column) = (upload.path.clone(), element.to_string(), name.to_string());
        let (this, key, description) = (self.clone(), key.to_string(), record.description.clone());
        // One task owns the copy, the upload and the lock until the record is committed: a
        // dropped request cannot remove the folder while the copy still writes into it.
        tokio::spawn(async move {
            tokio::task::spawn_blocking(move || {
                formats::add_column(&source, &to, &frame, &column, &values)
            })
            .await
            .map_err(|e| Error::internal_from("add_column failed", e))??;
            this.commit(upload, lease, &key, description).await
        })
        .await
        .map_err(|e| Error::internal_from("add_column failed", e))?
    }

    /// Holds the uploads lock of the local managed folder, so a sweep leaves this upload alone.
    async fn hold_uploads(&self) -> Result<std::fs::File> {
        managed::hold_uploads(&self.planner.storage().managed_dir()).await
    }

    /// Removes what a crashed upload left in managed storage: partial `.upload-*` files, and
    /// complete files whose record was never committed. Skipped (and logged) while another
    /// process is uploading into the same data dir. Returns how many entries were removed.
    pub async fn sweep_uploads(&self) -> usize {
        let catalog = self.planner.catalog().clone();
        let dir = self.planner.storage().managed_dir();
        let swept = tokio::task::spawn_blocking(move || {
            managed::sweep(&dir, || {
                Ok(catalog
                    .store()
                    .artifact_paths()?
                    .iter()
                    .filter_map(|p| Url::parse(p).ok()?.to_file_path().ok())
                    .filter_map(|p| p.file_name().map(|n| n.to_os_string()))
                    .collect())
            })
        })
        .await
        .map_err(|e| Error::internal_from("sweep failed", e))
        .and_then(|swept| swept);
        swept.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "managed storage not swept");
            0
        })
    }

    /// Trashes or deletes one version or all versions of `key`; managed files no record uses
    /// any more are removed. Files outside managed storage are never touched.
    pub async fn delete(
        &self,
        key: &str,
        version: Option<String>,
        permanent: bool,
    ) -> Result<Vec<Entry>> {
        let deleted = self
            .planner
            .catalog()
            .delete(key, version.as_deref(), permanent)
            .await?;
        if deleted.orphaned_paths.is_empty() {
            return Ok(deleted.entries);
        }
        // No upload on any server is between writing its file and committing its record while
        // this is held, and what they committed is visible: a path a record names again stays.
        let _commits = self
            .planner
            .catalog()
            .lock_managed(ManagedLock::Exclusive)
            .await?;
        let used: std::collections::HashSet<String> = self
            .planner
            .catalog()
            .artifact_paths()
            .await?
            .into_iter()
            .collect();
        let storage = self.planner.storage();
        for path in deleted.orphaned_paths.iter().filter(|p| !used.contains(*p)) {
            if !storage.is_managed(path) {
                continue;
            }
            let Ok(url) = Url::parse(path) else {
                continue;
            };
            let doomed = match url.to_file_path() {
                Ok(file) => Doomed::File(file),
                Err(()) => {
                    let (store, object) = storage.object_store(&url)?;
                    Doomed::Object(store, object)
                }
            };
            // Streams of this server still reading it finish first: removal waits for their
            // leases.
            let leases = std::sync::Arc::clone(storage.leases());
            let path = path.clone();
            tokio::task::spawn_blocking(move || leases.remove_when_unread(&path, doomed))
                .await
                .map_err(|e| Error::internal_from("removing deleted files failed", e))?;
        }
        Ok(deleted.entries)
    }
}
