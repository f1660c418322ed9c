//! `--part K/N` and `--part finish`: a sharded output written by several runs (machines), one
//! protocol whatever the destination. A part writes its shards, each committed only once its
//! overflow check passed; the finishing run checks every shard (size and header, as this plan
//! lays it out), then writes the folder's other files and the index, last: the marker that the
//! output is complete. A local folder (`to_local.rs`) and an object-store prefix are the two [`Destination`]s.

use super::*;
use crate::remote::store::{StoreDir, StoreFile};
use crate::remote::RangeRead;

/// Where the files of a sharded output go.
pub(super) trait Destination {
    /// Where `name` is (a path, or a URL), for messages and the summary.
    fn locate(&self, name: &str) -> PathBuf;
    /// The size of `name`, if something is there.
    fn size_of(&self, name: &str) -> Result<Option<u64>>;
    /// Reads the first `buf.len()` bytes of `name`.
    fn read_head(&self, name: &str, buf: &mut [u8]) -> Result<()>;
    /// Writes weights file `f`, then commits it once `check` accepted its overflow counts.
    fn put_file(
        &self,
        job: &Job,
        f: &OutputFile,
        check: &mut dyn FnMut(Vec<(usize, u64)>) -> Result<()>,
    ) -> Result<()>;
    /// Writes a model folder's other files (config, tokenizer, ...).
    fn put_others(&self, job: &Job, summary: &mut Summary) -> Result<()>;
    /// Writes a small file whole (the index).
    fn put_small(&self, job: &Job, name: &str, bytes: &[u8]) -> Result<()>;
}

/// Runs `part` of `layout` into `dest` (`folder`: the output is a model folder).
pub(super) fn run(
    dest: &dyn Destination,
    job: &Job,
    folder: bool,
    layout: &Layout,
    part: Part,
) -> Result<Summary> {
    let mine = part.files(layout);
    let mut summary = Summary::part(job.plan, &mine, layout, job.progress);
    if let Part::Shards { .. } = part {
        for f in mine {
            if !job.opts.force && dest.size_of(&f.name)?.is_some() {
                return Err(Error::usage(format!(
                    "{}: already exists (use --force to replace it)",
                    dest.locate(&f.name).display()
                )));
            }
            let overflowed = &mut summary.overflowed;
            dest.put_file(job, f, &mut |counts| {
                overflowed.extend(job.written(job.named(&counts))?);
                Ok(())
            })?;
            summary.files.push(dest.locate(&f.name));
        }
        summary.warnings.extend(job.flushed_warning());
        return Ok(summary);
    }
    for (i, f) in layout.files.iter().enumerate() {
        let at = dest.locate(&f.name);
        let header = job.header(f)?;
        let Some(size) = dest.size_of(&f.name)? else {
            return Err(Error::Refused(format!(
                "{}: missing; run the part that writes shard {} first (nothing was finished)",
                at.display(),
                i + 1
            )));
        };
        let mut head = vec![0u8; header.len()];
        let same = size == header.len() as u64 + f.bytes
            && dest.read_head(&f.name, &mut head).is_ok()
            && head == header;
        if !same {
            return Err(Error::Refused(format!(
                "{}: not the shard this plan writes (another input, options or weightcast \
                 version?); nothing was finished",
                at.display()
            )));
        }
    }
    if folder {
        dest.put_others(job, &mut summary)?;
    }
    let index = layout
        .index
        .as_ref()
        .expect("a sharded layout has an index");
    dest.put_small(job, index, index_json(job.cat, job.plan, layout).as_bytes())?;
    summary.files.push(dest.locate(index));
    Ok(summary)
}

/// An object-store prefix: multipart uploads completed once checked.
pub(super) struct StorePrefix<'a> {
    /// The prefix.
    pub(super) dir: &'a StoreDir,
}

impl Destination for StorePrefix<'_> {
    fn locate(&self, name: &str) -> PathBuf {
        PathBuf::from(self.dir.url_of(name))
    }
    fn size_of(&self, name: &str) -> Result<Option<u64>> {
        self.dir.size_of(name)
    }
    fn read_head(&self, name: &str, buf: &mut [u8]) -> Result<()> {
        StoreFile::open(&self.dir.url_of(name))?.read_exact_at(buf, 0)
    }
    fn put_file(
        &self,
        job: &Job,
        f: &OutputFile,
        check: &mut dyn FnMut(Vec<(usize, u64)>) -> Result<()>,
    ) -> Result<()> {
        let (up, counts) = job.upload_file(self.dir, f)?;
        check(counts)?;
        up.complete()
    }
    fn put_others(&self, job: &Job, summary: &mut Summary) -> Result<()> {
        let staging = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
        job.copy_others(staging.path(), summary)?;
        summary.files_copied = job.put_others(self.dir, staging.path())?.len();
        Ok(())
    }
    fn put_small(&self, _job: &Job, name: &str, bytes: &[u8]) -> Result<()> {
        self.dir.put(name, bytes.to_vec())
    }
}
