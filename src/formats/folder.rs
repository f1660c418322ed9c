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
        .map(|t| TensorEntry {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            file,
            offset: header.data_start + t.begin,
            nbytes: t.end - t.begin,
            strided: None,
            packed: None,
            storage: None,
            module_class: None,
            blocks: None,
            rows: None,
        })
        .collect()
}

/// Opens a `*.safetensors.index.json` and every shard it names.
pub fn open_index(index_path: &Path) -> Result<Catalogue> {
    open_index_at(index_path, None)
}

/// [`open_index`], with the shards at `base/NAME` (URLs) when `base` is given.
fn open_index_at(index_path: &Path, base: Option<&str>) -> Result<Catalogue> {
    let dir = index_path.parent().unwrap_or(Path::new("."));
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
    let weight_map = value
        .get("weight_map")
        .and_then(|w| w.as_object())
        .ok_or_else(|| Error::invalid(index_path, "index has no `weight_map` object"))?;
    // Shards in order of their names (model-00001-of-..., model-00002-of-...).
    let mut shard_names: Vec<String> = Vec::new();
    for (tensor, shard) in weight_map {
        let shard = shard.as_str().ok_or_else(|| {
            Error::invalid(
                index_path,
                format!("`weight_map` entry for `{tensor}` is not a file name"),
            )
        })?;
        if !shard_names.iter().any(|s| s == shard) {
            shard_names.push(shard.to_string());
        }
    }
    shard_names.sort();
    let mut files = Vec::new();
    let mut tensors: Vec<TensorEntry> = Vec::new();
    for (i, shard) in shard_names.iter().enumerate() {
        let rel = safe_relative(index_path, shard)?;
        let path = match base {
            Some(b) => PathBuf::from(format!("{b}/{shard}")),
            None => dir.join(rel),
        };
        if base.is_none() && !path.exists() {
            return Err(Error::invalid(
                index_path,
                format!(
                    "shard `{shard}` named by the index is missing ({})",
                    path.display()
                ),
            ));
        }
        let (_f, sf, header) = read_source(&path, shard.clone())?;
        for t in &header.tensors {
            match weight_map.get(&t.name).and_then(|v| v.as_str()) {
                Some(s) if s == shard => {}
                Some(other) => {
                    return Err(Error::invalid(
                        &path,
                        format!(
                            "tensor `{}` is also in this shard but the index puts it in `{other}`",
                            t.name
                        ),
                    ))
                }
                None => {
                    return Err(Error::invalid(
                        &path,
                        format!("tensor `{}` is in this shard but not in the index", t.name),
                    ))
                }
            }
        }
        tensors.extend(entries(i, &header));
        files.push(sf);
    }
    // Every tensor the index names must be in its shard.
    let mut present: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for t in &tensors {
        present.insert(t.name.as_str());
    }
    if let Some((name, shard)) = weight_map
        .iter()
        .find(|(n, _)| !present.contains(n.as_str()))
    {
        return Err(Error::invalid(
            index_path,
            format!(
                "tensor `{name}` is listed in the index but not found in shard `{}`",
                shard.as_str().unwrap_or("?")
            ),
        ));
    }
    let mut cat = Catalogue::new(
        index_path.to_path_buf(),
        InputKind::ShardedSafetensors,
        files,
        tensors,
    );
    cat.index_metadata = value.get("metadata").and_then(|m| m.as_object()).cloned();
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

/// Opens `pytorch_model.bin.index.json` and its `.bin` shards (torch.save files).
fn open_torch_index(index_path: &Path) -> Result<Catalogue> {
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::invalid(index_path, format!("index is not valid JSON: {e}")))?;
    let weight_map = value
        .get("weight_map")
        .and_then(|w| w.as_object())
        .ok_or_else(|| Error::invalid(index_path, "index has no `weight_map` object"))?;
    let mut shards: Vec<String> = weight_map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    shards.sort();
    shards.dedup();
    let mut cat: Option<Catalogue> = None;
    for (i, shard) in shards.iter().enumerate() {
        let path = dir.join(safe_relative(index_path, shard)?);
        if !path.exists() {
            return Err(Error::invalid(
                index_path,
                format!("shard `{shard}` named by the index is missing"),
            ));
        }
        let mut c = crate::formats::torch::open(&path, None)?;
        c.files[0].name = shard.clone();
        // A set of files has no single pickle to write back.
        c.torch = None;
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
    let mut cat = cat.ok_or_else(|| Error::invalid(index_path, "the index names no shard"))?;
    let present: std::collections::HashSet<&str> =
        cat.tensors.iter().map(|t| t.name.as_str()).collect();
    if let Some(missing) = weight_map.keys().find(|k| !present.contains(k.as_str())) {
        return Err(Error::invalid(
            index_path,
            format!("tensor `{missing}` is listed in the index but not found in its shard"),
        ));
    }
    cat.path = index_path.to_path_buf();
    cat.index_metadata = value.get("metadata").and_then(|m| m.as_object()).cloned();
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

/// Sets `torch_dtype` (and `dtype`, where present) in a config.json to `dtype`, keeping key
/// order. Returns `None` when the file is not a JSON object.
pub(crate) fn update_config(
    path: &Path,
    dtype: Option<DType>,
    dequantized: bool,
    quant_config: Option<&serde_json::Value>,
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
    let mut s = serde_json::to_string_pretty(&serde_json::Value::Object(map)).expect("JSON");
    s.push('\n');
    Ok(Some(s))
}
