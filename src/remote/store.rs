//! Object stores (`s3://BUCKET/PREFIX`, S3-compatible servers through `AWS_ENDPOINT_URL`,
//! and the `gs://` and `az://` stores the `object_store` crate serves) as inputs and outputs.
//!
//! Reading is by ranges, each checked against the ETag the object had when it was opened (a
//! file replaced mid-read is an error, never a mixed output). Writing is by multipart upload:
//! a weights file's parts go up while it is converted and the upload is completed only when
//! every file of the output has been written and checked, so an error or an interruption
//! leaves nothing at the destination (pending uploads are aborted).
//!
//! Credentials and settings come from the usual environment variables (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`, ...,
//! `GOOGLE_*`, `AZURE_*`), then, for S3, from the shared files `~/.aws/credentials` and
//! `~/.aws/config` (`AWS_PROFILE`, `AWS_SHARED_CREDENTIALS_FILE`, `AWS_CONFIG_FILE`).

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{
    GetOptions, GetRange, MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload,
};

use super::{retry, Failure, RangeRead};
use crate::error::{Error, Result};

/// URL schemes served by an object store.
const SCHEMES: &[&str] = &["s3://", "s3a://", "gs://", "az://", "abfs://", "abfss://"];

/// Smallest multipart part (S3 needs 5 MiB for every part but the last).
const MIN_PART: u64 = 8 << 20;
/// S3 allows 10,000 parts per upload; part sizes grow for larger files to stay below.
const MAX_PARTS: u64 = 9_000;
/// Parts uploading at once per file (memory: this many parts, plus the one being filled).
const IN_FLIGHT: usize = 4;

/// True for an object store URL (`s3://`, `gs://`, `az://`...).
pub fn is_store_url(path: &Path) -> bool {
    path.to_str()
        .is_some_and(|s| SCHEMES.iter().any(|p| s.starts_with(p)))
}

/// The runtime the store clients run on (two threads; callers block on it).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("weightcast-store")
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// An object store error as one line: whitespace collapsed, an XML error body reduced to its
/// code and message.
fn one_line(e: &object_store::Error) -> String {
    let s = e.to_string();
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let tag = |name: &str| -> Option<String> {
        let start = s.find(&format!("<{name}>"))? + name.len() + 2;
        let end = start + s[start..].find(&format!("</{name}>"))?;
        Some(s[start..end].to_string())
    };
    match (s.find("<?xml").or_else(|| s.find("<Error>")), tag("Code")) {
        (Some(at), Some(code)) => {
            let message = tag("Message").unwrap_or_default();
            format!("{} {code}: {message}", s[..at].trim_end())
        }
        _ => s.trim_end_matches([':', ' ']).to_string(),
    }
}

/// Settings from the environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`), then the AWS shared files.
fn settings(scheme: &str) -> Vec<(String, String)> {
    let mut opts: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            ["AWS_", "GOOGLE_", "AZURE_"]
                .iter()
                .any(|p| k.starts_with(p))
        })
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    if scheme.starts_with("s3") {
        aws_files(&mut opts);
        let endpoint = opts
            .iter()
            .find(|(k, _)| k == "aws_endpoint_url" || k == "aws_endpoint")
            .map(|(_, v)| v.clone());
        // An endpoint named with http:// is the user's choice of plain HTTP (a local server).
        if endpoint.is_some_and(|e| e.starts_with("http://"))
            && !opts.iter().any(|(k, _)| k == "aws_allow_http")
        {
            opts.push(("aws_allow_http".into(), "true".into()));
        }
    }
    opts
}

/// Adds what the AWS shared credentials and config files say for the profile
/// (`AWS_PROFILE`, else `default`), where the environment did not say it.
fn aws_files(opts: &mut Vec<(String, String)>) {
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let file = |var: &str, default: &str| {
        std::env::var_os(var)
            .map(std::path::PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(default)))
    };
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let wanted = [
        ("aws_access_key_id", "aws_access_key_id"),
        ("aws_secret_access_key", "aws_secret_access_key"),
        ("aws_session_token", "aws_session_token"),
        ("region", "aws_region"),
        ("endpoint_url", "aws_endpoint_url"),
    ];
    let sections = [
        (
            file("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
            profile.clone(),
        ),
        (
            file("AWS_CONFIG_FILE", "config"),
            if profile == "default" {
                profile.clone()
            } else {
                format!("profile {profile}")
            },
        ),
    ];
    for (path, section) in sections {
        let Some(text) = path.and_then(|p| std::fs::read_to_string(p).ok()) else {
            continue;
        };
        for (k, v) in ini_section(&text, &section) {
            if let Some((_, key)) = wanted.iter().find(|(name, _)| *name == k) {
                if !opts.iter().any(|(o, _)| o == key) {
                    opts.push((key.to_string(), v));
                }
            }
        }
    }
}

