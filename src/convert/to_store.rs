//! Writing the output into an object store (`s3://BUCKET/PREFIX`): the same plan, layout,
//! headers and executor as a local output, each weights file streamed into a multipart upload
//! while it is converted.
//!
//! Nothing appears at the destination before the whole output is written and checked: every
//! weights file's parts are uploaded first and its upload completed only after the overflow
//! check of all of them, then the folder's other files, then the index, last (the marker that
//! the output is complete). An error or an interruption aborts the pending uploads.

use super::executor::CHUNK_BYTES;
use super::*;
use crate::remote::store::{StoreDir, Upload};

impl Sink for Upload {
    fn begin(&mut self, _i: usize) -> Result<()> {
        Ok(())
    }
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        Upload::write(self, bytes)
    }
}

/// The URL of the folder a target's files go into (a folder's own; a file's parent) and the
/// target's own file name (`None` for a folder).
pub(super) fn split_target(target: &Target) -> (String, Option<String>) {
    let url = target
        .path()
        .to_string_lossy()
        .trim_end_matches('/')
        .to_string();
    match target {
        Target::Folder(_) => (url, None),
        _ => match url.rsplit_once('/') {
            Some((dir, name)) if !dir.ends_with('/') => (dir.to_string(), Some(name.to_string())),
            _ => (url.clone(), None),
        },
    }
}

/// Converts into an object store (see the module's description).
pub(super) fn convert_to_store(
    cat: &Catalogue,
    plan: &Plan,
    output: &Output,
    opts: &Options,
    progress: &dyn Progress,
) -> Result<Summary> {
    let (target, layout) = (output.target.clone(), output.layout.clone());
    let (dir_url, own) = split_target(&target);
    if matches!(target, Target::Pt(_)) && opts.part.is_some() {
        return Err(Error::usage(
            "--part splits a sharded output by shard: write a model folder or an index, not one \
             .pt file",
        ));
    }
    // The input is never overwritten: no input file may be an output object, and a folder
    // output may not contain the input.
    let outputs: Vec<String> = match &target {
        Target::Pt(_) => own.iter().cloned().collect(),
        _ => layout
            .files
            .iter()
            .map(|f| f.name.clone())
            .chain(layout.index.clone())
            .collect(),
    };
    let dir = StoreDir::open(&dir_url)?;
    let input = cat.path.to_string_lossy().trim_end_matches('/').to_string();
    for f in cat
        .files
        .iter()
        .map(|f| f.path.to_string_lossy().into_owned())
    {
        if outputs.iter().any(|o| dir.url_of(o) == f) {
            return Err(Error::usage(format!(
                "{f}: the output would overwrite the input; choose another output"
            )));
        }
    }
    if matches!(target, Target::Folder(_))
        && (input == dir_url || input.starts_with(&format!("{dir_url}/")))
    {
        return Err(Error::usage(format!(
            "{dir_url}: the output prefix contains the input; choose another output"
        )));
    }
    let existing: Vec<String> = match &target {
        Target::Folder(_) => dir.list()?.into_iter().map(|(n, _)| n).collect(),
        _ => {
            let mut there = Vec::new();
            for o in &outputs {
                if dir.size_of(o)?.is_some() {
                    there.push(o.clone());
                }
            }
            there
        }
    };
    let sources = Sources::open(cat)?;
    let job = Job::new(cat, plan, &sources, opts, progress).writing(output);
    if let Some(part) = opts.part {
        return job.store_part(&dir, &target, layout, part);
    }
    if !opts.force {
        if let Some(o) = existing.first() {
            return Err(Error::usage(format!(
                "{}: already exists (use --force to replace it)",
                dir.url_of(o)
            )));
        }
    }
    let mut summary = Summary::whole(plan, layout, progress);
    let written = match (&target, own) {
        (Target::Pt(_), Some(name)) => {
            job.upload_pt(&dir, &name, &mut summary)?;
            vec![name]
        }
        _ => job.write_store(&dir, &target, &mut summary)?,
    };
    if matches!(target, Target::Folder(_)) {
        // A replaced folder keeps nothing of the previous output (as a local --force does).
        for old in existing.iter().filter(|o| !written.contains(o)) {
            dir.delete(old)?;
        }
    }
    summary.warnings.extend(job.flushed_warning());
    Ok(summary)
}

