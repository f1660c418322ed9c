//! Reading a file over HTTP(S) with range requests: the header first, then each
//! tensor's bytes as the executor asks for them, in bounded memory and never the whole file on
//! disk. Redirects are followed; a server error, a timeout, a dropped connection or a short body
//! is retried with backoff; every response must carry the validator (ETag, or Last-Modified,
//! and the length) the first one had, so a file that changes mid-read is an error, never a
//! mixed output.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use super::{retry, Failure, RangeRead};
use crate::error::{Error, Result};

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_body(Some(Duration::from_secs(60)))
        .max_redirects(10)
        .build()
        .into()
}

fn token() -> Option<String> {
    std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty())
}

/// A Hugging Face model repository at a revision (`hf://ORG/NAME[@REVISION]`).
#[derive(Debug, Clone)]
pub struct HfRepo {
    spec: String,
    /// `ORG/NAME`.
    pub repo: String,
    /// Branch, tag or commit (`main` by default).
    pub revision: String,
    endpoint: String,
}

/// Files of at most this size are fetched whole (config, tokenizer, index).
const SMALL_FILE_LIMIT: u64 = 512 << 20;

impl HfRepo {
    /// Parses `hf://ORG/NAME[@REVISION]`; the Hub is `HF_ENDPOINT` (default huggingface.co).
    pub fn parse(spec: &str) -> Result<HfRepo> {
        let rest = spec.strip_prefix("hf://").unwrap_or(spec);
        let (repo, revision) = match rest.split_once('@') {
            Some((r, v)) => (r, v),
            None => (rest, "main"),
        };
        let ok = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() != 2
            || !parts.iter().all(|p| ok(p))
            || revision.is_empty()
            || revision.contains("..")
        {
            return Err(Error::usage(format!(
                "{spec}: give hf://ORG/NAME or hf://ORG/NAME@REVISION"
            )));
        }
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into());
        Ok(HfRepo {
            spec: spec.to_string(),
            repo: repo.to_string(),
            revision: revision.to_string(),
            endpoint: endpoint.trim_end_matches('/').to_string(),
        })
    }

    fn err(&self, what: impl Into<String>) -> Error {
        Error::invalid(&self.spec, what)
    }

    /// The snapshot folder of this revision in the local Hugging Face cache (`HF_HUB_CACHE`,
    /// `HF_HOME/hub` or `~/.cache/huggingface/hub`), when it is there with its weights.
    pub fn cached_snapshot(&self) -> Option<PathBuf> {
        let hub = std::env::var_os("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
            })?;
        let root = hub.join(format!("models--{}", self.repo.replace('/', "--")));
        let commit = match std::fs::read_to_string(root.join("refs").join(&self.revision)) {
            Ok(c) => c.trim().to_string(),
            // A commit hash given as the revision names its snapshot directly.
            Err(_) => self.revision.clone(),
        };
        let snap = root.join("snapshots").join(commit);
        let has_weights = ["model.safetensors", "model.safetensors.index.json"]
            .iter()
            .any(|f| snap.join(f).is_file());
        has_weights.then_some(snap)
    }

    /// The URL files of this revision are under.
    pub fn resolve_base(&self) -> String {
        format!("{}/{}/resolve/{}", self.endpoint, self.repo, self.revision)
    }

    /// The repository's files (the Hub's model API).
    pub fn list(&self) -> Result<Vec<String>> {
        let url = format!(
            "{}/api/models/{}/revision/{}",
            self.endpoint, self.repo, self.revision
        );
        let body = self.get(&url, 64 << 20)?;
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| self.err(format!("the Hub's file list is not JSON: {e}")))?;
        let files: Vec<String> = v
            .get("siblings")
            .and_then(|s| s.as_array())
            .ok_or_else(|| self.err("the Hub's answer has no `siblings` list"))?
            .iter()
            .filter_map(|s| {
                s.get("rfilename")
                    .and_then(|f| f.as_str())
                    .map(str::to_string)
            })
            .collect();
        Ok(files)
    }

    /// A small file of the repository, whole.
    pub fn get_small(&self, file: &str) -> Result<Vec<u8>> {
        self.get(&format!("{}/{file}", self.resolve_base()), SMALL_FILE_LIMIT)
    }

    /// A file of the repository, whole, streamed into `out` (PyTorch archives, which are read
    /// from a local copy); returns its length.
    pub fn download(&self, file: &str, out: &mut std::fs::File) -> Result<u64> {
        use std::io::{Seek, Write};
        let url = format!("{}/{file}", self.resolve_base());
        let agent = agent();
        retry(|| {
            let fail = |what: String| Failure::Retry(format!("{url}: {what}"));
            out.set_len(0)
                .and_then(|_| out.rewind())
                .map_err(|e| Failure::Final(format!("cannot save {url} locally: {e}")))?;
            let mut req = agent.get(&url);
            if let Some(t) = token() {
                req = req.header("Authorization", &format!("Bearer {t}"));
            }
            let mut resp = req.call().map_err(|e| fail(e.to_string()))?;
            match resp.status().as_u16() {
                200 => {}
                s @ (401 | 403) => {
                    return Err(Failure::Final(format!(
                        "{url}: HTTP {s}: access denied (a gated or private repository: set \
                         HF_TOKEN)"
                    )))
                }
                s if s >= 500 || s == 429 => return Err(fail(format!("HTTP {s}"))),
                s => return Err(Failure::Final(format!("{url}: HTTP {s}"))),
            }
            let expected: Option<u64> = resp
                .headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let mut body = resp.body_mut().with_config().limit(u64::MAX).reader();
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0u64;
            loop {
                let k = body.read(&mut buf).map_err(|e| fail(e.to_string()))?;
                if k == 0 {
                    break;
                }
                out.write_all(&buf[..k])
                    .map_err(|e| Failure::Final(format!("cannot save {url} locally: {e}")))?;
                n += k as u64;
            }
            if expected.is_some_and(|e| e != n) {
                return Err(fail(format!("short body: {n} of {expected:?} bytes")));
            }
            Ok(n)
        })
        .map_err(|what| self.err(what))
    }

    /// GET with retries on 5xx and transport errors.
    fn get(&self, url: &str, limit: u64) -> Result<Vec<u8>> {
        let agent = agent();
        retry(|| {
            let mut req = agent.get(url);
            if let Some(t) = token() {
                req = req.header("Authorization", &format!("Bearer {t}"));
            }
            let mut resp = req
                .call()
                .map_err(|e| Failure::Retry(format!("{url}: {e}")))?;
            match resp.status().as_u16() {
                200 => {}
                s @ (401 | 403) => {
                    return Err(Failure::Final(format!(
                    "{url}: HTTP {s}: access denied (a gated or private repository: set HF_TOKEN)"
                )))
                }
                404 => return Err(Failure::Final(format!("{url}: HTTP 404: not found"))),
                s if s >= 500 || s == 429 => {
                    return Err(Failure::Retry(format!("{url}: HTTP {s}")))
                }
                s => return Err(Failure::Final(format!("{url}: HTTP {s}"))),
            }
            resp.body_mut()
                .with_config()
                .limit(limit)
                .read_to_vec()
                .map_err(|e| Failure::Retry(format!("{url}: {e}")))
        })
        .map_err(|what| self.err(what))
    }
}

