//! Writing the output to the local filesystem: every file under a temporary name beside its
//! destination, renamed into place only when everything succeeded (a folder is staged whole
//! and swapped in); missing parent folders are created and removed again on failure.

use std::fs::File;

use super::executor::{FileSink, ZipSink};
use super::part::Destination;
use super::*;

/// Writes the output of a resolved target.
pub(super) fn execute(
    cat: &Catalogue,
    plan: &Plan,
    output: &Output,
    opts: &Options,
    progress: &dyn Progress,
) -> Result<Summary> {
    let sources = Sources::open(cat)?;
    let mut summary = Summary::whole(plan, output.layout.clone(), progress);
    let job = Job::new(cat, plan, &sources, opts, progress).writing(output);
    match &output.target {
        Target::File(p) | Target::Index(p) => job.write_files(p, &mut summary)?,
        Target::Pt(dest) => job.write_pt(dest, &mut summary)?,
        Target::Gguf(dest) => job.write_gguf(dest, &mut summary)?,
        Target::Folder(dest) => job.write_folder(dest, &mut summary)?,
    }
    summary.warnings.extend(job.flushed_warning());
    Ok(summary)
}

/// One part of a split conversion (see [`Part`]).
pub(super) fn convert_part(
    cat: &Catalogue,
    plan: &Plan,
    output: &Output,
    opts: &Options,
    progress: &dyn Progress,
    part: Part,
) -> Result<Summary> {
    let (target, layout) = (&output.target, &output.layout);
    let dir = match target {
        Target::Folder(d) => d.clone(),
        Target::Index(p) | Target::File(p) if layout.index.is_some() => parent_of(p),
        _ => {
            return Err(Error::usage(
                "--part splits a sharded output by shard: write a model folder or an index \
                 (*.safetensors.index.json, or a .safetensors with --max-shard-size), not one \
                 file",
            ))
        }
    };
    // The input is protected as in one run; existing shards are checked one by one below.
    check_target(cat, target, layout, true)?;
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let sources = Sources::open(cat)?;
    let job = Job::new(cat, plan, &sources, opts, progress).writing(output);
    let folder = matches!(target, Target::Folder(_));
    super::part::run(&LocalDir { dir }, &job, folder, layout, part)
}

/// Creates `dir` and its missing ancestors; returns the topmost folder it created.
pub(super) fn make_parents(dir: &Path) -> Result<Option<PathBuf>> {
    let mut top = None;
    let mut p = dir;
    while !p.as_os_str().is_empty() && p.symlink_metadata().is_err() {
        top = Some(p.to_path_buf());
        match p.parent() {
            Some(q) => p = q,
            None => break,
        }
    }
    if top.is_some() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(top)
}

/// Removes the folders [`make_parents`] created, innermost first, if they are still empty.
pub(super) fn remove_created(top: Option<PathBuf>, dir: &Path) {
    let Some(top) = top else { return };
    let mut p = dir.to_path_buf();
    loop {
        if std::fs::remove_dir(&p).is_err() || p == top {
            break;
        }
        match p.parent() {
            Some(q) => p = q.to_path_buf(),
            None => break,
        }
    }
}

/// Moves the finished staging folder to `dest`, replacing what is there (checked by
/// `check_target` against `--force`).
pub(super) fn replace_folder(staging: tempfile::TempDir, dest: &Path) -> Result<()> {
    let staged = staging.keep();
    if dest.symlink_metadata().is_ok() {
        let parent = parent_of(dest);
        let old = tempfile::Builder::new()
            .prefix(".weightcast-old-")
            .tempdir_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        let aside = old.path().join("old");
        std::fs::rename(dest, &aside).map_err(|e| Error::io(dest, e))?;
        if let Err(e) = std::fs::rename(&staged, dest) {
            let _ = std::fs::rename(&aside, dest);
            let _ = std::fs::remove_dir_all(&staged);
            return Err(Error::io(dest, e));
        }
        // `old` removes the previous output when dropped.
        return Ok(());
    }
    std::fs::rename(&staged, dest).map_err(|e| {
        let _ = std::fs::remove_dir_all(&staged);
        Error::io(dest, e)
    })
}

pub(super) fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The temporary file a single-file output is written to, beside `dest`.
pub(super) fn staged_beside(dest: &Path) -> Result<tempfile::NamedTempFile> {
    let name = dest
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    temp_file(&parent_of(dest), &name)
}

