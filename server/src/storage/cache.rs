//! A read-through cache of remote byte ranges, on local disk under the data dir and bounded in
//! size (`serve --cache-size`): a range read once from object storage is read from disk the next
//! time, so repeated queries over the same row groups or zarr chunks cost no transfer.
//!
//! Entries are keyed by the object's store, path and version (its ETag, else its size and
//! modification time) and by the range, so a changed object never serves old bytes. Versions are
//! learnt from the listings, HEADs and GETs that reads make anyway, and asked again (one HEAD)
//! when older than [`FRESH`]. Files are immutable once written, named by their key, and the least
//! recently used go first when the cache is full.
//!
//! The file is long because it is one `ObjectStore` wrapper, whose every method must answer,
//! beside the index it keeps; splitting them would put the versioning rules in two places.

use std::collections::{BTreeMap, HashMap};
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

/// Reads with this in their [`GetOptions::extensions`] pass by the cache: hashing a file at
/// registration reads it whole once, which would only evict what range reads use.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Uncached;

/// At most this many object versions are remembered; beyond it, only fresh ones are kept.
const VERSIONS: usize = 100_000;

/// The cache's files and their index.
pub(crate) struct RangeCache {
    dir: PathBuf,
    limit: u64,
    index: Mutex<Index>,
    /// Reads served from disk, and reads that went to the store, for the metrics.
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Index {
    /// Key -> (bytes, last use).
    entries: HashMap<String, (u64, u64)>,
    /// Last use -> key: the least recently used first.
    order: BTreeMap<u64, String>,
    total: u64,
    clock: u64,
}

impl Index {
    fn touch(&mut self, key: &str) -> Option<u64> {
        self.clock += 1;
        let clock = self.clock;
        let (size, used) = self.entries.get_mut(key)?;
        self.order.remove(used);
        *used = clock;
        let size = *size;
        self.order.insert(clock, key.to_string());
        Some(size)
    }

    fn insert(&mut self, key: String, size: u64) {
        if self.entries.contains_key(&key) {
            return;
        }
        self.clock += 1;
        self.order.insert(self.clock, key.clone());
        self.entries.insert(key, (size, self.clock));
        self.total += size;
    }

    fn remove(&mut self, key: &str) {
        if let Some((size, used)) = self.entries.remove(key) {
            self.order.remove(&used);
            self.total = self.total.saturating_sub(size);
        }
    }

