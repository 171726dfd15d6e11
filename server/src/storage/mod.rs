//! Where artifacts live: object stores per root (local, s3, gs, az, http), the allowed roots that
//! bound what a server may read, managed storage for uploads, listing and content hashing.

mod aws_profile;
mod cache;
mod lease;
pub(crate) mod managed;

pub use lease::{Lease, Leases};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use url::Url;

use crate::error::{Error, Result};

/// A root under which a server may read.
#[derive(Debug, Clone, PartialEq)]
pub enum Root {
    /// A canonical local directory.
    Local(PathBuf),
    /// A remote prefix such as `s3://bucket/prefix`; matched by whole path segments.
    Remote(Url),
}

impl Root {
    /// Parses an `--allow-root` value: a local directory or a URL.
    pub fn parse(value: &str) -> Result<Self> {
        match parse_remote(value)? {
            Some(url) => Ok(Root::Remote(url)),
            None => Ok(Root::Local(canonical_local(value)?)),
        }
    }

    fn contains(&self, url: &Url) -> bool {
        match (self, url.scheme()) {
            (Root::Local(dir), "file") => url.to_file_path().is_ok_and(|p| p.starts_with(dir)),
            (Root::Remote(root), _) => {
                root.scheme() == url.scheme()
                    // The userinfo names the container in `abfs[s]://container@account...`.
                    && root.username() == url.username()
                    && root.host_str() == url.host_str()
                    && root.port_or_known_default() == url.port_or_known_default()
                    && segments(url).starts_with(&segments(root))
            }
            _ => false,
        }
    }

    fn url(&self) -> String {
        match self {
            Root::Local(dir) => Url::from_directory_path(dir)
                .map(|u| u.to_string())
                .unwrap_or_else(|_| dir.display().to_string()),
            Root::Remote(url) => url.to_string(),
        }
    }
}

fn segments(url: &Url) -> Vec<String> {
    url.path_segments()
        .map(|s| s.filter(|s| !s.is_empty()).map(str::to_string).collect())
        .unwrap_or_default()
}

/// `Some(url)` for remote URLs, `None` for local paths and `file://` URLs resolved by the caller.
fn parse_remote(value: &str) -> Result<Option<Url>> {
    if !value.contains("://") {
        return Ok(None);
    }
    let url =
        Url::parse(value).map_err(|e| Error::invalid(format!("invalid URL '{value}': {e}")))?;
    match url.scheme() {
        "file" => Ok(None),
        // The URL parser resolves `..` segments, so roots are checked against where a URL
        // really points.
        "s3" | "s3a" | "gs" | "az" | "abfs" | "abfss" | "http" | "https" => Ok(Some(url)),
        other => Err(Error::invalid(format!(
            "unsupported storage scheme '{other}' in '{value}'"
        ))),
    }
}

/// Resolves a local path or `file://` URL to its canonical form: `..` and symlinks resolved, so
/// that the allowed-root check sees where the bytes really are.
fn canonical_local(value: &str) -> Result<PathBuf> {
    let path = if value.starts_with("file://") {
        Url::parse(value)
            .ok()
            .and_then(|u| u.to_file_path().ok())
            .ok_or_else(|| Error::invalid(format!("invalid file URL '{value}'")))?
    } else {
        PathBuf::from(value)
    };
    std::fs::canonicalize(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::not_found(format!("no file or folder at '{value}'")),
        _ => Error::io(value, e),
    })
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

/// Storage access for one server or one command-line invocation.
pub struct Storage {
    data_dir: PathBuf,
    roots: Vec<Root>,
    stores: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
    /// Remote reads go through this when set.
    cache: Option<Arc<cache::RangeCache>>,
    /// What the plans of this process read, so that deletes wait for them.
    leases: Arc<Leases>,
}

impl Storage {
    /// Sets up storage under `data_dir` (created if needed). The data dir and the working
    /// directory are always allowed; `allow_roots` adds more.
    pub fn new(data_dir: &Path, allow_roots: &[String]) -> Result<Self> {
        std::fs::create_dir_all(data_dir.join("objects"))
            .map_err(|e| Error::io(data_dir.display(), e))?;
        let data_dir =
            std::fs::canonicalize(data_dir).map_err(|e| Error::io(data_dir.display(), e))?;
        let mut roots = vec![Root::Local(data_dir.clone())];
        if let Ok(cwd) = std::env::current_dir().and_then(std::fs::canonicalize) {
            roots.push(Root::Local(cwd));
        }
        for root in allow_roots {
            roots.push(Root::parse(root)?);
        }
        Ok(Self {
            data_dir,
            roots,
            stores: Mutex::new(HashMap::new()),
            cache: None,
            leases: Arc::default(),
        })
    }

