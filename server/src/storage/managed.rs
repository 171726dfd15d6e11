//! Managed storage: where uploads and new versions are kept, content-addressed. They are written
//! under a temporary name in the data dir's `objects/`, synced, and then renamed to their hash
//! there, or, with `--managed-storage s3://...`, copied to their hash under that prefix, and then
//! registered. A lock file keeps a start-up sweep from removing what another process is about to
//! commit, the catalog's managed-storage lock keeps a delete on any server from removing it, and
//! the sweep removes what a crash left.

use crate::error::{Error, Result};

/// Files being written into managed storage start with this, until they are complete.
pub(crate) const UPLOAD_PREFIX: &str = ".upload-";

/// Every upload holds this file locked shared until its record is committed; a sweep takes it
/// exclusively, so it never removes what a running upload (of any process) is about to register.
/// The kernel drops the lock of a killed process, so a crash never blocks the next sweep.
pub(crate) const UPLOADS_LOCK: &str = ".uploads.lock";

/// A file or folder being written into managed storage, removed if dropped before it is kept.
pub(crate) struct Upload {
    pub(crate) path: std::path::PathBuf,
    pub(crate) extension: &'static str,
    kept: bool,
}

impl Upload {
    pub(crate) fn new(dir: &std::path::Path, extension: &'static str) -> Self {
        let name = format!("{UPLOAD_PREFIX}{:016x}.{extension}", rand::random::<u64>());
        Self {
            path: dir.join(name),
            extension,
            kept: false,
        }
    }

    pub(crate) fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let path = std::mem::take(&mut self.path);
        let remove = move || {
            if !path.exists() {
                return;
            }
            if let Err(e) = remove_entry(&path) {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove an unfinished upload");
            }
        };
        // Off the async threads: a folder (an unfinished add_column) takes a while to remove.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }
}

/// Copies the local file `from` to `to` in `store`, in parts, a few in flight at once.
pub(crate) async fn copy_to_store(
    from: &std::path::Path,
    store: &dyn object_store::ObjectStore,
    to: &object_store::path::Path,
) -> Result<()> {
    use object_store::ObjectStoreExt;
    use tokio::io::AsyncReadExt;
    const PART: usize = 8 << 20;
    let failed = |e: object_store::Error| Error::internal_from(format!("cannot copy to {to}"), e);
    let mut file = tokio::fs::File::open(from)
        .await
        .map_err(|e| Error::io(from.display(), e))?;
    let upload = store.put_multipart(to).await.map_err(failed)?;
    let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, PART);
    let mut buf = vec![0u8; PART];
    loop {
        let n = file
            .read(&mut buf)
            .await
            .map_err(|e| Error::io(from.display(), e))?;
        if n == 0 {
            break;
        }
        writer.wait_for_capacity(4).await.map_err(failed)?;
        writer.write(&buf[..n]);
    }
    writer.finish().await.map_err(failed)?;
    Ok(())
}

/// Removes a file, or a folder with everything in it.
pub(crate) fn remove_entry(path: &std::path::Path) -> std::io::Result<()> {
    if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// Flushes a written file, or a folder and everything in it, to disk.
pub(crate) fn sync_tree(path: &std::path::Path) -> std::io::Result<()> {
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            sync_tree(&entry?.path())?;
        }
        sync_dir(path)
    } else {
        std::fs::File::open(path)?.sync_all()
    }
}

/// Flushes a folder's entries (a rename or a new file in it) to disk.
pub(crate) fn sync_dir(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Opens (creating) the uploads lock file; locking it is the caller's.
fn open_lock(path: &std::path::Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path.display(), e))
}

/// Takes the uploads lock shared, waiting for a sweep that holds it.
pub(crate) async fn hold_uploads(dir: &std::path::Path) -> Result<std::fs::File> {
    let path = dir.join(UPLOADS_LOCK);
    tokio::task::spawn_blocking(move || {
        let file = open_lock(&path)?;
        file.lock_shared()
            .map_err(|e| Error::io(path.display(), e))?;
        Ok(file)
    })
    .await
    .map_err(|e| Error::internal_from("cannot lock the uploads", e))?
}

/// Removes what a crashed upload left in `dir`: partial `.upload-*` files, and complete files
/// that no record names (`used`, read once the uploads lock is held, so that no running upload is
/// between its rename and its commit). Skipped while another process is uploading. Blocks.
pub(crate) fn sweep(
    dir: &std::path::Path,
    used: impl FnOnce() -> Result<std::collections::HashSet<std::ffi::OsString>>,
) -> Result<usize> {
    let lock_path = dir.join(UPLOADS_LOCK);
    let lock = open_lock(&lock_path)?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            tracing::info!("another process is uploading: managed storage not swept");
            return Ok(0);
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(lock_path.display(), e)),
    }
    let used = used()?;
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir.display(), e))? {
        let entry = entry.map_err(|e| Error::io(dir.display(), e))?;
        let name = entry.file_name();
        let text = name.to_string_lossy();
        let orphan =
            text.starts_with(UPLOAD_PREFIX) || (!text.starts_with('.') && !used.contains(&name));
        if !orphan {
            continue;
        }
        let path = entry.path();
        match remove_entry(&path) {
            Ok(()) => {
                tracing::info!(file = %path.display(), "removed a crashed upload");
                removed += 1;
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove a crashed upload")
            }
        }
    }
    Ok(removed)
}
