//! Opening an input by its content: a safetensors file, a sharded set behind an index, or a
//! Hugging Face model folder.

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::catalogue::{Catalogue, FolderInfo, InputKind, SourceFile, TensorEntry};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats::safetensors;

/// Largest index JSON read (a Hub index of a 1T-parameter model is a few MB).
const MAX_INDEX_SIZE: u64 = 64 << 20;

/// Opens one safetensors file, telling other formats apart by content.
pub fn open_file(path: &Path) -> Result<Catalogue> {
    let (_file, sf, header) = read_source(path, file_name(path))?;
    Ok(single_catalogue(path, sf, &header))
}

/// Opens a remote input: a Hugging Face repository (`hf://`), an object store prefix
/// (`s3://BUCKET/PREFIX`) or one safetensors file at a URL (`https://...`, `s3://...`): headers by
/// range requests; tensor bytes are read the same way when converted.
pub(crate) fn open_remote(path: &Path) -> Result<Catalogue> {
    let url = path.to_str().unwrap_or_default();
    if url.starts_with("hf://") {
        let repo = crate::remote::HfRepo::parse(url)?;
        if let Some(snapshot) = repo.cached_snapshot() {
            let mut cat = open_folder(&snapshot)?;
            cat.notes.push(format!(
                "{url}: read from the local Hugging Face cache ({})",
                snapshot.display()
            ));
            return Ok(cat);
        }
        return open_remote_dir(path, RemoteDir::Hf(repo));
    }
    let bare = url.split(['?', '#']).next().unwrap_or(url);
    if crate::remote::store::is_store_url(path) && !bare.ends_with(".safetensors") {
        let dir = crate::remote::store::StoreDir::open(url)?;
        return open_remote_dir(path, RemoteDir::Store(dir));
    }
    let name = bare
        .rsplit('/')
        .next()
        .unwrap_or("model.safetensors")
        .to_string();
    let (sf, header) = remote_source(path, name)?;
    Ok(single_catalogue(path, sf, &header))
}

/// The catalogue of one safetensors file.
fn single_catalogue(path: &Path, sf: SourceFile, header: &safetensors::Header) -> Catalogue {
    Catalogue::new(
        path.to_path_buf(),
        InputKind::Safetensors,
        vec![sf],
        entries(0, header),
    )
}

/// The source entry of a safetensors file (local, or remote when `remote` is given).
fn safetensors_source(
    path: &Path,
    name: String,
    len: u64,
    header: &safetensors::Header,
    remote: Option<std::sync::Arc<dyn crate::remote::RangeRead>>,
) -> SourceFile {
    SourceFile {
        path: path.to_path_buf(),
        name,
        len,
        metadata: header.metadata.clone(),
        big_endian: false,
        remote,
    }
}

/// A remote safetensors file: its source entry and header, by range requests.
fn remote_source(path: &Path, name: String) -> Result<(SourceFile, safetensors::Header)> {
    let url = path.to_str().unwrap_or_default();
    let remote = crate::remote::open(url)?;
    let len = remote.len();
    let header =
        safetensors::read_header_with(path, len, |buf, pos| remote.read_exact_at(buf, pos))?;
    let sf = safetensors_source(path, name, len, &header, Some(remote));
    Ok((sf, header))
}

/// A remote folder: a Hub repository or the objects under an object store prefix.
enum RemoteDir {
    Hf(crate::remote::HfRepo),
    Store(crate::remote::store::StoreDir),
}

impl RemoteDir {
    /// Every file, by its path relative to the folder.
    fn list(&self) -> Result<Vec<String>> {
        match self {
            RemoteDir::Hf(r) => r.list(),
            RemoteDir::Store(d) => Ok(d.list()?.into_iter().map(|(n, _)| n).collect()),
        }
    }

    /// The URL of file `name`.
    fn url_of(&self, name: &str) -> String {
        match self {
            RemoteDir::Hf(r) => format!("{}/{name}", r.resolve_base()),
            RemoteDir::Store(d) => d.url_of(name),
        }
    }

