//! Read leases: a plan holds one for every artifact it reads, and a permanent delete removes
//! managed files only once no plan of this process reads them.
//!
//! Without this, a delete under a running stream pulls files from under it: parquet fails
//! mid-stream, and zarr, which reads a missing chunk as its fill value, could answer zeros.
//! Removal waits for the last reader instead; a server stopped meanwhile removes the files at its
//! next start (they belong to no record, so the start-up sweep takes them).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

/// A deleted artifact's managed files: a local file or folder, or a remote object.
pub enum Doomed {
    File(PathBuf),
    Object(Arc<dyn ObjectStore>, ObjectPath),
}

impl std::fmt::Debug for Doomed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Doomed::File(path) => write!(f, "{}", path.display()),
            Doomed::Object(store, path) => write!(f, "{store}/{path}"),
        }
    }
}

/// The artifacts this process reads, by record path, and the files waiting for their readers.
#[derive(Debug, Default)]
pub struct Leases {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    readers: HashMap<String, usize>,
    doomed: HashMap<String, Vec<Doomed>>,
}

/// One reader's hold on an artifact; dropping it lets go.
#[derive(Debug)]
pub struct Lease {
    leases: Arc<Leases>,
    path: String,
}

impl Leases {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a map of counters: a panic while it was held cannot leave it torn.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds the artifact at record path `path` until the lease is dropped.
    pub fn take(self: &Arc<Self>, path: &str) -> Lease {
        *self.state().readers.entry(path.to_string()).or_default() += 1;
        Lease {
            leases: Arc::clone(self),
            path: path.to_string(),
        }
    }

    /// Removes `file` (the managed file, folder or object of record path `path`) now if nothing
    /// reads `path`, else once its last reader lets go. Returns whether it was removed now.
    /// Blocks: call it off the async threads.
    pub fn remove_when_unread(&self, path: &str, file: Doomed) -> bool {
        {
            let mut state = self.state();
            if state.readers.get(path).copied().unwrap_or(0) > 0 {
                tracing::info!(
                    path,
                    "a reader holds a deleted artifact: its files go when it ends"
                );
                state.doomed.entry(path.to_string()).or_default().push(file);
                return false;
            }
        }
        remove(vec![file]);
        true
    }

    /// How many leases are held on `path` (for tests and logs).
    pub fn readers(&self, path: &str) -> usize {
        self.state().readers.get(path).copied().unwrap_or(0)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let doomed = {
            let mut state = self.leases.state();
            let count = state.readers.entry(self.path.clone()).or_default();
            *count = count.saturating_sub(1);
            if *count > 0 {
                return;
            }
            state.readers.remove(&self.path);
            state.doomed.remove(&self.path)
        };
        if let Some(files) = doomed {
            // Off the async threads: a folder of many chunks takes a while to remove.
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    handle.spawn_blocking(move || remove(files));
                }
                Err(_) => remove(files),
            }
        }
    }
}

/// Removes what `files` name. Blocks (a remote delete waits on the runtime it is called from).
fn remove(files: Vec<Doomed>) {
    for file in files {
        let removed = match &file {
            Doomed::File(path) => match super::managed::remove_entry(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other.map_err(|e| e.to_string()),
            },
            Doomed::Object(store, path) => match tokio::runtime::Handle::try_current() {
                Ok(handle) => match handle.block_on(store.delete(path)) {
                    Err(object_store::Error::NotFound { .. }) => Ok(()),
                    other => other.map_err(|e| e.to_string()),
                },
                Err(_) => Err("no runtime to delete it on".to_string()),
            },
        };
        match removed {
            Ok(()) => tracing::info!(file = ?file, "removed a deleted artifact's files"),
            Err(e) => tracing::warn!(file = ?file, error = %e, "could not remove managed file"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_go_when_the_last_reader_does() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("a.parquet");
        std::fs::write(&file, b"x")?;
        let leases = Arc::new(Leases::default());
        let first = leases.take("file:///a");
        let second = leases.take("file:///a");
        assert!(!leases.remove_when_unread("file:///a", Doomed::File(file.clone())));
        drop(first);
        assert!(file.exists(), "removed under a reader");
        drop(second);
        assert!(!file.exists());
        assert_eq!(leases.readers("file:///a"), 0);
        std::fs::write(&file, b"x")?;
        assert!(leases.remove_when_unread("file:///a", Doomed::File(file.clone())));
        assert!(!file.exists());
        Ok(())
    }
}
