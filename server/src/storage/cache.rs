//! A read-through cache of remote byte ranges, on local disk under the data dir and bounded in
//! size (`serve --cache-size`): a range read once from object storage is read from disk the next
//! time, so repeated queries over the same row groups or zarr chunks cost no transfer.
//!
//! Entries are keyed by the object's store, path and version (its ETag, else its size and
//! modification time) and by the range, so a changed object never serves old bytes. Versions are
//! learnt from the listings, HEADs and GETs that reads make anyway, and asked again (one HEAD)
//! when older than [`FRESH`]. Files are immutable once written, named by their key, and the least
//! recently used go first when the cache is full.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use crate::error::{Error, Result};

/// How long an object's known version is trusted before it is asked again.
const FRESH: Duration = Duration::from_secs(10);

/// Reads larger than this pass through uncached: one would evict much for little.
const LARGEST_ENTRY: u64 = 64 * 1024 * 1024;

/// The cache's files and their index.
pub(crate) struct RangeCache {
    dir: PathBuf,
    limit: u64,
    index: Mutex<Index>,
}

#[derive(Default)]
struct Index {
    /// Key -> (bytes, last use).
    entries: HashMap<String, (u64, u64)>,
    total: u64,
    clock: u64,
}

impl RangeCache {
    /// Opens the cache in `dir`, keeping at most `limit` bytes; entries left by an earlier run
    /// are kept, oldest first in line for eviction.
    pub(crate) fn open(dir: PathBuf, limit: u64) -> Result<Self> {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(dir.display(), e))?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(dir.display(), e))? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else { continue };
            if name.starts_with('.') {
                // A write that a crash interrupted.
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            found.push((meta.modified().ok(), name, meta.len()));
        }
        found.sort();
        let mut index = Index::default();
        for (_, name, size) in found {
            index.clock += 1;
            index.total += size;
            index.entries.insert(name, (size, index.clock));
        }
        let cache = Self {
            dir,
            limit,
            index: Mutex::new(index),
        };
        cache.evict();
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn get(&self, key: &str) -> Option<Bytes> {
        {
            let mut index = self.lock();
            index.clock += 1;
            let clock = index.clock;
            index.entries.get_mut(key)?.1 = clock;
        }
        match tokio::fs::read(self.dir.join(key)).await {
            Ok(bytes) => Some(bytes.into()),
            Err(_) => {
                // Evicted by another process sharing the data dir: a miss.
                let mut index = self.lock();
                if let Some((size, _)) = index.entries.remove(key) {
                    index.total -= size;
                }
                None
            }
        }
    }

    async fn put(&self, key: String, bytes: &Bytes) {
        let size = bytes.len() as u64;
        if size > LARGEST_ENTRY.min(self.limit) || self.lock().entries.contains_key(&key) {
            return;
        }
        // Written aside, then renamed: a reader never sees half an entry.
        let temp = self
            .dir
            .join(format!(".{key}.{:08x}", rand::random::<u32>()));
        let written = async {
            tokio::fs::write(&temp, bytes).await?;
            tokio::fs::rename(&temp, self.dir.join(&key)).await
        }
        .await;
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&temp).await;
            tracing::debug!(error = %e, "range cache: cannot write an entry");
            return;
        }
        {
            let mut index = self.lock();
            index.clock += 1;
            let clock = index.clock;
            if index.entries.insert(key, (size, clock)).is_none() {
                index.total += size;
            }
        }
        self.evict();
    }

    /// Removes the least recently used entries until the cache fits its limit.
    fn evict(&self) {
        let doomed: Vec<String> = {
            let mut index = self.lock();
            if index.total <= self.limit {
                return;
            }
            let mut by_age: Vec<(u64, String, u64)> = index
                .entries
                .iter()
                .map(|(k, (size, used))| (*used, k.clone(), *size))
                .collect();
            by_age.sort();
            let mut doomed = Vec::new();
            for (_, key, size) in by_age {
                if index.total <= self.limit {
                    break;
                }
                index.entries.remove(&key);
                index.total -= size;
                doomed.push(key);
            }
            doomed
        };
        for key in doomed {
            let _ = std::fs::remove_file(self.dir.join(key));
        }
    }

    /// Bytes held.
    #[cfg(test)]
    fn size(&self) -> u64 {
        self.lock().total
    }
}

/// An object store whose reads go through a [`RangeCache`].
#[derive(Debug)]
pub(crate) struct CachedStore {
    inner: Arc<dyn ObjectStore>,
    cache: Arc<RangeCache>,
    /// The store's URL (`s3://bucket`), part of every key.
    base: String,
    versions: Arc<Mutex<HashMap<Path, (Instant, ObjectMeta)>>>,
}

impl std::fmt::Debug for RangeCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeCache")
            .field("dir", &self.dir)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for CachedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cached({})", self.inner)
    }
}

impl CachedStore {
    pub(crate) fn new(inner: Arc<dyn ObjectStore>, cache: Arc<RangeCache>, base: String) -> Self {
        Self {
            inner,
            cache,
            base,
            versions: Arc::default(),
        }
    }

    fn remember(versions: &Mutex<HashMap<Path, (Instant, ObjectMeta)>>, meta: &ObjectMeta) {
        let mut versions = versions.lock().unwrap_or_else(|e| e.into_inner());
        versions.insert(meta.location.clone(), (Instant::now(), meta.clone()));
    }