/// Parses a `Content-Range: bytes START-END/TOTAL` value (decimal digits only) into a range
/// that lies inside the file (`START <= END < TOTAL`); anything else is `None`.
pub fn parse_content_range(value: &str) -> Option<(u64, u64, u64)> {
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let (se, total) = value.strip_prefix("bytes ")?.split_once('/')?;
    let (s, e) = se.split_once('-')?;
    let (s, e, total) = (num(s)?, num(e)?, num(total)?);
    (s <= e && e < total).then_some((s, e, total))
}

/// A remote file read by ranges.
#[derive(Debug)]
pub struct RemoteFile {
    url: String,
    agent: ureq::Agent,
    token: Option<String>,
    /// Length in bytes.
    pub len: u64,
    /// The ETag (or Last-Modified) of the first response.
    validator: Option<String>,
}

impl RemoteFile {
    /// Opens `url`: one range request for its first byte gives its length and validator and
    /// shows that the server honours ranges. `HF_TOKEN` is sent as a bearer token when set.
    pub fn open(url: &str) -> Result<RemoteFile> {
        let agent = agent();
        let token = token();
        let mut f = RemoteFile {
            url: url.to_string(),
            agent,
            token,
            len: 0,
            validator: None,
        };
        let mut first = [0u8; 1];
        let (len, validator) = f.with_retries(|f| f.fetch(0, &mut first))?;
        f.len = len;
        f.validator = validator;
        Ok(f)
    }