    /// Takes the least recently used keys out until `target` bytes remain.
    fn shrink_to(&mut self, target: u64) -> Vec<String> {
        let mut doomed = Vec::new();
        while self.total > target {
            let Some((_, key)) = self.order.pop_first() else {
                break;
            };
            if let Some((size, _)) = self.entries.remove(&key) {
                self.total = self.total.saturating_sub(size);
            }
            doomed.push(key);
        }
        doomed
    }
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
            index.insert(name, size);
        }
        let doomed = index.shrink_to(limit);
        for key in doomed {
            let _ = std::fs::remove_file(dir.join(key));
        }
        Ok(Self {
            dir,
            limit,
            index: Mutex::new(index),
            hits: Default::default(),
            misses: Default::default(),
        })
    }

    /// Hits, misses and the bytes held.
    pub(crate) fn counts(&self) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let held = self.lock().total;
        (self.hits.load(Relaxed), self.misses.load(Relaxed), held)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes held.
    #[cfg(test)]
    fn size(&self) -> u64 {
        self.lock().total
    }

    /// The entry's bytes, if it is held whole.
    async fn get(&self, key: &str) -> Option<Bytes> {
        let found = self.lookup(key).await;
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        found
    }

    async fn lookup(&self, key: &str) -> Option<Bytes> {
        let size = self.lock().touch(key)?;
        match tokio::fs::read(self.dir.join(key)).await {
            Ok(bytes) if bytes.len() as u64 == size => Some(bytes.into()),
            Ok(_) => {
                // Cut short (a crash while the disk was writing it): never served.
                self.forget(key).await;
                None
            }
            Err(e) => {
                // NotFound: another process sharing the data dir evicted it. Anything else: the
                // file cannot be trusted either.
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::debug!(error = %e, "range cache: unreadable entry");
                }
                self.forget(key).await;
                None
            }
        }
    }

    async fn forget(&self, key: &str) {
        self.lock().remove(key);
        let _ = tokio::fs::remove_file(self.dir.join(key)).await;
    }

    async fn put(&self, key: String, bytes: &Bytes) {
        let size = bytes.len() as u64;
        if size > LARGEST_ENTRY.min(self.limit) || self.lock().entries.contains_key(&key) {
            return;
        }
        // Written aside, synced, then renamed: a reader never sees part of an entry, not even
        // after a power loss.
        let temp = self
            .dir
            .join(format!(".{key}.{:08x}", rand::random::<u32>()));
        let written = async {
            let mut file = tokio::fs::File::create(&temp).await?;
            tokio::io::AsyncWriteExt::write_all(&mut file, bytes).await?;
            file.sync_data().await?;
            tokio::fs::rename(&temp, self.dir.join(&key)).await
        }
        .await;
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&temp).await;
            tracing::debug!(error = %e, "range cache: cannot write an entry");
            return;
        }
        // Full: down to 90 %, so that eviction runs once per many writes, not per write.
        let doomed = {
            let mut index = self.lock();
            index.insert(key, size);
            if index.total > self.limit {
                index.shrink_to(self.limit / 10 * 9)
            } else {
                Vec::new()
            }
        };
        if !doomed.is_empty() {
            let dir = self.dir.clone();
            tokio::task::spawn_blocking(move || {
                for key in doomed {
                    let _ = std::fs::remove_file(dir.join(key));
                }
            });
        }
    }
}

type Versions = Mutex<HashMap<Path, (Instant, ObjectMeta)>>;