/// The `key = value` lines of section `[name]` of an INI text.
fn ini_section(text: &str, name: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = s.trim() == name;
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
    }
    out
}

/// The store serving `url` (one client per bucket, shared) and the object path in it.
fn open_store(url: &str) -> Result<(Arc<dyn ObjectStore>, ObjPath)> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let bad = |what: String| Error::usage(format!("{url}: {what}"));
    // Checked on the text: URL parsing would resolve `..` silently.
    let raw = url.split_once("://").map_or(url, |(_, r)| r);
    if raw.split('/').any(|s| s == ".." || s == ".") {
        return Err(bad("`.` and `..` are not object names".into()));
    }
    let parsed = url::Url::parse(url).map_err(|e| bad(format!("not a URL: {e}")))?;
    let scheme = parsed.scheme().to_string();
    let bucket = format!("{scheme}://{}", parsed.host_str().unwrap_or_default());
    let key = parsed.path().trim_start_matches('/').trim_end_matches('/');
    let path = ObjPath::parse(key).map_err(|e| bad(e.to_string()))?;
    let mut stores = STORES.get_or_init(Default::default).lock().expect("stores");
    if let Some(s) = stores.get(&bucket) {
        return Ok((s.clone(), path));
    }
    let store = build(&scheme, &format!("{bucket}/"), settings(&scheme))
        .map_err(|e| bad(format!("cannot open the object store: {}", one_line(&e))))?;
    stores.insert(bucket, store.clone());
    Ok((store, path))
}

/// Retries inside the client: a few, within a minute (the default is ten within three
/// minutes, long to wait for a wrong endpoint).
fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        max_retries: 4,
        retry_timeout: std::time::Duration::from_secs(60),
        ..Default::default()
    }
}

/// The client of scheme `scheme` for the bucket URL `root`, configured with `opts` (keys the
/// store does not know are ignored).
fn build(
    scheme: &str,
    root: &str,
    opts: Vec<(String, String)>,
) -> object_store::Result<Arc<dyn ObjectStore>> {
    macro_rules! with_opts {
        ($builder:ty) => {{
            let b = opts.iter().fold(
                <$builder>::new().with_url(root).with_retry(retry_config()),
                |b, (k, v)| match k.parse() {
                    Ok(key) => b.with_config(key, v),
                    Err(_) => b,
                },
            );
            Arc::new(b.build()?) as Arc<dyn ObjectStore>
        }};
    }
    Ok(match scheme {
        "s3" | "s3a" => with_opts!(object_store::aws::AmazonS3Builder),
        "gs" => with_opts!(object_store::gcp::GoogleCloudStorageBuilder),
        _ => with_opts!(object_store::azure::MicrosoftAzureBuilder),
    })
}

/// How an error of one request is handled (the client has retried transient ones already).
fn classify(e: &object_store::Error) -> Failure {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => Failure::Final("not found".into()),
        E::Precondition { .. } => Failure::Final(
            "changed in the store while it was read: nothing from it was written".into(),
        ),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => denied(e),
        _ if ["401 Unauthorized", "403 Forbidden"]
            .iter()
            .any(|c| e.to_string().contains(c)) =>
        {
            denied(e)
        }
        _ => Failure::Final(one_line(e)),
    }
}

fn denied(e: &object_store::Error) -> Failure {
    Failure::Final(format!(
        "access denied (check AWS_ACCESS_KEY_ID / AWS_PROFILE and the bucket's policy): {}",
        one_line(e)
    ))
}

/// An object read by ranges.
#[derive(Debug)]
pub struct StoreFile {
    url: String,
    store: Arc<dyn ObjectStore>,
    path: ObjPath,
    len: u64,
    etag: Option<String>,
}

impl StoreFile {
    /// Opens the object at `url`: its length and ETag.
    pub fn open(url: &str) -> Result<StoreFile> {
        let (store, path) = open_store(url)?;
        let meta = retry(|| block_on(store.head(&path)).map_err(|e| classify(&e)))
            .map_err(|what| Error::invalid(url, what))?;
        Ok(StoreFile {
            url: url.to_string(),
            store,
            path,
            len: meta.size,
            etag: meta.e_tag,
        })
    }
}

impl RangeRead for StoreFile {
    fn len(&self) -> u64 {
        self.len
    }

