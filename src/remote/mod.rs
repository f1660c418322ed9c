//! Inputs and outputs that are not local files: HTTP(S) URLs and Hugging Face repositories
//! ([`http`]), and object stores such as S3 ([`store`]). Remote files are read by ranges (the
//! header first, then each tensor's bytes as the executor asks for them), so memory stays
//! bounded and no weights file is ever downloaded whole.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;

pub mod http;
pub mod store;

pub use http::{HfRepo, RemoteFile};

/// Attempts per request (the first and the retries).
const ATTEMPTS: u32 = 4;

/// A remote file read by byte ranges.
pub trait RangeRead: Send + Sync + std::fmt::Debug {
    /// Its length in bytes.
    fn len(&self) -> u64;
    /// True for an empty file.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` with the bytes at `pos`; an error names the file.
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> Result<()>;
    /// An error if the file is no longer the one opened (its length or validator changed):
    /// asked once every range was read, before an output is committed, since a replacement
    /// after the last range would pass the per-range checks.
    fn check_unchanged(&self) -> Result<()>;
}

/// True for a path the user gave as a URL (`https://`, `http://`, `hf://`, or an object
/// store's: `s3://`, `gs://`, `az://`...).
pub fn is_url(path: &Path) -> bool {
    path.to_str().is_some_and(|s| {
        s.starts_with("https://") || s.starts_with("http://") || s.starts_with("hf://")
    }) || store::is_store_url(path)
}

/// Opens the remote file at `url` for range reads (HTTP(S) or an object store).
pub fn open(url: &str) -> Result<Arc<dyn RangeRead>> {
    if store::is_store_url(Path::new(url)) {
        return Ok(Arc::new(store::StoreFile::open(url)?));
    }
    Ok(Arc::new(RemoteFile::open(url)?))
}

/// What one attempt got wrong: retried, or final.
pub(crate) enum Failure {
    Retry(String),
    Final(String),
}

/// Runs `once`, retrying with backoff (0.25 s, 0.5 s, 1 s) what can be retried; the error
/// is the message to report.
pub(crate) fn retry<T>(
    mut once: impl FnMut() -> std::result::Result<T, Failure>,
) -> std::result::Result<T, String> {
    let mut delay = Duration::from_millis(250);
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(delay);
            delay *= 2;
        }
        match once() {
            Ok(t) => return Ok(t),
            Err(Failure::Final(what)) => return Err(what),
            Err(Failure::Retry(what)) => last = what,
        }
    }
    Err(format!("{last} (after {ATTEMPTS} attempts)"))
}