    /// A small file (config, tokenizer, index), whole.
    fn get_small(&self, name: &str) -> Result<Vec<u8>> {
        match self {
            RemoteDir::Hf(r) => r.get_small(name),
            RemoteDir::Store(d) => d.get(name, SMALL_FILE_LIMIT),
        }
    }

    /// A file streamed into `out`.
    fn download(&self, name: &str, out: &mut File) -> Result<u64> {
        match self {
            RemoteDir::Hf(r) => r.download(name, out),
            RemoteDir::Store(d) => d.download(name, out),
        }
    }
}

/// Files other than weights fetched whole from a remote folder are at most this large.
const SMALL_FILE_LIMIT: u64 = 512 << 20;

/// Opens a remote folder (`hf://ORG/NAME[@REVISION]` or an object store prefix): its small
/// files fetched into a temporary folder, its safetensors weights (one file or an index and
/// its shards) read by range requests. A folder whose weights are PyTorch archives
/// (`pytorch_model.bin` or its index and shards) is fetched whole into the temporary folder
/// instead, since the archive reader needs the zip directory at the end of each file; a note
/// says so.
fn open_remote_dir(path: &Path, dir: RemoteDir) -> Result<Catalogue> {
    let mut files = dir.list()?;
    files.sort();
    let tmp = tempfile::Builder::new()
        .prefix(".weightcast-remote-")
        .tempdir()
        .map_err(|e| Error::invalid(path, format!("cannot create a temporary folder: {e}")))?;
    let top: Vec<&String> = files.iter().filter(|f| !f.contains('/')).collect();
    let weights = which_weights(&top).map_err(|e| Error::invalid(path, e))?;
    let is_torch = |n: &str| [".bin", ".pt", ".pth"].iter().any(|e| n.ends_with(e));
    let torch = matches!(weights, Weights::TorchIndex(_) | Weights::Torch(_));
    let is_weights = |n: &str| {
        [
            ".safetensors",
            ".bin",
            ".pt",
            ".pth",
            ".ckpt",
            ".h5",
            ".msgpack",
            ".onnx",
            ".gguf",
        ]
        .iter()
        .any(|e| n.ends_with(e))
            || n.ends_with(".bin.index.json")
    };
    let mut fetched = 0u64;
    for f in &files {
        let torch_file = torch && (is_torch(f) || f.ends_with(".bin.index.json"));
        if is_weights(f) && !torch_file {
            continue;
        }
        let rel = safe_relative(path, f)?;
        let dest = tmp.path().join(rel);
        if let Some(d) = dest.parent() {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        if torch_file {
            let mut out = File::create(&dest).map_err(|e| Error::io(&dest, e))?;
            fetched += dir.download(f, &mut out)?;
        } else {
            std::fs::write(&dest, dir.get_small(f)?).map_err(|e| Error::io(&dest, e))?;
        }
    }
    let keep = Some(std::sync::Arc::new(tmp));
    let tmp_dir = keep.as_ref().expect("kept").path().to_path_buf();
    if torch {
        let mut cat = open_folder(&tmp_dir)?;
        cat.path = path.to_path_buf();
        if let Some(f) = cat.folder.as_mut() {
            f.keep = keep;
        }
        cat.notes.push(format!(
            "{}: PyTorch weights are read from a local copy ({fetched} bytes fetched into a \
             temporary folder, removed afterwards); safetensors weights are read by ranges",
            path.display()
        ));
        return Ok(cat);
    }
    let (cat, index_name) = match weights {
        Weights::SafetensorsIndex(i) => {
            let base = dir.url_of("");
            let base = base.trim_end_matches('/');
            (open_index_at(&tmp_dir.join(&i), Some(base))?, Some(i))
        }
        Weights::Safetensors(s) => {
            let (sf, header) = remote_source(&PathBuf::from(dir.url_of(&s)), s.clone())?;
            (single_catalogue(path, sf, &header), None)
        }
        Weights::TorchIndex(_) | Weights::Torch(_) => unreachable!("opened from the copy above"),
    };
    as_folder(cat, path, &tmp_dir, index_name, keep)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn read_source(
    path: &Path,
    name: String,
) -> Result<(Option<File>, SourceFile, safetensors::Header)> {
    if crate::remote::is_url(path) {
        let (sf, header) = remote_source(path, name)?;
        return Ok((None, sf, header));
    }
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    sniff_other_formats(path, &file, len)?;
    let header = safetensors::read_header(path, &file, len)?;
    let sf = safetensors_source(path, name, len, &header, None);
    Ok((Some(file), sf, header))
}

/// Gives a clear message for files that are weights of another format (a file that is only a
/// damaged safetensors file gets the header reader's precise error instead).
fn sniff_other_formats(path: &Path, file: &File, len: u64) -> Result<()> {
    match crate::formats::sniff::foreign(path, file, len)? {
        Some(k) => Err(Error::invalid(
            path,
            format!("is {}, not a safetensors file", k.describe()),
        )),
        None => Ok(()),
    }
}

fn entries(file: usize, header: &safetensors::Header) -> Vec<TensorEntry> {
    header
        .tensors
        .iter()
        .map(|t| {
            TensorEntry::new(
                t.name.clone(),
                t.dtype,
                t.shape.clone(),
                file,
                header.data_start + t.begin,
                t.end - t.begin,
            )
        })
        .collect()
}

/// Opens a `*.safetensors.index.json` and every shard it names.
pub fn open_index(index_path: &Path) -> Result<Catalogue> {
    open_index_at(index_path, None)
}

/// [`open_index`], with the shards at `base/NAME` (URLs) when `base` is given.
fn open_index_at(index_path: &Path, base: Option<&str>) -> Result<Catalogue> {
    open_sharded(index_path, ShardFormat::Safetensors { base })
}

/// Opens `pytorch_model.bin.index.json` and its `.bin` shards (torch.save files).
fn open_torch_index(index_path: &Path) -> Result<Catalogue> {
    open_sharded(index_path, ShardFormat::Torch)
}

/// An index JSON (`*.safetensors.index.json`, `pytorch_model.bin.index.json`): which shard
/// holds each tensor. [`read_index`] reads it, the same for every format of shards.
struct Index {
    /// The index file (what its errors name).
    path: PathBuf,
    /// Tensor name -> shard name (every value a string).
    weight_map: serde_json::Map<String, serde_json::Value>,
    /// The shards, each with its path relative to the index's folder, in order of their names
    /// (model-00001-of-..., model-00002-of-...).
    shards: Vec<(String, PathBuf)>,
    /// The index's `metadata` object.
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Reads the index JSON at `index_path`: at most [`MAX_INDEX_SIZE`] bytes, not a Git LFS
/// pointer, a `weight_map` object of file names that stay inside the index's folder.
fn read_index(index_path: &Path) -> Result<Index> {
    let file = File::open(index_path).map_err(|e| Error::io(index_path, e))?;
    let mut text = String::new();
    file.take(MAX_INDEX_SIZE + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::invalid(index_path, format!("cannot read index: {e}")))?;
    if text.len() as u64 > MAX_INDEX_SIZE {
        return Err(Error::invalid(index_path, "index is larger than 64 MiB"));
    }
    if safetensors::is_lfs_pointer(text.as_bytes()) {
        return Err(Error::invalid(
            index_path,
            "is a Git LFS pointer file: fetch the real file (`git lfs pull`) first",
        ));
    }
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::invalid(index_path, format!("index is not valid JSON: {e}")))?;
    let metadata = value.get("metadata").and_then(|m| m.as_object()).cloned();
    let Some(serde_json::Value::Object(weight_map)) = value.get("weight_map").cloned() else {
        return Err(Error::invalid(
            index_path,
            "index has no `weight_map` object",
        ));
    };
    let mut names: Vec<&str> = Vec::new();
    for (tensor, shard) in &weight_map {
        names.push(shard.as_str().ok_or_else(|| {
            Error::invalid(
                index_path,
                format!("`weight_map` entry for `{tensor}` is not a file name"),
            )
        })?);
    }
    names.sort_unstable();
    names.dedup();
    let shards = names
        .into_iter()
        .map(|n| Ok((n.to_string(), safe_relative(index_path, n)?)))
        .collect::<Result<_>>()?;
    Ok(Index {
        path: index_path.to_path_buf(),
        weight_map,
        shards,
        metadata,
    })
}

impl Index {
    /// Every tensor the index names is among `tensors` (read from its shards).
    fn check_complete(&self, tensors: &[TensorEntry]) -> Result<()> {
        let present: std::collections::HashSet<&str> =
            tensors.iter().map(|t| t.name.as_str()).collect();
        match self
            .weight_map
            .iter()
            .find(|(n, _)| !present.contains(n.as_str()))
        {
            Some((name, shard)) => Err(Error::invalid(
                &self.path,
                format!(
                    "tensor `{name}` is listed in the index but not found in shard `{}`",
                    shard.as_str().unwrap_or("?")
                ),
            )),
            None => Ok(()),
        }
    }

    /// Every tensor of shard `shard` (at `path`) is one the index puts there.
    fn check_shard<'a>(
        &self,
        shard: &str,
        path: &Path,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<()> {
        for name in names {
            match self.weight_map.get(name).and_then(|v| v.as_str()) {
                Some(s) if s == shard => {}
                Some(other) => {
                    return Err(Error::invalid(
                        path,
                        format!(
                            "tensor `{name}` is also in this shard but the index puts it in \
                             `{other}`"
                        ),
                    ))
                }
                None => {
                    return Err(Error::invalid(
                        path,
                        format!("tensor `{name}` is in this shard but not in the index"),
                    ))
                }
            }
        }
        Ok(())
    }
}

/// What the shards behind an index are: the one part of reading a sharded input that depends
/// on the format.
#[derive(Debug, Clone, Copy)]
enum ShardFormat<'a> {
    /// safetensors files, at `base/NAME` (URLs) when `base` is given.
    Safetensors { base: Option<&'a str> },
    /// torch.save files.
    Torch,
}

impl ShardFormat<'_> {
    /// Where shard `shard` (at `rel` in the index's folder) is; a local one must exist.
    fn shard_path(self, index: &Index, shard: &str, rel: &Path) -> Result<PathBuf> {
        if let ShardFormat::Safetensors { base: Some(b) } = self {
            return Ok(PathBuf::from(format!("{b}/{shard}")));
        }
        let path = index.path.parent().unwrap_or(Path::new(".")).join(rel);
        if !path.exists() {
            return Err(Error::invalid(
                &index.path,
                format!(
                    "shard `{shard}` named by the index is missing ({})",
                    path.display()
                ),
            ));
        }
        Ok(path)
    }

    /// The catalogue of shard `shard` alone (its file named `shard`).
    fn open_shard(self, index: &Index, shard: &str, path: &Path) -> Result<Catalogue> {
        match self {
            ShardFormat::Safetensors { .. } => {
                let (_f, sf, header) = read_source(path, shard.to_string())?;
                index.check_shard(shard, path, header.tensors.iter().map(|t| t.name.as_str()))?;
                Ok(single_catalogue(path, sf, &header))
            }
            ShardFormat::Torch => {
                let mut c = crate::formats::torch::open(path, None)?;
                c.files[0].name = shard.to_string();
                // A set of files has no single pickle to write back.
                c.torch = None;
                Ok(c)
            }
        }
    }
}

/// Opens the index at `index_path` and every shard it names, in order, as one catalogue: file
/// `i` is the `i`-th shard, its storages (PyTorch) numbered after those of the shards before.
fn open_sharded(index_path: &Path, format: ShardFormat<'_>) -> Result<Catalogue> {
    let index = read_index(index_path)?;
    let mut cat: Option<Catalogue> = None;
    for (i, (shard, rel)) in index.shards.iter().enumerate() {
        let path = format.shard_path(&index, shard, rel)?;
        let mut c = format.open_shard(&index, shard, &path)?;
        let base = cat.as_ref().map_or(0, |all| all.storages.len());
        for t in &mut c.tensors {
            t.file = i;
            t.storage = t.storage.map(|s| s + base);
        }
        for s in &mut c.storages {
            s.file = i;
        }
        match &mut cat {
            None => cat = Some(c),
            Some(all) => {
                all.files.extend(c.files);
                all.tensors.extend(c.tensors);
                all.storages.extend(c.storages);
                all.notes.extend(c.notes);
                all.globals.extend(c.globals);
            }
        }
    }
    let mut cat = match (cat, format) {
        (Some(c), _) => c,
        (None, ShardFormat::Torch) => {
            return Err(Error::invalid(index_path, "the index names no shard"))
        }
        (None, ShardFormat::Safetensors { .. }) => Catalogue::new(
            index_path.to_path_buf(),
            InputKind::ShardedSafetensors,
            vec![],
            vec![],
        ),
    };
    index.check_complete(&cat.tensors)?;
    if let ShardFormat::Safetensors { .. } = format {
        cat.kind = InputKind::ShardedSafetensors;
    }
    cat.path = index_path.to_path_buf();
    cat.index_metadata = index.metadata;
    Ok(cat)
}

/// A shard name must stay inside the index's folder.
fn safe_relative(index_path: &Path, name: &str) -> Result<PathBuf> {
    let p = Path::new(name);
    if name.is_empty() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(Error::invalid(
            index_path,
            format!("shard name `{name}` is not a plain file name in the index's folder"),
        ));
    }
    Ok(p.to_path_buf())
}