    /// The object's current metadata: remembered if fresh, else asked for.
    async fn version(&self, location: &Path) -> object_store::Result<ObjectMeta> {
        let known = {
            let versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
            versions
                .get(location)
                .filter(|(at, _)| at.elapsed() < FRESH)
                .map(|(_, meta)| meta.clone())
        };
        if let Some(meta) = known {
            return Ok(meta);
        }
        let meta = self.inner.head(location).await?;
        Self::remember(&self.versions, &meta);
        Ok(meta)
    }

    fn key(&self, meta: &ObjectMeta, range: &Range<u64>) -> String {
        let version = match &meta.e_tag {
            Some(tag) => tag.clone(),
            None => format!("{}@{}", meta.size, meta.last_modified.timestamp_micros()),
        };
        let id = format!(
            "{}\0{}\0{version}\0{}-{}",
            self.base, meta.location, range.start, range.end
        );
        blake3::hash(id.as_bytes()).to_hex().to_string()
    }
}

/// Whether a GET only reads bytes, so that cached bytes answer it.
fn plain_read(options: &GetOptions) -> bool {
    !options.head
        && options.if_match.is_none()
        && options.if_none_match.is_none()
        && options.if_modified_since.is_none()
        && options.if_unmodified_since.is_none()
        && options.version.is_none()
}

fn answer(meta: ObjectMeta, range: Range<u64>, bytes: Bytes) -> GetResult {
    GetResult {
        payload: GetResultPayload::Stream(stream::once(async { Ok(bytes) }).boxed()),
        meta,
        range,
        attributes: Default::default(),
    }
}

#[async_trait]
impl ObjectStore for CachedStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if !plain_read(&options) {
            let result = self.inner.get_opts(location, options).await?;
            Self::remember(&self.versions, &result.meta);
            return Ok(result);
        }
        let meta = self.version(location).await?;
        let range = match &options.range {
            Some(r) => r
                .as_range(meta.size)
                .map_err(|e| object_store::Error::Generic {
                    store: "range cache",
                    source: Box::new(e),
                })?,
            None => 0..meta.size,
        };
        if range.end - range.start <= LARGEST_ENTRY
            && let Some(bytes) = self.cache.get(&self.key(&meta, &range)).await
        {
            return Ok(answer(meta, range, bytes));
        }
        let result = self.inner.get_opts(location, options).await?;
        Self::remember(&self.versions, &result.meta);
        if result.range.end - result.range.start > LARGEST_ENTRY {
            return Ok(result);
        }
        // Keyed by what came back: if the object changed meanwhile, these are the new bytes.
        let (meta, range) = (result.meta.clone(), result.range.clone());
        let bytes = result.bytes().await?;
        self.cache.put(self.key(&meta, &range), &bytes).await;
        Ok(answer(meta, range, bytes))
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        let meta = self.version(location).await?;
        let mut found: Vec<Option<Bytes>> = Vec::with_capacity(ranges.len());
        for range in ranges {
            found.push(match range.end - range.start <= LARGEST_ENTRY {
                true => self.cache.get(&self.key(&meta, range)).await,
                false => None,
            });
        }
        let missing: Vec<Range<u64>> = ranges
            .iter()
            .zip(&found)
            .filter(|(_, f)| f.is_none())
            .map(|(r, _)| r.clone())
            .collect();
        if !missing.is_empty() {
            let mut fetched = self.inner.get_ranges(location, &missing).await?.into_iter();
            for (range, slot) in ranges.iter().zip(found.iter_mut()) {
                if slot.is_none() {
                    let bytes = fetched.next().ok_or_else(|| object_store::Error::Generic {
                        store: "range cache",
                        source: "the store returned fewer ranges than asked".into(),
                    })?;
                    self.cache.put(self.key(&meta, range), &bytes).await;
                    *slot = Some(bytes);
                }
            }
        }
        Ok(found.into_iter().flatten().collect())
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let versions = Arc::clone(&self.versions);
        self.inner
            .list(prefix)
            .inspect_ok(move |meta| Self::remember(&versions, meta))
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let listed = self.inner.list_with_delimiter(prefix).await?;
        for meta in &listed.objects {
            Self::remember(&self.versions, meta);
        }
        Ok(listed)
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn reads_are_served_from_disk_and_changes_are_seen() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let cache = Arc::new(RangeCache::open(dir.path().join("cache"), 1 << 20)?);
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let store = CachedStore::new(Arc::clone(&inner), Arc::clone(&cache), "mem://".into());
        let path = Path::from("a/b.bin");
        let storage = |e: object_store::Error| Error::storage("test", e);
        inner
            .put(&path, Bytes::from_static(b"0123456789").into())
            .await
            .map_err(storage)?;
        assert_eq!(store.get_range(&path, 2..5).await.map_err(storage)?, "234");
        assert_eq!(cache.size(), 3);
        let again = store
            .get_ranges(&path, &[2..5, 0..1])
            .await
            .map_err(storage)?;
        assert_eq!(again, ["234", "0"]);
        assert_eq!(cache.size(), 4);
        // A new version of the object is a new key, even while the old version is remembered.
        inner
            .put(&path, Bytes::from_static(b"abcdefghij").into())
            .await
            .map_err(storage)?;
        store.head(&path).await.map_err(storage)?;
        assert_eq!(store.get_range(&path, 2..5).await.map_err(storage)?, "cde");
        // Reopened, the cache keeps its entries and its bound.
        drop(store);
        let reopened = RangeCache::open(dir.path().join("cache"), 5)?;
        assert!(reopened.size() <= 5);
        Ok(())
    }
}