    fn check_unchanged(&self) -> Result<()> {
        let meta = retry(|| block_on(self.store.head(&self.path)).map_err(|e| classify(&e)))
            .map_err(|what| Error::invalid(&self.url, what))?;
        if meta.size != self.len || meta.e_tag != self.etag {
            return Err(Error::invalid(
                &self.url,
                "changed in the store while it was read (checked after the last range): \
                 nothing from it was written",
            ));
        }
        Ok(())
    }

    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = pos + buf.len() as u64;
        if end > self.len {
            return Err(Error::invalid(
                &self.url,
                format!(
                    "bytes {pos}..{end} asked for, but the object is {} bytes",
                    self.len
                ),
            ));
        }
        retry(|| {
            let opts = GetOptions {
                range: Some(GetRange::Bounded(pos..end)),
                if_match: self.etag.clone(),
                ..Default::default()
            };
            let got = block_on(async {
                let r = self.store.get_opts(&self.path, opts).await?;
                r.bytes().await
            })
            .map_err(|e| classify(&e))?;
            if got.len() != buf.len() {
                return Err(Failure::Retry(format!(
                    "short body: {} of {} bytes at byte {pos}",
                    got.len(),
                    buf.len()
                )));
            }
            buf.copy_from_slice(&got);
            Ok(())
        })
        .map_err(|what| Error::invalid(&self.url, what))
    }
}

/// A "folder" of an object store: the objects under a prefix.
#[derive(Debug, Clone)]
pub struct StoreDir {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
}

impl StoreDir {
    /// The objects under `url` (a prefix).
    pub fn open(url: &str) -> Result<StoreDir> {
        let (store, prefix) = open_store(url)?;
        Ok(StoreDir {
            url: url.trim_end_matches('/').to_string(),
            store,
            prefix,
        })
    }

    /// The URL of object `name` (relative to the prefix).
    pub fn url_of(&self, name: &str) -> String {
        format!("{}/{name}", self.url)
    }

    fn path_of(&self, name: &str) -> ObjPath {
        name.split('/')
            .fold(self.prefix.clone(), |p, part| p.join(part))
    }

    fn err(&self, name: &str, what: impl Into<String>) -> Error {
        Error::invalid(self.url_of(name), what)
    }

    /// Every object under the prefix: its name relative to it, and its size.
    pub fn list(&self) -> Result<Vec<(String, u64)>> {
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let metas: Vec<object_store::ObjectMeta> =
            retry(|| block_on(self.store.list(prefix).try_collect()).map_err(|e| classify(&e)))
                .map_err(|what| Error::invalid(&self.url, format!("cannot list: {what}")))?;
        let base = self.prefix.as_ref();
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let full = m.location.as_ref();
                let rel = if base.is_empty() {
                    full
                } else {
                    full.strip_prefix(base)?.strip_prefix('/')?
                };
                Some((rel.to_string(), m.size))
            })
            .collect())
    }

    /// The size of object `name`, or `None` where there is none.
    pub fn size_of(&self, name: &str) -> Result<Option<u64>> {
        let path = self.path_of(name);
        match retry(|| match block_on(self.store.head(&path)) {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(classify(&e)),
        }) {
            Ok(s) => Ok(s),
            Err(what) => Err(self.err(name, what)),
        }
    }

    /// Object `name`, whole (at most `limit` bytes).
    pub fn get(&self, name: &str, limit: u64) -> Result<Vec<u8>> {
        let path = self.path_of(name);
        let bytes = retry(|| {
            block_on(async {
                let r = self.store.get(&path).await?;
                if r.meta.size > limit {
                    return Ok(None);
                }
                r.bytes().await.map(Some)
            })
            .map_err(|e| classify(&e))
        })
        .map_err(|what| self.err(name, what))?;
        bytes
            .map(|b| b.to_vec())
            .ok_or_else(|| self.err(name, format!("larger than {limit} bytes")))
    }

    /// Copies object `name` into `out`, streamed.
    pub fn download(&self, name: &str, out: &mut std::fs::File) -> Result<u64> {
        let path = self.path_of(name);
        let fail = |what: String| self.err(name, what);
        block_on(async {
            let r = self
                .store
                .get(&path)
                .await
                .map_err(|e| fail(one_line(&e)))?;
            let mut stream = r.into_stream();
            let mut n = 0u64;
            while let Some(chunk) = stream.try_next().await.map_err(|e| fail(one_line(&e)))? {
                out.write_all(&chunk)
                    .map_err(|e| fail(format!("cannot save it locally: {e}")))?;
                n += chunk.len() as u64;
            }
            Ok(n)
        })
    }

    /// Stores `bytes` as object `name` (one request: visible at once).
    pub fn put(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let path = self.path_of(name);
        let payload = PutPayload::from(bytes);
        retry(|| {
            block_on(self.store.put(&path, payload.clone()))
                .map(|_| ())
                .map_err(|e| classify(&e))
        })
        .map_err(|what| self.err(name, what))
    }

    /// Deletes object `name` (a missing one is not an error).
    pub fn delete(&self, name: &str) -> Result<()> {
        let path = self.path_of(name);
        match block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(name, one_line(&e))),
        }
    }

    /// Starts a multipart upload of object `name`, about `size` bytes long: nothing is
    /// visible until [`Upload::complete`]; dropping the upload aborts it.
    pub fn upload(&self, name: &str, size: u64) -> Result<Upload> {
        let path = self.path_of(name);
        let inner = block_on(self.store.put_multipart(&path))
            .map_err(|e| self.err(name, format!("cannot start an upload: {}", one_line(&e))))?;
        let part = (size.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20).max(MIN_PART) as usize;
        Ok(Upload {
            url: self.url_of(name),
            inner: Some(inner),
            part,
            buf: Vec::new(),
            in_flight: VecDeque::new(),
            written: 0,
        })
    }
}