/// Opens a Hugging Face model folder.
pub fn open_folder(dir: &Path) -> Result<Catalogue> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        // Follow symbolic links: a Hugging Face cache snapshot links every file to a blob.
        if std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file()) {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    let refs: Vec<&String> = names.iter().collect();
    let (cat, index_name) = match which_weights(&refs).map_err(|e| Error::invalid(dir, e))? {
        Weights::SafetensorsIndex(i) => (open_index(&dir.join(&i))?, Some(i)),
        Weights::Safetensors(f) => (open_file(&dir.join(f))?, None),
        Weights::TorchIndex(i) => (open_torch_index(&dir.join(&i))?, Some(i)),
        Weights::Torch(f) => {
            let mut c = crate::formats::torch::open(&dir.join(&f), None)?;
            c.files[0].name = f;
            (c, None)
        }
    };
    as_folder(cat, dir, dir, index_name, None)
}

/// Makes the catalogue of a folder's weights the folder's: shown as `path`, its other files
/// (everything in `dir` but the weights and their index) listed for the output.
fn as_folder(
    mut cat: Catalogue,
    path: &Path,
    dir: &Path,
    index_name: Option<String>,
    keep: Option<std::sync::Arc<tempfile::TempDir>>,
) -> Result<Catalogue> {
    let weight_names: std::collections::HashSet<&str> = cat
        .files
        .iter()
        .map(|f| f.name.as_str())
        .chain(index_name.as_deref())
        .collect();
    let mut other_files = Vec::new();
    collect_other_files(dir, Path::new(""), &weight_names, &mut other_files)?;
    cat.path = path.to_path_buf();
    cat.kind = InputKind::Folder;
    cat.folder = Some(FolderInfo {
        dir: dir.to_path_buf(),
        other_files,
        index_name,
        keep,
    });
    Ok(cat)
}