/// An object store whose reads go through a [`RangeCache`].
#[derive(Debug)]
pub(crate) struct CachedStore {
    inner: Arc<dyn ObjectStore>,
    cache: Arc<RangeCache>,
    /// The store's URL (`s3://bucket`), part of every key.
    base: String,
    versions: Arc<Versions>,
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

/// An object's version as a key part: its ETag without weak marks and quotes (stores differ in
/// how they quote it between listings and reads). `None` when it has none: such objects are not
/// cached, since a same-size rewrite within a second would look unchanged.
fn version_of(meta: &ObjectMeta) -> Option<String> {
    let tag = meta.e_tag.as_deref()?;
    let tag = tag.trim().trim_start_matches("W/").trim_matches('"');
    (!tag.is_empty()).then(|| tag.to_string())
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

    fn remember(versions: &Versions, meta: &ObjectMeta) {
        let mut versions = versions.lock().unwrap_or_else(|e| e.into_inner());
        if versions.len() >= VERSIONS {
            versions.retain(|_, (at, _)| at.elapsed() < FRESH);
        }
        versions.insert(meta.location.clone(), (Instant::now(), meta.clone()));
    }

    fn forget(&self, location: &Path) {
        let mut versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        versions.remove(location);
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

    fn key(&self, meta: &ObjectMeta, range: &Range<u64>) -> Option<String> {
        let version = version_of(meta)?;
        let id = format!(
            "{}\0{}\0{version}\0{}-{}",
            self.base, meta.location, range.start, range.end
        );
        Some(blake3::hash(id.as_bytes()).to_hex().to_string())
    }

    /// Fetches `ranges`, checking that every answer comes from the object's version `meta`:
    /// `None` if the object changed meanwhile, so that nothing is cached under the old version.
    async fn fetch_version(
        &self,
        location: &Path,
        meta: &ObjectMeta,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Option<Vec<Bytes>>> {
        let expected = version_of(meta);
        let changed = std::sync::atomic::AtomicBool::new(false);
        let fetched = object_store::coalesce_ranges(
            ranges,
            |range| {
                let (expected, changed) = (&expected, &changed);
                async move {
                    let options = GetOptions {
                        range: Some(range.into()),
                        ..Default::default()
                    };
                    let result = self.inner.get_opts(location, options).await?;
                    if version_of(&result.meta) != *expected {
                        changed.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    result.bytes().await
                }
            },
            object_store::OBJECT_STORE_COALESCE_DEFAULT,
        )
        .await?;
        Ok((!changed.load(std::sync::atomic::Ordering::Relaxed)).then_some(fetched))
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
        && options.extensions.get::<Uncached>().is_none()
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
            let latest = options.version.is_none();
            let result = self.inner.get_opts(location, options).await?;
            if latest {
                Self::remember(&self.versions, &result.meta);
            }
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
        let key = (range.end - range.start <= LARGEST_ENTRY)
            .then(|| self.key(&meta, &range))
            .flatten();
        if let Some(key) = &key
            && let Some(bytes) = self.cache.get(key).await
        {
            return Ok(answer(meta, range, bytes));
        }
        let result = self.inner.get_opts(location, options).await?;
        Self::remember(&self.versions, &result.meta);
        if key.is_none() || result.range.end - result.range.start > LARGEST_ENTRY {
            return Ok(result);
        }
        // Keyed by what came back: if the object changed meanwhile, these are the new bytes.
        let (meta, range) = (result.meta.clone(), result.range.clone());
        let bytes = result.bytes().await?;
        if let Some(key) = self.key(&meta, &range) {
            self.cache.put(key, &bytes).await;
        }
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
            let key = (range.end - range.start <= LARGEST_ENTRY)
                .then(|| self.key(&meta, range))
                .flatten();
            found.push(match key {
                Some(key) => self.cache.get(&key).await,
                None => None,
            });
        }
        let missing: Vec<Range<u64>> = ranges
            .iter()
            .zip(&found)
            .filter(|(_, f)| f.is_none())
            .map(|(r, _)| r.clone())
            .collect();
        if missing.is_empty() {
            return Ok(found.into_iter().flatten().collect());
        }
        let Some(fetched) = self.fetch_version(location, &meta, &missing).await? else {
            // The object changed since its version was learnt: the cached ranges are of the old
            // one. Everything is read anew, and nothing is kept until the version is known.
            self.forget(location);
            return self.inner.get_ranges(location, ranges).await;
        };
        let mut fetched = fetched.into_iter();
        for (range, slot) in ranges.iter().zip(found.iter_mut()) {
            if slot.is_none() {
                let bytes = fetched.next().ok_or_else(|| object_store::Error::Generic {
                    store: "range cache",
                    source: "the store returned fewer ranges than asked".into(),
                })?;
                if let Some(key) = self.key(&meta, range) {
                    self.cache.put(key, &bytes).await;
                }
                *slot = Some(bytes);
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
        // Changed behind the remembered version: the answer is the new bytes, and nothing is
        // kept under the old version's key.
        inner
            .put(&path, Bytes::from_static(b"ABCDEFGHIJ").into())
            .await
            .map_err(storage)?;
        let held = cache.size();
        let middle = [Range { start: 5, end: 8 }];
        assert_eq!(
            store.get_ranges(&path, &middle).await.map_err(storage)?,
            ["FGH"]
        );
        assert_eq!(cache.size(), held, "cached under the old version");
        // The version is asked again, and then the new bytes are kept.
        assert_eq!(
            store.get_ranges(&path, &middle).await.map_err(storage)?,
            ["FGH"]
        );
        assert_eq!(cache.size(), held + 3);
        // Whole reads marked uncached pass by.
        let mut extensions = object_store::Extensions::new();
        extensions.insert(Uncached);
        let options = GetOptions {
            extensions,
            ..Default::default()
        };
        let whole = store.get_opts(&path, options).await.map_err(storage)?;
        assert_eq!(whole.bytes().await.map_err(storage)?, "ABCDEFGHIJ");
        assert_eq!(cache.size(), held + 3);
        // Reopened, the cache keeps its entries and its bound.
        drop(store);
        let reopened = RangeCache::open(dir.path().join("cache"), 5)?;
        assert!(reopened.size() <= 5);
        Ok(())
    }
}