    /// Keeps up to `bytes` of remote ranges read in `cache/` under the data dir (0: none).
    pub fn with_range_cache(mut self, bytes: u64) -> Result<Self> {
        self.cache = match bytes {
            0 => None,
            limit => Some(Arc::new(cache::RangeCache::open(
                self.data_dir.join("cache"),
                limit,
            )?)),
        };
        Ok(self)
    }

    /// The read leases of this process.
    pub fn leases(&self) -> &Arc<Leases> {
        &self.leases
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Managed storage: where uploads are written, content-addressed.
    pub fn managed_dir(&self) -> PathBuf {
        self.data_dir.join("objects")
    }

    pub fn roots(&self) -> &[Root] {
        &self.roots
    }

    /// Resolves a path or URL that a user gave to a canonical URL. With `enforce_roots` (anything
    /// that arrives through a server), a location outside the allowed roots is refused.
    pub fn resolve(&self, input: &str, enforce_roots: bool) -> Result<Url> {
        let url = match parse_remote(input)? {
            Some(url) => url,
            None => {
                let path = canonical_local(input)?;
                if path.is_dir() {
                    Url::from_directory_path(&path)
                } else {
                    Url::from_file_path(&path)
                }
                .map_err(|_| Error::invalid(format!("not an absolute path: {}", path.display())))?
            }
        };
        if enforce_roots {
            self.check_allowed(&url)?;
        }
        Ok(url)
    }

    /// Refuses a URL outside every allowed root.
    pub fn check_allowed(&self, url: &Url) -> Result<()> {
        if self.roots.iter().any(|r| r.contains(url)) {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!(
                "'{url}' is outside the server's allowed storage roots (see --allow-root)"
            )))
        }
    }

    /// The root URL that holds `url`: the allowed root it falls under, else its parent.
    pub fn storage_root(&self, url: &Url) -> String {
        match self.roots.iter().find(|r| r.contains(url)) {
            Some(root) => root.url(),
            None => url
                .join(if url.path().ends_with('/') { ".." } else { "." })
                .map(|u| u.to_string())
                .unwrap_or_else(|_| url.to_string()),
        }
    }

    /// The object store that serves `url`, built once per scheme and authority.
    pub fn object_store(&self, url: &Url) -> Result<(Arc<dyn ObjectStore>, ObjectPath)> {
        let base = format!("{}://{}", url.scheme(), url.authority());
        let path = if url.scheme() == "file" {
            let local = url
                .to_file_path()
                .map_err(|_| Error::invalid(format!("invalid file URL '{url}'")))?;
            ObjectPath::from_absolute_path(local)
                .map_err(|e| Error::invalid(format!("invalid path '{url}': {e}")))?
        } else {
            ObjectPath::from_url_path(url.path())
                .map_err(|e| Error::invalid(format!("invalid path in '{url}': {e}")))?
        };
        let mut stores = self
            .stores
            .lock()
            .map_err(|_| Error::internal("object store cache poisoned"))?;
        if let Some(store) = stores.get(&base) {
            return Ok((Arc::clone(store), path));
        }
        let mut store = build_store(url)?;
        if let Some(cache) = &self.cache
            && url.scheme() != "file"
        {
            store = Arc::new(cache::CachedStore::new(
                store,
                Arc::clone(cache),
                base.clone(),
            ));
        }
        stores.insert(base, Arc::clone(&store));
        Ok((store, path))
    }

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

    /// Streams every file once and returns the artifact's content hash.
    pub async fn hash(&self, located: &Located) -> Result<String> {
        let mut file_hashes = Vec::with_capacity(located.files.len());
        for file in &located.files {
            let mut hasher = blake3::Hasher::new();
            // Read whole once: past the range cache, which would only keep it from range reads.
            let mut extensions = object_store::Extensions::new();
            extensions.insert(cache::Uncached);
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
        if !located.is_folder {
            return Ok(file_hashes.pop().map(|(_, h)| h).unwrap_or_default());
        }
        Ok(hash_parts(file_hashes.iter().flat_map(|(path, hash)| {
            [path.as_bytes(), hash.as_bytes()]
        })))
    }
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

fn build_store(url: &Url) -> Result<Arc<dyn ObjectStore>> {
    let config_error = |e: object_store::Error| {
        Error::invalid(format!("cannot configure storage for '{url}': {e}"))
    };
    let store: Arc<dyn ObjectStore> = match url.scheme() {
        "file" => Arc::new(LocalFileSystem::new()),
        "s3" | "s3a" => Arc::new(
            with_profile(object_store::aws::AmazonS3Builder::from_env().with_url(url.as_str()))
                .build()
                .map_err(config_error)?,
        ),
        "gs" => Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .build()
                .map_err(config_error)?,
        ),
        "az" | "abfs" | "abfss" => Arc::new(
            object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .build()
                .map_err(config_error)?,
        ),
        "http" | "https" => Arc::new(
            object_store::http::HttpBuilder::new()
                .with_url(format!("{}://{}", url.scheme(), url.authority()))
                .build()
                .map_err(config_error)?,
        ),
        other => {
            return Err(Error::invalid(format!(
                "unsupported storage scheme '{other}'"
            )));
        }
    };
    Ok(store)
}

