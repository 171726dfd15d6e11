//! Locating an artifact: the files a URL names (one file, or a folder's data files in path
//! order), checked to stay inside the folder, and the content hash that identifies them.

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use url::Url;

use super::Storage;
use crate::error::{Error, Result};

/// A located artifact: its canonical URL and the files it consists of.
#[derive(Debug, Clone)]
pub struct Located {
    pub url: Url,
    /// True for a folder (a prefix) of files.
    pub is_folder: bool,
    /// Files in path order, hidden and `_`-prefixed names skipped as pyarrow.dataset does.
    pub files: Vec<ObjectMeta>,
    pub store: Arc<dyn ObjectStore>,
    /// The object-store path of the artifact itself (file or folder prefix).
    pub prefix: ObjectPath,
}

impl Located {
    /// Sum of the files' sizes.
    pub fn size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// A file's path relative to the artifact (empty for a single file).
    pub fn relative<'a>(&self, file: &'a ObjectMeta) -> &'a str {
        file.location
            .as_ref()
            .strip_prefix(self.prefix.as_ref())
            .map(|s| s.trim_start_matches('/'))
            .unwrap_or(file.location.as_ref())
    }
}

impl Storage {
    /// Lists the artifact at `url`: one file, or every data file under a folder in path order.
    /// Like [`Storage::locate`], but a folder that a format reads as one store (zarr) is not
    /// listed: readers fetch only what they need, and a store of thousands of chunks would
    /// otherwise be listed on every request. Registration lists (and checks) it once.
    pub async fn locate_store(&self, url: &Url) -> Result<Located> {
        if !is_zarr(url) {
            return self.locate(url).await;
        }
        let (store, prefix) = self.object_store(url)?;
        if let Ok(path) = url.to_file_path()
            && !path.is_dir()
        {
            return Err(Error::not_found(format!("no zarr store at '{url}'")));
        }
        Ok(Located {
            url: url.clone(),
            is_folder: true,
            files: Vec::new(),
            store,
            prefix,
        })
    }

    pub async fn locate(&self, url: &Url) -> Result<Located> {
        let (store, prefix) = self.object_store(url)?;
        let mut url = url.clone();
        let mut is_folder = url.path().ends_with('/');
        let mut head = None;
        if !is_folder && url.scheme() != "file" {
            // Object stores have no folders: `s3://bucket/shards` names a folder when no object
            // has that name (or only an empty marker does, as some servers keep for prefixes)
            // and objects lie under it. pyarrow and lamindb accept such a name; so do we.
            match store.head(&prefix).await {
                Ok(meta) if meta.size > 0 => head = Some(meta),
                found => {
                    let mut under = store.list(Some(&prefix));
                    match under.try_next().await {
                        Ok(Some(_)) => {
                            url.set_path(&format!("{}/", url.path()));
                            is_folder = true;
                        }
                        _ => head = Some(found.map_err(|e| Error::storage(&url, e))?),
                    }
                }
            }
        }
        let url = &url;
        let files = if is_folder {
            let mut files: Vec<ObjectMeta> = store
                .list(Some(&prefix))
                .try_collect()
                .await
                .map_err(|e| Error::storage(url, e))?;
            // Hidden and `_` files are not shards of a dataset (pyarrow.dataset skips them), but in
            // a zarr store they are its metadata (`.zarray`, `.zattrs`, ...): part of its content.
            let zarr = is_zarr(url);
            let remote = url.scheme() != "file";
            files.retain(|f| {
                let rel = f
                    .location
                    .as_ref()
                    .strip_prefix(prefix.as_ref())
                    .unwrap_or("")
                    .trim_start_matches('/');
                // Empty objects named like folders (`shards/`) are markers some tools leave.
                let marker = remote && f.size == 0;
                !rel.is_empty()
                    && !marker
                    && (zarr
                        || !rel
                            .split('/')
                            .any(|s| s.starts_with('.') || s.starts_with('_')))
            });
            files.sort_by(|a, b| a.location.cmp(&b.location));
            if files.is_empty() {
                return Err(Error::not_found(format!("no files under '{url}'")));
            }
            files
        } else {
            match head {
                Some(meta) => vec![meta],
                None => vec![
                    store
                        .head(&prefix)
                        .await
                        .map_err(|e| Error::storage(url, e))?,
                ],
            }
        };
        if url.scheme() == "file" {
            // One `canonicalize` per file: off the async threads.
            let (checked, listed) = (url.clone(), files.clone());
            tokio::task::spawn_blocking(move || check_no_escape(&checked, &listed))
                .await
                .map_err(|e| Error::internal_from("escape check failed", e))??;
        }
        Ok(Located {
            url: url.clone(),
            is_folder,
            files,
            store,
            prefix,
        })
    }