/// Which files of a model folder are its weights, from the names of its top-level files: a
/// safetensors index (`model.safetensors.index.json` preferred), else one safetensors file
/// (`model.safetensors`), else (no safetensors file) a PyTorch index or one PyTorch file
/// (`pytorch_model.bin`). The one rule for local and remote folders.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Weights {
    /// A safetensors index and its shards.
    SafetensorsIndex(String),
    /// One safetensors file.
    Safetensors(String),
    /// `pytorch_model.bin.index.json` and its `.bin` shards.
    TorchIndex(String),
    /// One torch.save file.
    Torch(String),
}

/// The weights among `names`, or why there are none (or several and no index).
fn which_weights(names: &[&String]) -> std::result::Result<Weights, String> {
    let with = |suffix: &str| -> Vec<&String> {
        names
            .iter()
            .copied()
            .filter(|n| n.ends_with(suffix))
            .collect()
    };
    let list = |v: &[&String]| v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
    let singles = with(".safetensors");
    if let Some(i) = pick(
        &with(".safetensors.index.json"),
        "model.safetensors.index.json",
    ) {
        return Ok(Weights::SafetensorsIndex(i.clone()));
    }
    if let Some(s) = pick(&singles, "model.safetensors") {
        return Ok(Weights::Safetensors(s.clone()));
    }
    if !singles.is_empty() {
        return Err(format!(
            "several safetensors files ({}) and no index: pass one file or add an index",
            list(&singles)
        ));
    }
    let torch: Vec<&String> = names
        .iter()
        .copied()
        .filter(|n| n.ends_with(".bin") || n.ends_with(".pt") || n.ends_with(".pth"))
        .collect();
    if let Some(i) = pick(&with(".bin.index.json"), "pytorch_model.bin.index.json") {
        return Ok(Weights::TorchIndex(i.clone()));
    }
    if let Some(t) = pick(&torch, "pytorch_model.bin") {
        return Ok(Weights::Torch(t.clone()));
    }
    Err(if torch.is_empty() {
        "no weights here (no .safetensors, no index, no pytorch_model.bin)".to_string()
    } else {
        format!(
            "several PyTorch files ({}) and no index: pass one file",
            list(&torch)
        )
    })
}