    /// The URL as a path, for messages and the catalogue.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(&self.url)
    }

    fn err(&self, what: impl Into<String>) -> Error {
        Error::invalid(self.path(), what)
    }

    /// Fills `buf` with the bytes at `pos`.
    pub fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = pos + buf.len() as u64;
        if end > self.len {
            return Err(self.err(format!(
                "bytes {pos}..{end} asked for, but the file is {} bytes",
                self.len
            )));
        }
        self.with_retries(|f| {
            let (len, v) = f.fetch(pos, buf)?;
            if len != f.len || v != f.validator {
                return Err(Failure::Final(format!(
                    "changed on the server while it was read (length {} -> {len}, validator \
                     {:?} -> {v:?}): nothing from it was written",
                    f.len, f.validator
                )));
            }
            Ok(())
        })
    }

    /// Runs `once` with [`retry`]; errors name the URL.
    fn with_retries<T>(
        &self,
        mut once: impl FnMut(&Self) -> std::result::Result<T, Failure>,
    ) -> Result<T> {
        retry(|| once(self)).map_err(|what| self.err(what))
    }

    /// One range request for `buf.len()` bytes at `pos`; returns the file's length and
    /// validator as this response gives them.
    fn fetch(
        &self,
        pos: u64,
        buf: &mut [u8],
    ) -> std::result::Result<(u64, Option<String>), Failure> {
        let end = pos + buf.len() as u64 - 1;
        let mut req = self
            .agent
            .get(&self.url)
            .header("Range", &format!("bytes={pos}-{end}"));
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut resp = match req.call() {
            Ok(r) => r,
            Err(e) => {
                return Err(Failure::Retry(format!(
                    "request for bytes {pos}..={end}: {e}"
                )))
            }
        };
        let status = resp.status().as_u16();
        match status {
            206 => {}
            200 => {
                return Err(Failure::Final(
                    "the server ignores range requests (answered 200 with the whole file): \
                     weightcast reads remote files by ranges"
                        .into(),
                ))
            }
            401 | 403 => {
                return Err(Failure::Final(format!(
                    "HTTP {status}: access denied{}",
                    if self.token.is_some() {
                        " (HF_TOKEN was sent: does it grant access to this repository?)"
                    } else {
                        " (a gated or private file: set HF_TOKEN)"
                    }
                )))
            }
            404 => return Err(Failure::Final("HTTP 404: not found".into())),
            416 => {
                return Err(Failure::Final(format!(
                    "HTTP 416: bytes {pos}..={end} out of range"
                )))
            }
            s if s >= 500 || s == 429 || s == 408 => {
                return Err(Failure::Retry(format!("HTTP {s} for bytes {pos}..={end}")))
            }
            s => return Err(Failure::Final(format!("HTTP {s} for bytes {pos}..={end}"))),
        }
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        // Content-Range: bytes START-END/TOTAL
        let range = header("content-range").unwrap_or_default();
        let Some((s, e, total)) = parse_content_range(&range) else {
            return Err(Failure::Final(format!(
                "no usable Content-Range in the answer for bytes {pos}..={end} (got `{range}`)"
            )));
        };
        if s != pos || e != end {
            return Err(Failure::Final(format!(
                "asked for bytes {pos}..={end}, the server sent {s}..={e}"
            )));
        }
        let validator = header("etag").or_else(|| header("last-modified"));
        let mut reader = resp.body_mut().as_reader();
        let mut got = 0;
        while got < buf.len() {
            match reader.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(Failure::Retry(format!(
                        "short body: {got} of {} bytes at byte {pos}",
                        buf.len()
                    )))
                }
                Ok(k) => got += k,
                Err(e) => {
                    return Err(Failure::Retry(format!(
                        "connection lost after {got} of {} bytes at byte {pos}: {e}",
                        buf.len()
                    )))
                }
            }
        }
        // The body's end, read, hands the connection back to the agent's pool for the next
        // request (measured: one connection per request without it).
        let mut end_of_body = [0u8; 1];
        if matches!(reader.read(&mut end_of_body), Ok(n) if n > 0) {
            return Err(Failure::Retry(format!(
                "the answer for bytes {pos}..={end} is longer than asked"
            )));
        }
        Ok((total, validator))
    }
}

impl RangeRead for RemoteFile {
    fn len(&self) -> u64 {
        self.len
    }

    fn check_unchanged(&self) -> Result<()> {
        let mut one = [0u8; 1];
        self.with_retries(|f| {
            let (len, v) = f.fetch(0, &mut one)?;
            if len != f.len || v != f.validator {
                return Err(Failure::Final(format!(
                    "changed on the server while it was read (checked after the last range: \
                     length {} -> {len}, validator {:?} -> {v:?}): nothing from it was written",
                    f.len, f.validator
                )));
            }
            Ok(())
        })
    }
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        RemoteFile::read_exact_at(self, buf, pos)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_content_range;

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("bytes 0-9/10"), Some((0, 9, 10)));
        assert_eq!(parse_content_range("bytes 5-5/6"), Some((5, 5, 6)));
        for bad in [
            "bytes 0-10/10",
            "bytes 5-4/10",
            "bytes +1-2/10",
            "bytes 1-2/*",
            "bytes -2/10",
            "items 0-1/2",
            "bytes 0-1/2 ",
            "bytes 0-99999999999999999999/1",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }
}