    /// The artifact's identity and how it was taken. A remote artifact whose every file has an
    /// ETag is identified by them (with the sizes), as lamindb does for cloud files: no byte is
    /// downloaded, and an object that changes gets a new ETag. Otherwise every file is streamed
    /// once and hashed.
    pub async fn identify(&self, located: &Located) -> Result<(String, HashKind)> {
        let remote = located.url.scheme() != "file";
        if remote && located.files.iter().all(|f| f.e_tag.is_some()) {
            let file_hashes: Vec<(String, String)> = located
                .files
                .iter()
                .map(|f| {
                    let etag = f.e_tag.as_deref().unwrap_or_default();
                    let size = f.size.to_le_bytes();
                    let hash = hash_parts([&b"etag"[..], etag.as_bytes(), &size[..]]);
                    (located.relative(f).to_string(), hash)
                })
                .collect();
            return Ok((combine(located, file_hashes), HashKind::Etag));
        }
        Ok((self.hash(located).await?, HashKind::Content))
    }

    /// Streams every file once and returns the artifact's content hash.
    pub async fn hash(&self, located: &Located) -> Result<String> {
        let mut file_hashes = Vec::with_capacity(located.files.len());
        for file in &located.files {
            let mut hasher = blake3::Hasher::new();
            // Read whole once: past the range cache, which would only keep it from range reads.
            let mut extensions = object_store::Extensions::new();
            extensions.insert(super::cache::Uncached);
            let options = object_store::GetOptions {
                extensions,
                ..Default::default()
            };
            let mut stream = located
                .store
                .get_opts(&file.location, options)
                .await
                .map_err(|e| Error::storage(&file.location, e))?
                .into_stream();
            while let Some(chunk) = stream
                .try_next()
                .await
                .map_err(|e| Error::storage(&file.location, e))?
            {
                hasher.update(&chunk);
            }
            file_hashes.push((
                located.relative(file).to_string(),
                encode_hash(&hasher.finalize()),
            ));
        }
        Ok(combine(located, file_hashes))
    }
}

/// How a record's hash was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKind {
    /// BLAKE3 of every byte.
    Content,
    /// From the store's ETags and sizes, without reading the data.
    Etag,
}

impl HashKind {
    /// The name records carry in `hash_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            HashKind::Content => "blake3",
            HashKind::Etag => "etag",
        }
    }
}

/// A single file's hash, or a folder's from its files' relative paths and hashes.
fn combine(located: &Located, mut file_hashes: Vec<(String, String)>) -> String {
    if !located.is_folder {
        return file_hashes.pop().map(|(_, h)| h).unwrap_or_default();
    }
    hash_parts(
        file_hashes
            .iter()
            .flat_map(|(path, hash)| [path.as_bytes(), hash.as_bytes()]),
    )
}

/// A symlink inside a folder may point anywhere; refuse files whose real path leaves the folder.
fn check_no_escape(url: &Url, files: &[ObjectMeta]) -> Result<()> {
    let Ok(base) = url.to_file_path() else {
        return Ok(());
    };
    for file in files {
        let path = PathBuf::from("/").join(file.location.as_ref());
        let real = std::fs::canonicalize(&path).map_err(|e| Error::io(path.display(), e))?;
        let inside = if url.path().ends_with('/') {
            real.starts_with(&base)
        } else {
            real == base
        };
        if !inside {
            return Err(Error::PermissionDenied(format!(
                "'{}' links outside '{url}'",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Whether the URL names a zarr store (a folder whose name ends in `.zarr`).
fn is_zarr(url: &Url) -> bool {
    url.path()
        .trim_end_matches('/')
        .to_ascii_lowercase()
        .ends_with(".zarr")
}

/// Hashes a sequence of parts into the 22-character content hash used in records.
pub fn hash_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    encode_hash(&hasher.finalize())
}

fn encode_hash(hash: &blake3::Hash) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&hash.as_bytes()[..16])
}