pub(super) fn temp_file(dir: &Path, name: &str) -> Result<tempfile::NamedTempFile> {
    // Ordinary permissions (0666 less the umask), not the 0600 of a private temp file.
    tempfile::Builder::new()
        .prefix(&format!(".{name}.weightcast-"))
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)
        .map_err(|e| Error::invalid(dir, format!("cannot create the output here: {e}")))
}

impl Job<'_> {
    /// A `.safetensors` file, or a set of shards and their index, beside each other.
    pub(super) fn write_files(&self, p: &Path, summary: &mut Summary) -> Result<()> {
        let (cat, plan, layout) = (self.cat, self.plan, summary.layout.clone());
        let mut overflow: Vec<(usize, u64)> = Vec::new();
        let dir = parent_of(p);
        let mut staged = Vec::new();
        for f in &layout.files {
            let tmp = temp_file(&dir, &f.name)?;
            overflow.extend(self.write_file(tmp.as_file(), tmp.path(), f)?);
            staged.push((tmp, dir.join(&f.name)));
        }
        summary.overflowed = self.written(self.named(&overflow))?;
        if let Some(index) = &layout.index {
            let mut tmp = temp_file(&dir, index)?;
            let text = index_json(cat, plan, &layout);
            tmp.write_all(text.as_bytes())
                .map_err(|e| Error::io(tmp.path(), e))?;
            self.finish(tmp.as_file(), tmp.path())?;
            staged.push((tmp, dir.join(index)));
        }
        for (tmp, dest) in staged {
            tmp.persist(&dest).map_err(|e| Error::io(&dest, e.error))?;
            summary.files.push(dest);
        }
        Ok(())
    }

    /// A GGUF file from a GGUF input: the input's metadata (file type updated) and every
    /// tensor, retyped as planned; a tensor kept in a block type is copied as its blocks.
    pub(super) fn write_gguf(&self, dest: &Path, summary: &mut Summary) -> Result<()> {
        use crate::formats::gguf::write as gw;
        let (cat, plan) = (self.cat, self.plan);
        if let Some(h) = plan.gguf_hf.as_deref() {
            return self.write_folder_gguf(h, dest, summary);
        }
        let doc = cat.gguf.as_deref().ok_or_else(|| {
            Error::usage(format!(
                "{}: a .gguf output needs a GGUF input",
                cat.path.display()
            ))
        })?;
        let of = &summary.layout.files[0];
        // kept block tensors are copied raw: an entry that reads their blocks as bytes
        let raw: Vec<Option<crate::catalogue::TensorEntry>> = of
            .tensors
            .iter()
            .map(|&i| {
                let p = &plan.tensors()[i];
                let t = &cat.tensors[p.tensor];
                if crate::formats::gguf::copies_blocks(t, p) {
                    t.blocks_as_bytes()
                } else {
                    None
                }
            })
            .collect();
        let outs = self.gguf_tensors(doc, of, &raw)?;
        let ftype = self
            .opts
            .gguf_ftype
            .or_else(|| gw::file_type(plan.target))
            .unwrap_or(0);
        let head = gw::header(
            doc,
            &[
                (
                    "general.quantization_version",
                    crate::catalogue::gguf::Value::U(gw::QNT_VERSION, "uint32"),
                ),
                (
                    "general.file_type",
                    crate::catalogue::gguf::Value::U(ftype, "uint32"),
                ),
            ],
            &outs,
        );
        let pieces: Vec<Piece<'_>> = of
            .tensors
            .iter()
            .zip(&raw)
            .map(|(&i, r)| match r {
                Some(entry) => Ok(Piece {
                    entry,
                    from: crate::DType::U8,
                    to: crate::DType::U8,
                    how: How::Cast,
                    factor: None,
                }),
                None => self.piece(&plan.tensors()[i]),
            })
            .collect::<Result<_>>()?;
        self.stream_gguf(&head, &pieces, dest, summary)
    }

    /// Writes a GGUF file: `head`, then the pieces' data at its offsets; staged beside `dest`
    /// and moved in place once whole.
    fn stream_gguf(
        &self,
        head: &crate::formats::gguf::write::GgufHeader,
        pieces: &[Piece<'_>],
        dest: &Path,
        summary: &mut Summary,
    ) -> Result<()> {
        let of = &summary.layout.files[0];
        let tmp = staged_beside(dest)?;
        let file = tmp.as_file();
        file.set_len(head.len)
            .map_err(|e| Error::io(tmp.path(), e))?;
        (&*file)
            .write_all(&head.bytes)
            .map_err(|e| Error::io(tmp.path(), e))?;
        let mut sink = AlignedSink {
            inner: FileSink::new(file, tmp.path(), self.opts.sync, head.bytes.len() as u64),
            offsets: &head.offsets,
        };
        let counts = self.exec().run(pieces, &mut sink)?;
        self.check_cancel()?;
        self.finish(file, tmp.path())?;
        let counts: Vec<(usize, u64)> = counts
            .into_iter()
            .map(|(k, n)| (of.tensors[k], n))
            .collect();
        summary.overflowed = self.written(self.named(&counts))?;
        tmp.persist(dest).map_err(|e| Error::io(dest, e.error))?;
        summary.files.push(dest.to_path_buf());
        Ok(())
    }

    /// A GGUF file from a Hugging Face folder: the metadata and tensor table the plan holds,
    /// each tensor cast (q/k projections with their rows permuted) as planned.
    fn write_folder_gguf(
        &self,
        h: &crate::formats::gguf::hf::HfGguf,
        dest: &Path,
        summary: &mut Summary,
    ) -> Result<()> {
        use crate::formats::gguf::write::{self as gw, OutTensor};
        let plan = self.plan;
        let of = &summary.layout.files[0];
        let by_source: std::collections::HashMap<usize, &crate::formats::gguf::hf::HfTensor> =
            h.tensors.iter().map(|t| (t.source, t)).collect();
        let mut outs = Vec::with_capacity(of.tensors.len());
        // the q/k projections read with their rows permuted
        let permuted: Vec<Option<crate::catalogue::TensorEntry>> = of
            .tensors
            .iter()
            .map(|&i| {
                let p = &plan.tensors()[i];
                let heads = by_source.get(&p.tensor.0).and_then(|t| t.permute)?;
                Some(
                    self.cat.tensors[p.tensor]
                        .clone()
                        .with_rows(crate::catalogue::Rows { heads, undo: false }),
                )
            })
            .collect();
        let mut pieces = Vec::with_capacity(of.tensors.len());
        for (&i, entry) in of.tensors.iter().zip(&permuted) {
            let p = &plan.tensors()[i];
            let ht = by_source.get(&p.tensor.0).ok_or_else(|| {
                Error::usage(format!(
                    "tensor `{}`: not in the GGUF table",
                    self.cat.tensors[p.tensor].name
                ))
            })?;
            let ggml = match p.ggml {
                Some(g) => g,
                None => gw::ggml_of(p.to).ok_or_else(|| {
                    Error::usage(format!("tensor `{}`: GGUF has no {} type", ht.name, p.to))
                })?,
            };
            outs.push(OutTensor {
                name: ht.name.clone(),
                dims: ht.dims.clone(),
                ggml,
                nbytes: p.bytes_out,
            });
            let mut piece = self.piece(p)?;
            if let Some(e) = entry {
                piece.entry = e;
            }
            pieces.push(piece);
        }
        let doc = crate::catalogue::gguf::GgufDoc {
            version: 3,
            alignment: crate::catalogue::gguf::DEFAULT_ALIGNMENT,
            data_offset: 0,
            metadata: h.metadata.clone(),
            tensors: vec![],
        };
        let head = gw::header(&doc, &[], &outs);
        self.stream_gguf(&head, &pieces, dest, summary)
    }

    /// The output table of a GGUF file: each tensor's GGUF dims, written ggml type and bytes
    /// (`raw[k]`: piece `k` copies its blocks).
    fn gguf_tensors(
        &self,
        doc: &crate::catalogue::gguf::GgufDoc,
        of: &crate::output::OutputFile,
        raw: &[Option<crate::catalogue::TensorEntry>],
    ) -> Result<Vec<crate::formats::gguf::write::OutTensor>> {
        use crate::formats::gguf::write::{self as gw, OutTensor};
        let (cat, plan) = (self.cat, self.plan);
        let by_name: std::collections::HashMap<&str, &crate::catalogue::gguf::GgufTensor> =
            doc.tensors.iter().map(|g| (g.name.as_str(), g)).collect();
        let mut outs = Vec::with_capacity(of.tensors.len());
        for (k, &i) in of.tensors.iter().enumerate() {
            let p = &plan.tensors()[i];
            let t = &cat.tensors[p.tensor];
            let gt = by_name.get(t.name.as_str()).ok_or_else(|| {
                Error::invalid(
                    &cat.path,
                    format!("tensor `{}` is not in the GGUF table", t.name),
                )
            })?;
            let (ggml, nbytes) = match (&raw[k], t.blocks) {
                (Some(r), Some(b)) => (b.ggml, r.nbytes),
                _ if p.ggml.is_some() => (p.ggml.expect("checked"), p.bytes_out),
                _ => (
                    gw::ggml_of(p.to).ok_or_else(|| {
                        Error::usage(format!("tensor `{}`: GGUF has no {} type", t.name, p.to))
                    })?,
                    p.bytes_out,
                ),
            };
            outs.push(OutTensor {
                name: t.name.clone(),
                dims: gt.dims.clone(),
                ggml,
                nbytes,
            });
        }
        Ok(outs)
    }

    /// A `torch.save` checkpoint.
    pub(super) fn write_pt(&self, dest: &Path, summary: &mut Summary) -> Result<()> {
        let cat = self.cat;
        let pt = self.pt.ok_or_else(|| {
            Error::usage("internal: a .pt output is written from the plan plan_output made")
        })?;
        summary.pickle = Some(pt.report.clone());
        let tmp = staged_beside(dest)?;
        let stem = dest
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("archive");
        let mut zip = crate::formats::torch::write::PtZip::new(tmp.as_file(), stem, &pt.data_pkl)?;
        let pieces: Vec<Piece<'_>> = pt
            .records
            .iter()
            .map(|r| {
                let how = match r.dequant {
                    Some((payload, d)) => {
                        How::Dequantize(Arc::new(d.table(cat, self.sources, payload)?))
                    }
                    None => How::Cast,
                };
                Ok(Piece {
                    entry: &r.source,
                    from: r.from,
                    to: r.to,
                    how,
                    factor: r.factor,
                })
            })
            .collect::<Result<_>>()?;
        let mut sink = ZipSink {
            zip: &mut zip,
            records: &pt.records,
        };
        let counts = self.exec().run(&pieces, &mut sink)?;
        zip.finish()?;
        let named: Vec<(String, DType, u64)> = counts
            .iter()
            .map(|&(i, n)| (pt.records[i].label.clone(), pt.records[i].to, n))
            .collect();
        summary.overflowed = self.written(named)?;
        self.finish(tmp.as_file(), tmp.path())?;
        tmp.persist(dest).map_err(|e| Error::io(dest, e.error))?;
        summary.files.push(dest.to_path_buf());
        Ok(())
    }

    /// A model folder: weights, index, every other file, config.json's dtype updated.
    pub(super) fn write_folder(&self, dest: &Path, summary: &mut Summary) -> Result<()> {
        let (cat, plan, layout) = (self.cat, self.plan, summary.layout.clone());
        let mut overflow: Vec<(usize, u64)> = Vec::new();
        let parent = parent_of(dest);
        let name = dest
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let staging = tempfile::Builder::new()
            .prefix(&format!(".{name}.weightcast-"))
            .permissions(std::fs::Permissions::from_mode(0o777))
            .tempdir_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        for f in &layout.files {
            let path = staging.path().join(&f.name);
            let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
            overflow.extend(self.write_file(&file, &path, f)?);
            summary.files.push(dest.join(&f.name));
        }
        summary.overflowed = self.written(self.named(&overflow))?;
        if let Some(index) = &layout.index {
            let path = staging.path().join(index);
            std::fs::write(&path, index_json(cat, plan, &layout))
                .map_err(|e| Error::io(&path, e))?;
            summary.files.push(dest.join(index));
        }
        self.copy_others(staging.path(), summary)?;
        self.check_cancel()?;
        replace_folder(staging, dest)?;
        Ok(())
    }

    /// Copies the input folder's other files into `into` (config.json with its dtype and
    /// quantization updated; ModelOpt's hf_quant_config.json left out of a dequantized
    /// output).
    pub(super) fn copy_others(&self, into: &Path, summary: &mut Summary) -> Result<()> {
        let (cat, plan) = (self.cat, self.plan);
        let dominant = plan.dominant_float(cat);
        let dequantized = plan.quant == QuantPlan::Dequantize;
        let folder = cat.folder.as_ref().expect("folder input");
        for rel in &folder.other_files {
            self.check_cancel()?;
            if dequantized && rel == Path::new("hf_quant_config.json") {
                // ModelOpt's declaration of the scheme: the output is no longer quantized.
                continue;
            }
            let from = folder.dir.join(rel);
            let to = into.join(rel);
            if let Some(p) = to.parent() {
                std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
            }
            // Each file appears whole (a temporary beside it, renamed): `--part finish` writes
            // into the live output folder.
            let dir = parent_of(&to);
            let name = to.file_name().unwrap_or_default().to_string_lossy();
            let tmp = temp_file(&dir, &name)?;
            let text = if rel == Path::new("config.json") {
                crate::formats::folder::update_config(
                    &from,
                    dominant,
                    dequantized,
                    plan.quant_config.as_ref(),
                    &plan.config,
                )?
            } else {
                None
            };
            match text {
                Some(text) => {
                    std::fs::write(tmp.path(), text).map_err(|e| Error::io(&to, e))?;
                    summary.config_dtype = dominant;
                }
                None => {
                    if rel == Path::new("config.json") {
                        summary.warnings.push(format!(
                            "{}: not a JSON object; copied unchanged, its dtype may be stale",
                            from.display()
                        ));
                    }
                    std::fs::copy(&from, tmp.path()).map_err(|e| Error::io(&from, e))?;
                }
            }
            tmp.persist(&to).map_err(|e| Error::io(&to, e.error))?;
            summary.files_copied += 1;
        }
        Ok(())
    }
}