/// A multipart upload in progress (see [`StoreDir::upload`]).
pub struct Upload {
    url: String,
    inner: Option<Box<dyn MultipartUpload>>,
    part: usize,
    buf: Vec<u8>,
    in_flight: VecDeque<tokio::task::JoinHandle<object_store::Result<()>>>,
    written: u64,
}

impl Upload {
    /// The object's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn err(&self, what: impl Into<String>) -> Error {
        Error::invalid(&self.url, what)
    }

    /// Appends `bytes`; full parts are sent while the next ones fill.
    pub fn write(&mut self, mut bytes: &[u8]) -> Result<()> {
        self.written += bytes.len() as u64;
        while !bytes.is_empty() {
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(self.part);
            }
            let n = (self.part - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.buf.len() == self.part {
                self.send()?;
            }
        }
        Ok(())
    }

    /// Sends the part being filled.
    fn send(&mut self) -> Result<()> {
        let data = std::mem::take(&mut self.buf);
        let fut = self
            .inner
            .as_mut()
            .expect("an upload in progress")
            .put_part(PutPayload::from(data));
        self.in_flight.push_back(runtime().spawn(fut));
        while self.in_flight.len() >= IN_FLIGHT {
            self.wait_one()?;
        }
        Ok(())
    }

    fn wait_one(&mut self) -> Result<()> {
        let Some(h) = self.in_flight.pop_front() else {
            return Ok(());
        };
        match block_on(h) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.err(format!("a part failed to upload: {}", one_line(&e)))),
            Err(e) => Err(self.err(format!("a part failed to upload: {e}"))),
        }
    }

    /// Sends what is left and waits for every part: the data is all in the store, not yet
    /// visible.
    pub fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        while !self.in_flight.is_empty() {
            self.wait_one()?;
        }
        Ok(())
    }

    /// Makes the object visible.
    pub fn complete(mut self) -> Result<()> {
        self.flush()?;
        let mut inner = self.inner.take().expect("an upload in progress");
        match block_on(inner.complete()) {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = block_on(inner.abort());
                Err(self.err(format!("cannot complete the upload: {}", one_line(&e))))
            }
        }
    }
}

impl Drop for Upload {
    /// An upload neither completed nor aborted is aborted: its parts are discarded and
    /// nothing appears.
    fn drop(&mut self) {
        for h in self.in_flight.drain(..) {
            h.abort();
        }
        if let Some(mut inner) = self.inner.take() {
            let _ = block_on(inner.abort());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ini_sections() {
        let text = "[default]\naws_access_key_id = A\n# c\n[profile dev]\nregion=eu-west-1\n\
                    aws_secret_access_key = S = x\n";
        assert_eq!(
            ini_section(text, "default"),
            vec![("aws_access_key_id".to_string(), "A".to_string())]
        );
        assert_eq!(
            ini_section(text, "profile dev"),
            vec![
                ("region".to_string(), "eu-west-1".to_string()),
                ("aws_secret_access_key".to_string(), "S = x".to_string())
            ]
        );
        assert!(ini_section(text, "none").is_empty());
    }

    #[test]
    fn store_urls() {
        assert!(is_store_url(Path::new("s3://b/k")));
        assert!(is_store_url(Path::new("gs://b/k")));
        assert!(!is_store_url(Path::new("https://b/k")));
        assert!(!is_store_url(Path::new("./s3:/b")));
        assert!(open_store("s3://bucket/a/../b").is_err());
    }
}
