//! Where artifacts live: object stores per root (local, s3, gs, az, http), the allowed roots that
//! bound what a server may read, managed storage for uploads, listing and content hashing.

mod aws_profile;
mod cache;
mod lease;
mod locate;
pub(crate) mod managed;

pub use lease::{Doomed, Lease, Leases};
pub use locate::{HashKind, Located, hash_parts};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
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

/// Where uploads and new versions are kept, content-addressed.
#[derive(Debug, Clone, PartialEq)]
pub enum ManagedStorage {
    /// `objects/` in the data dir (the default).
    Local,
    /// A remote prefix (`s3://bucket/prefix/`) that every server of a fleet reads.
    Remote(Url),
}

/// Storage access for one server or one command-line invocation.
pub struct Storage {
    data_dir: PathBuf,
    managed: ManagedStorage,
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
            managed: ManagedStorage::Local,
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

    /// Keeps uploads under the remote prefix `url` (`s3://bucket/prefix`) instead of the data dir,
    /// so that every server of a fleet reads them. The prefix becomes an allowed root.
    pub fn with_managed_storage(mut self, url: &str) -> Result<Self> {
        let Some(mut url) = parse_remote(url)? else {
            return Err(Error::invalid(format!(
                "--managed-storage '{url}' is not a remote URL: expected s3://bucket/prefix (or \
                 gs://, az://); without it uploads stay in the data dir"
            )));
        };
        if matches!(url.scheme(), "http" | "https") {
            return Err(Error::invalid(format!(
                "--managed-storage '{url}': HTTP stores are read-only"
            )));
        }
        if !url.path().ends_with('/') {
            url.set_path(&format!("{}/", url.path()));
        }
        self.roots.push(Root::Remote(url.clone()));
        self.managed = ManagedStorage::Remote(url);
        Ok(self)
    }

    /// Where uploads are kept.
    pub fn managed(&self) -> &ManagedStorage {
        &self.managed
    }

    /// Whether the record path `path` names a file in managed storage: the remote prefix, or the
    /// local folder (which holds what was uploaded before the prefix was set, too).
    pub fn is_managed(&self, path: &str) -> bool {
        if let ManagedStorage::Remote(prefix) = &self.managed
            && path.starts_with(prefix.as_str())
        {
            return true;
        }
        Url::parse(path)
            .ok()
            .and_then(|u| u.to_file_path().ok())
            .is_some_and(|file| file.starts_with(self.managed_dir()))
    }

    /// The range cache's hits, misses and bytes held, when there is a cache.
    pub fn cache_counts(&self) -> Option<(u64, u64, u64)> {
        self.cache.as_ref().map(|c| c.counts())
    }

    /// The read leases of this process.
    pub fn leases(&self) -> &Arc<Leases> {
        &self.leases
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Managed storage's local folder: where uploads are written (and, with remote managed
    /// storage, staged until they are copied there).
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