/// A GGUF file's data section: piece `i` starts at `offsets[i]` (zeros pad up to it).
struct AlignedSink<'a, 'f> {
    inner: FileSink<'f>,
    offsets: &'a [u64],
}

impl Sink for AlignedSink<'_, '_> {
    fn begin(&mut self, i: usize) -> Result<()> {
        let pad = self.offsets[i].saturating_sub(self.inner.written);
        if pad > 0 {
            self.inner.write(&vec![0u8; pad as usize])?;
        }
        Ok(())
    }
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.inner.write(bytes)
    }
}

/// A local folder: temporary files renamed into place.
struct LocalDir {
    /// The folder.
    dir: PathBuf,
}

impl LocalDir {
    /// Renames a finished temporary file into place as `name`.
    fn commit(&self, tmp: tempfile::NamedTempFile, name: &str) -> Result<()> {
        let dest = self.dir.join(name);
        tmp.persist(&dest).map_err(|e| Error::io(&dest, e.error))?;
        Ok(())
    }
}

impl Destination for LocalDir {
    fn locate(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn size_of(&self, name: &str) -> Result<Option<u64>> {
        let p = self.dir.join(name);
        Ok(match std::fs::metadata(&p) {
            Ok(m) => Some(m.len()),
            // A link to nothing is still something there.
            Err(_) => p.symlink_metadata().ok().map(|_| 0),
        })
    }
    fn read_head(&self, name: &str, buf: &mut [u8]) -> Result<()> {
        let p = self.dir.join(name);
        File::open(&p)
            .and_then(|h| std::os::unix::fs::FileExt::read_exact_at(&h, buf, 0))
            .map_err(|e| Error::io(&p, e))
    }
    fn put_file(
        &self,
        job: &Job,
        f: &OutputFile,
        check: &mut dyn FnMut(Vec<(usize, u64)>) -> Result<()>,
    ) -> Result<()> {
        let tmp = temp_file(&self.dir, &f.name)?;
        check(job.write_file(tmp.as_file(), tmp.path(), f)?)?;
        self.commit(tmp, &f.name)
    }
    fn put_others(&self, job: &Job, summary: &mut Summary) -> Result<()> {
        job.copy_others(&self.dir, summary)
    }
    fn put_small(&self, job: &Job, name: &str, bytes: &[u8]) -> Result<()> {
        let mut tmp = temp_file(&self.dir, name)?;
        tmp.write_all(bytes).map_err(|e| Error::io(tmp.path(), e))?;
        job.finish(tmp.as_file(), tmp.path())?;
        self.commit(tmp, name)
    }
}