impl Job<'_> {
    /// Uploads one weights file (header, then every tensor through the executor) without
    /// completing it; returns the upload and, per plan entry with any, the overflow counts.
    pub(super) fn upload_file(
        &self,
        dir: &StoreDir,
        f: &OutputFile,
    ) -> Result<(Upload, Vec<(usize, u64)>)> {
        let header = self.header(f)?;
        let mut up = dir.upload(&f.name, header.len() as u64 + f.bytes)?;
        up.write(&header)?;
        self.precompute_scales(&f.tensors)?;
        let pieces: Vec<Piece<'_>> = f
            .tensors
            .iter()
            .map(|&i| self.piece(&self.plan.tensors()[i]))
            .collect::<Result<_>>()?;
        let counts = self.exec().run(&pieces, &mut up)?;
        self.check_cancel()?;
        up.flush()?;
        Ok((
            up,
            counts.into_iter().map(|(k, n)| (f.tensors[k], n)).collect(),
        ))
    }

    /// Weights files, then (for a folder) the other files, then the index; returns the names
    /// of the objects written.
    pub(super) fn write_store(
        &self,
        dir: &StoreDir,
        target: &Target,
        summary: &mut Summary,
    ) -> Result<Vec<String>> {
        let layout = summary.layout.clone();
        let mut pending = Vec::new();
        let mut overflow = Vec::new();
        for f in &layout.files {
            let (up, counts) = self.upload_file(dir, f)?;
            overflow.extend(counts);
            pending.push(up);
        }
        summary.overflowed = self.written(self.named(&overflow))?;
        self.check_cancel()?;
        // The folder's other files (config.json updated) are prepared before anything is
        // made visible.
        let staging = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
        if matches!(target, Target::Folder(_)) {
            self.copy_others(staging.path(), summary)?;
        }
        let mut written: Vec<String> = layout.files.iter().map(|f| f.name.clone()).collect();
        for up in pending {
            let url = up.url().to_string();
            up.complete()?;
            summary.files.push(PathBuf::from(url));
        }
        written.extend(self.put_others(dir, staging.path())?);
        if let Some(index) = &layout.index {
            dir.put(index, index_json(self.cat, self.plan, &layout).into_bytes())?;
            summary.files.push(PathBuf::from(dir.url_of(index)));
            written.push(index.clone());
        }
        Ok(written)
    }

    /// Uploads the other files [`Job::copy_others`] prepared in `staging`; returns their
    /// names.
    pub(super) fn put_others(&self, dir: &StoreDir, staging: &Path) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let Some(folder) = &self.cat.folder else {
            return Ok(names);
        };
        for rel in &folder.other_files {
            self.check_cancel()?;
            let local = staging.join(rel);
            if !local.is_file() {
                continue;
            }
            let bytes = std::fs::read(&local).map_err(|e| Error::io(&local, e))?;
            let name = rel.to_string_lossy().into_owned();
            dir.put(&name, bytes)?;
            names.push(name);
        }
        Ok(names)
    }

    /// A `torch.save` output: written into a local temporary file (the zip writer goes back to
    /// patch its records), then uploaded.
    pub(super) fn upload_pt(
        &self,
        dir: &StoreDir,
        name: &str,
        summary: &mut Summary,
    ) -> Result<()> {
        use std::io::Read;
        let staging = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
        let local = staging.path().join(name);
        self.write_pt(&local, summary)?;
        let mut file = File::open(&local).map_err(|e| Error::io(&local, e))?;
        let len = file.metadata().map_err(|e| Error::io(&local, e))?.len();
        let mut up = dir.upload(name, len)?;
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            self.check_cancel()?;
            let n = file.read(&mut buf).map_err(|e| Error::io(&local, e))?;
            if n == 0 {
                break;
            }
            up.write(&buf[..n])?;
        }
        up.complete()?;
        summary.files = vec![PathBuf::from(dir.url_of(name))];
        Ok(())
    }

    /// `--part K/N` into an object store: this part's shards, each completed once written and
    /// checked; `--part finish`: every shard checked (size and header), then the other files
    /// and the index.
    pub(super) fn store_part(
        &self,
        dir: &StoreDir,
        target: &Target,
        layout: Layout,
        part: Part,
    ) -> Result<Summary> {
        if layout.index.is_none() {
            return Err(Error::usage(
                "--part splits a sharded output by shard: write a model folder or an index \
                 (*.safetensors.index.json, or a .safetensors with --max-shard-size), not one \
                 file",
            ));
        }
        let folder = matches!(target, Target::Folder(_));
        super::part::run(
            &super::part::StorePrefix { dir },
            self,
            folder,
            &layout,
            part,
        )
    }
}