fn pick<'a>(candidates: &[&'a String], preferred: &str) -> Option<&'a String> {
    candidates
        .iter()
        .find(|n| n.as_str() == preferred)
        .or(if candidates.len() == 1 {
            candidates.first()
        } else {
            None
        })
        .copied()
}

/// Every file below `dir` except the weights, relative to the folder, skipping hidden entries
/// (`.git`, `.cache`).
fn collect_other_files(
    root: &Path,
    rel: &Path,
    weights: &std::collections::HashSet<&str>,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    let dir = root.join(rel);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| Error::io(&dir, e))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::io(&dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let ft = std::fs::metadata(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
        let child = rel.join(&name);
        if ft.is_dir() {
            collect_other_files(root, &child, weights, out)?;
        } else if !(rel.as_os_str().is_empty() && weights.contains(name.as_str())) {
            out.push(child);
        }
    }
    Ok(())
}

/// Sets `torch_dtype` (and `dtype`, where present) in a config.json to `dtype`, then the keys
/// of a rules file's `[config]` (`edits`), keeping key order. Returns `None` when the file is
/// not a JSON object.
pub(crate) fn update_config(
    path: &Path,
    dtype: Option<DType>,
    dequantized: bool,
    quant_config: Option<&serde_json::Value>,
    edits: &[crate::rules::ConfigEdit],
) -> Result<Option<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let Ok(serde_json::Value::Object(mut map)) = serde_json::from_str::<serde_json::Value>(&text)
    else {
        return Ok(None);
    };
    if dequantized {
        map.remove("quantization_config");
    }
    if let Some(q) = quant_config {
        map.insert("quantization_config".into(), q.clone());
    }
    if let Some(d) = dtype {
        let v = serde_json::Value::String(d.torch_name().to_string());
        let has_dtype = map.contains_key("dtype");
        if map.contains_key("torch_dtype") || !has_dtype {
            map.insert("torch_dtype".into(), v.clone());
        }
        if has_dtype {
            map.insert("dtype".into(), v);
        }
    }
    // a rules file's [config]: existing keys (checked before anything is written), each
    // keeping its place
    for e in edits {
        if let Some(slot) = map.get_mut(&e.key) {
            *slot = e.new.clone();
        }
    }
    let mut s = serde_json::to_string_pretty(&serde_json::Value::Object(map)).expect("JSON");
    s.push('\n');
    Ok(Some(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens `dir`, which must fail; returns the message.
    fn refused(dir: &Path) -> String {
        match crate::formats::open(dir) {
            Ok(_) => panic!("{} opened", dir.display()),
            Err(e) => e.to_string(),
        }
    }

    /// Both indexes go through one reader: an index over the size cap or a Git LFS pointer is
    /// refused in one line naming it, before any shard is opened.
    #[test]
    fn every_index_refuses_an_oversized_or_lfs_pointer_index() {
        for name in [
            "pytorch_model.bin.index.json",
            "model.safetensors.index.json",
        ] {
            let d = tempfile::tempdir().unwrap();
            let idx = d.path().join(name);
            let f = File::create(&idx).unwrap();
            f.set_len(MAX_INDEX_SIZE + 1).unwrap();
            let e = refused(d.path());
            assert_eq!(
                e,
                format!("{}: index is larger than 64 MiB", idx.display()),
                "{name}"
            );
            std::fs::write(
                &idx,
                "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 90868\n",
            )
            .unwrap();
            let e = refused(d.path());
            assert!(!e.contains('\n'), "{e}");
            assert!(e.starts_with(&format!("{}: ", idx.display())), "{e}");
            assert!(e.contains("Git LFS pointer"), "{e}");
        }
    }

    /// Two torch.save shards behind a `pytorch_model.bin.index.json` read as one catalogue: file
    /// `i` is shard `i`, the second shard's storages numbered after the first's, every tensor's
    /// bytes those of its shard.
    #[test]
    fn torch_index_reads_its_shards_as_one_catalogue() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch");
        let d = tempfile::tempdir().unwrap();
        let names = [
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin",
        ];
        let mut shards = Vec::new();
        let mut weight_map = serde_json::Map::new();
        for (fixture, name) in ["views.pt", "all_dtypes.pt"].iter().zip(names) {
            std::fs::copy(fixtures.join(fixture), d.path().join(name)).unwrap();
            let c = crate::formats::open(&d.path().join(name)).unwrap();
            for t in &c.tensors {
                weight_map.insert(t.name.clone(), name.into());
            }
            shards.push(c);
        }
        assert!(
            !shards[0].storages.is_empty(),
            "the second shard's storages are renumbered"
        );
        let index = serde_json::json!({"metadata": {"total_size": 1}, "weight_map": weight_map});
        std::fs::write(
            d.path().join("pytorch_model.bin.index.json"),
            index.to_string(),
        )
        .unwrap();
        let cat = crate::formats::open(d.path()).unwrap();
        assert_eq!(cat.kind, InputKind::Folder);
        assert_eq!(
            cat.files
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>(),
            names
        );
        assert_eq!(cat.index_metadata, index["metadata"].as_object().cloned());
        let all = crate::source::Sources::open(&cat).unwrap();
        let mut got = cat.tensors.iter();
        let mut storages = 0;
        for (i, c) in shards.iter().enumerate() {
            let one = crate::source::Sources::open(c).unwrap();
            for t in &c.tensors {
                let g = got.next().unwrap();
                assert_eq!((g.name.as_str(), g.file), (t.name.as_str(), i));
                assert_eq!(g.storage, t.storage.map(|s| s + storages), "{}", t.name);
                let (mut a, mut b) = (vec![0u8; t.nbytes as usize], vec![0u8; t.nbytes as usize]);
                all.read(g, 0, &mut a).unwrap();
                one.read(t, 0, &mut b).unwrap();
                assert_eq!(a, b, "{}", t.name);
            }
            storages += c.storages.len();
        }
        assert!(got.next().is_none());
        assert_eq!(cat.storages.len(), storages);
    }

    /// The torch index parses its `weight_map` as the safetensors one does.
    #[test]
    fn torch_index_refuses_a_shard_that_is_not_a_file_name() {
        let d = tempfile::tempdir().unwrap();
        let idx = d.path().join("pytorch_model.bin.index.json");
        for (map, want) in [
            (
                r#"{"a":3}"#,
                "`weight_map` entry for `a` is not a file name",
            ),
            (
                r#"{"a":"../pytorch_model.bin"}"#,
                "shard name `../pytorch_model.bin` is not a plain file name",
            ),
            (
                r#"{"a":"pytorch_model-00001-of-00001.bin"}"#,
                "shard `pytorch_model-00001-of-00001.bin` named by the index is missing",
            ),
        ] {
            std::fs::write(&idx, format!(r#"{{"weight_map":{map}}}"#)).unwrap();
            let e = refused(d.path());
            assert!(e.starts_with(&format!("{}: ", idx.display())), "{e}");
            assert!(e.contains(want), "{e}");
        }
    }
}