/// Fills from the AWS shared profile what the `AWS_*` environment leaves unset.
fn with_profile(
    mut builder: object_store::aws::AmazonS3Builder,
) -> object_store::aws::AmazonS3Builder {
    let Some(profile) = aws_profile::from_env() else {
        return builder;
    };
    let unset = |keys: &[&str]| keys.iter().all(|k| std::env::var_os(k).is_none());
    if unset(&["AWS_ACCESS_KEY_ID"])
        && let (Some(id), Some(secret)) = (profile.access_key_id, profile.secret_access_key)
    {
        builder = builder
            .with_access_key_id(id)
            .with_secret_access_key(secret);
        if let Some(token) = profile.session_token {
            builder = builder.with_token(token);
        }
    }
    if unset(&["AWS_REGION", "AWS_DEFAULT_REGION"])
        && let Some(region) = profile.region
    {
        builder = builder.with_region(region);
    }
    if unset(&["AWS_ENDPOINT_URL", "AWS_ENDPOINT"])
        && let Some(endpoint) = profile.endpoint_url
    {
        builder = builder.with_endpoint(endpoint);
    }
    builder
}

/// Whether the URL names a zarr store (a folder whose name ends in `.zarr`).
fn is_zarr(url: &Url) -> bool {
    url.path()
        .trim_end_matches('/')
        .to_ascii_lowercase()
        .ends_with(".zarr")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_roots_match_whole_segments() -> Result<()> {
        let root = Root::parse("s3://bucket/prefix")?;
        let ok = |s: &str| Url::parse(s).map(|u| root.contains(&u)).unwrap_or(false);
        assert!(ok("s3://bucket/prefix/a.parquet"));
        assert!(ok("s3://bucket/prefix/"));
        assert!(!ok("s3://bucket/prefix-other/a.parquet"));
        assert!(!ok("s3://bucket-other/prefix/a.parquet"));
        assert!(!ok("gs://bucket/prefix/a.parquet"));
        assert!(!ok("s3://bucket/prefix/../other/a.parquet"));
        assert!(!ok("s3://bucket/prefix/%2e%2e/other/a.parquet"));
        // An Azure root names its container in the userinfo: another container is another root.
        let azure = Root::parse("abfss://c1@account.dfs.core.windows.net/data")?;
        let ok = |s: &str| Url::parse(s).map(|u| azure.contains(&u)).unwrap_or(false);
        assert!(ok("abfss://c1@account.dfs.core.windows.net/data/x.parquet"));
        assert!(!ok(
            "abfss://c2@account.dfs.core.windows.net/data/x.parquet"
        ));
        assert!(!ok("abfss://account.dfs.core.windows.net/data/x.parquet"));
        Ok(())
    }

    #[test]
    fn local_escapes_are_refused() -> Result<()> {
        let io = |e| Error::io("test", e);
        let allowed = tempfile::tempdir().map_err(io)?;
        let outside = tempfile::tempdir().map_err(io)?;
        std::fs::write(outside.path().join("secret.csv"), "a\n1\n").map_err(io)?;
        let storage = Storage::new(&allowed.path().join("data"), &[])?;
        let sneaky = allowed
            .path()
            .join("data/../..")
            .join(outside.path().file_name().unwrap_or_default())
            .join("secret.csv");
        let err = storage.resolve(sneaky.to_str().unwrap_or_default(), true);
        assert!(matches!(err, Err(Error::PermissionDenied(_))), "{err:?}");
        #[cfg(unix)]
        {
            let link = allowed.path().join("data/link.csv");
            std::os::unix::fs::symlink(outside.path().join("secret.csv"), &link).map_err(io)?;
            let err = storage.resolve(link.to_str().unwrap_or_default(), true);
            assert!(matches!(err, Err(Error::PermissionDenied(_))), "{err:?}");
        }
        Ok(())
    }
}
