//! Where the output goes: the kind of target, how tensors are split into files (Hub sharding),
//! the index JSON, and the checks that protect the input and existing files.

use std::path::{Path, PathBuf};

use crate::catalogue::{Catalogue, InputKind};
use crate::error::{Error, Result};
use crate::plan::Plan;

/// The shape of the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One `.safetensors` file (or, with a shard size, `NAME-0000i-of-0000N.safetensors` beside it
    /// plus `NAME.safetensors.index.json`).
    File(PathBuf),
    /// A `*.safetensors.index.json` and its shards, in the index's folder.
    Index(PathBuf),
    /// A model folder: weights plus every other file of the input folder.
    Folder(PathBuf),
    /// A `torch.save` checkpoint (from a PyTorch input): everything in the input kept.
    Pt(PathBuf),
    /// A GGUF file (from a GGUF input): its metadata and every tensor, retyped as planned.
    Gguf(PathBuf),
}

/// The outputs weightcast writes, as help names them; any other extension is refused.
pub const OUTPUT_FORMATS: &[(&str, &str)] = &[
    ("FILE.safetensors", "one safetensors file"),
    (
        "NAME.safetensors.index.json",
        "an index and its shards beside it (Hub layout)",
    ),
    (
        "FILE.pt, .pth, .bin",
        "a torch.save checkpoint (--json says whether weights_only=True loads it)",
    ),
    (
        "FOLDER",
        "a model folder (for a folder input: config, tokenizer and the other files too; for \
         a llama, qwen2 or qwen3 GGUF input: Hugging Face names, config and tokenizer)",
    ),
    (
        "FILE.gguf",
        "llama.cpp's GGUF (--to f32|f16|bf16|q8_0|auto): from a GGUF input, retyped as its \
         quantizer does; from a Llama, Mistral, Qwen2, Qwen3 or BERT folder, the file its \
         convert_hf_to_gguf.py writes",
    ),
];

/// Extensions of model formats weightcast reads or knows but does not write: an output named
/// so is refused rather than written as a folder of that name.
const FOREIGN_EXTENSIONS: &[&str] = &[
    "gguf", "ggml", "onnx", "h5", "hdf5", "keras", "msgpack", "npz", "npy", "ckpt", "tflite",
    "mlmodel", "engine", "pkl", "pickle", "joblib", "json", "zip", "tar", "gz", "nemo",
];

/// What an output path names by its name alone: the one place an output's name is read
/// (the target, the request's checks and the front ends all ask this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Named {
    /// `NAME.safetensors.index.json`
    Index,
    /// `FILE.safetensors`
    Safetensors,
    /// `FILE.pt`, `.pth`, `.bin`: a torch.save checkpoint
    Pt,
    /// `FILE.gguf` (any case)
    Gguf,
    /// an extension of a format weightcast reads or knows but does not write
    Foreign,
    /// anything else: a folder
    Folder,
}

impl Named {
    /// Classifies `out` by its name.
    pub fn of(out: &Path) -> Named {
        let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let ext = out
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        if name.ends_with(".safetensors.index.json") {
            Named::Index
        } else if name.ends_with(".safetensors") {
            Named::Safetensors
        } else if [".pt", ".pth", ".bin"].iter().any(|e| name.ends_with(e)) {
            Named::Pt
        } else if ext.as_deref() == Some("gguf") {
            Named::Gguf
        } else if ext.is_some_and(|e| FOREIGN_EXTENSIONS.contains(&e.as_str())) {
            Named::Foreign
        } else {
            Named::Folder
        }
    }
}

/// Whether a local output path exists already (a run with `force` replaces it).
pub fn output_exists(out: &Path) -> bool {
    !crate::remote::is_url(out) && out.symlink_metadata().is_ok()
}

impl Target {
    /// Chooses the target from the output path and the input kind.
    pub fn resolve(cat: &Catalogue, out: &Path) -> Result<Target> {
        let path = out.to_path_buf();
        match Named::of(out) {
            Named::Index => Ok(Target::Index(path)),
            Named::Safetensors => Ok(Target::File(path)),
            Named::Pt => Ok(Target::Pt(path)),
            Named::Gguf => Ok(Target::Gguf(path)),
            Named::Foreign => Err(Error::usage(format!(
                "{}: weightcast does not write .{} files; outputs are {}",
                out.display(),
                out.extension().and_then(|e| e.to_str()).unwrap_or(""),
                OUTPUT_NAMES
            ))),
            // a folder, or a GGUF file read as the Hugging Face checkpoint it came from
            Named::Folder if cat.kind == InputKind::Folder || cat.folder.is_some() => {
                Ok(Target::Folder(path))
            }
            Named::Folder => Err(Error::usage(format!(
                "{}: the output must be {} (a folder output needs a folder input)",
                out.display(),
                OUTPUT_NAMES
            ))),
        }
    }

    /// The path the user named.
    pub fn path(&self) -> &Path {
        match self {
            Target::File(p)
            | Target::Index(p)
            | Target::Folder(p)
            | Target::Pt(p)
            | Target::Gguf(p) => p,
        }
    }
}

/// One output weights file and the plan entries it holds, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    /// File name (in the output folder).
    pub name: String,
    /// Indices into the plan's tensors.
    pub tensors: Vec<usize>,
    /// Tensor bytes it holds.
    pub bytes: u64,
}

/// The files to write.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    /// Weights files.
    pub files: Vec<OutputFile>,
    /// The index file name, when one is written.
    pub index: Option<String>,
}

/// The output formats of [`OUTPUT_FORMATS`] in one phrase, for messages.
const OUTPUT_NAMES: &str = ".safetensors, .safetensors.index.json, .pt/.pth/.bin, a folder, \
                            or .gguf (from a GGUF file or a model folder)";

/// Parses a shard size the way transformers does: `5GB` = 5·10⁹ bytes, `5GiB` = 5·2³⁰,
/// `500MB`, `100KB`, or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| {
        Error::usage(format!(
            "size `{s}`: expected a number such as 5GB or 500MiB"
        ))
    })?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        "TIB" => 1024f64.powi(4),
        u => {
            return Err(Error::usage(format!(
                "size `{s}`: unknown unit `{u}` (use KB, MB, GB, KiB, MiB, GiB)"
            )))
        }
    };
    let bytes = (num * mult).round();
    if !(1.0..1.8e19).contains(&bytes) {
        return Err(Error::usage(format!(
            "size `{s}` must be at least one byte"
        )));
    }
    Ok(bytes as u64)
}

/// The stem shards are named after: `model` for `model.safetensors`,
/// `model.safetensors.index.json` or a folder.
fn stem(target: &Target) -> String {
    let name = target
        .path()
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model");
    match target {
        Target::File(_) => name.trim_end_matches(".safetensors").to_string(),
        Target::Index(_) => name.trim_end_matches(".safetensors.index.json").to_string(),
        Target::Folder(_) | Target::Pt(_) | Target::Gguf(_) => "model".to_string(),
    }
}

/// Splits the planned tensors into output files.
///
/// With `max_shard`, tensors are packed greedily in order as the Hub does (a tensor larger than
/// the limit gets a shard of its own) into `STEM-0000i-of-0000N.safetensors`; a result of one
/// shard is written as a single `STEM.safetensors` unless an index was asked for. Without it,
/// a single-file target gets one file and the other targets keep the input's file split.
pub fn layout(cat: &Catalogue, plan: &Plan, target: &Target, max_shard: Option<u64>) -> Layout {
    let stem = stem(target);
    let shard_name = |i: usize, n: usize| format!("{stem}-{:05}-of-{:05}.safetensors", i + 1, n);
    let index_name = format!("{stem}.safetensors.index.json");
    let all: Vec<usize> = (0..plan.tensors().len()).collect();
    let bytes_of = |ids: &[usize]| {
        ids.iter()
            .map(|&i| plan.tensors()[i].bytes_out)
            .sum::<u64>()
    };

    if matches!(target, Target::Pt(_)) {
        return Layout {
            files: vec![],
            index: None,
        };
    }
    if let Target::Gguf(p) = target {
        return gguf_layout(cat, plan, p);
    }
    let groups: Vec<Vec<usize>> = if let Some(max) = max_shard {
        let mut groups: Vec<Vec<usize>> = vec![];
        let mut size = 0u64;
        for &i in &all {
            let b = plan.tensors()[i].bytes_out;
            if groups.is_empty() || (size + b > max && !groups.last().is_some_and(|g| g.is_empty()))
            {
                groups.push(vec![]);
                size = 0;
            }
            groups.last_mut().expect("pushed").push(i);
            size += b;
        }
        if groups.is_empty() {
            groups.push(vec![]);
        }
        groups
    } else {
        match target {
            Target::File(_) | Target::Pt(_) | Target::Gguf(_) => vec![all],
            Target::Index(_) | Target::Folder(_) => {
                let mut groups = vec![vec![]; cat.files.len().max(1)];
                for (i, p) in plan.tensors().iter().enumerate() {
                    groups[cat.tensors[p.tensor].file].push(i);
                }
                groups
            }
        }
    };

    // Within a file, wider elements first (stable, so a single-dtype file keeps the input's
    // order): the data starts 8-byte aligned, so every tensor then starts at a multiple of its
    // element size, as the reference crate's `serialize` arranges. In input order, an f64
    // tensor cast to bf16 (18 bytes) would leave the int32 tensor after it misaligned.
    let mut groups = groups;
    for g in &mut groups {
        g.sort_by_key(|&i| std::cmp::Reverse(plan.tensors()[i].to.bitsize()));
    }
    let n = groups.len();
    // Without a shard size, a sharded input keeps its file names.
    let keep_input_names = max_shard.is_none()
        && !matches!(target, Target::File(_))
        && cat.kind != InputKind::Safetensors;
    let input_index = cat.folder.as_ref().and_then(|f| f.index_name.clone());
    let want_index = match target {
        Target::Index(_) => true,
        Target::File(_) | Target::Pt(_) => n > 1,
        Target::Gguf(_) => false,
        Target::Folder(_) if keep_input_names => input_index.is_some(),
        Target::Folder(_) => n > 1,
    };
    let files = groups
        .into_iter()
        .enumerate()
        .map(|(i, ids)| {
            let name = match target {
                _ if keep_input_names => safetensors_name(&cat.files[i].name),
                _ if want_index => shard_name(i, n),
                Target::File(p) => p
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                _ => format!("{stem}.safetensors"),
            };
            OutputFile {
                bytes: bytes_of(&ids),
                name,
                tensors: ids,
            }
        })
        .collect();
    let index = want_index.then(|| match target {
        Target::Index(p) => p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned(),
        Target::Folder(_) if keep_input_names => input_index
            .map(|n| safetensors_name(&n))
            .unwrap_or(index_name),
        _ => index_name,
    });
    Layout { files, index }
}

/// The safetensors name of an input weights file, as the Hub's convert script names them:
/// `pytorch_model-00001-of-00002.bin` -> `model-00001-of-00002.safetensors`,
/// `pytorch_model.bin.index.json` -> `model.safetensors.index.json`; a GGUF file's tensors go
/// to `model.safetensors`.
fn safetensors_name(name: &str) -> String {
    if name.to_ascii_lowercase().ends_with(".gguf") {
        return "model.safetensors".to_string();
    }
    let n = name.strip_prefix("pytorch_").unwrap_or(name);
    if let Some(stem) = n.strip_suffix(".bin.index.json") {
        return format!("{stem}.safetensors.index.json");
    }
    for ext in [".bin", ".pt", ".pth"] {
        if let Some(stem) = n.strip_suffix(ext) {
            return format!("{stem}.safetensors");
        }
    }
    name.to_string()
}

/// The Hub's index JSON: `metadata.total_size` (sum of tensor bytes) and a sorted `weight_map`.
pub fn index_json(cat: &Catalogue, plan: &Plan, layout: &Layout) -> String {
    let mut metadata = cat.index_metadata.clone().unwrap_or_default();
    let total: u64 = layout.files.iter().map(|f| f.bytes).sum();
    metadata.insert("total_size".into(), total.into());
    let mut map: Vec<(&str, &str)> = layout
        .files
        .iter()
        .flat_map(|f| {
            f.tensors.iter().map(move |&i| {
                (
                    cat.tensors[plan.tensors()[i].tensor].name.as_str(),
                    f.name.as_str(),
                )
            })
        })
        .collect();
    map.sort();
    let weight_map: serde_json::Map<String, serde_json::Value> = map
        .into_iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
        .collect();
    let mut root = serde_json::Map::new();
    root.insert("metadata".into(), serde_json::Value::Object(metadata));
    root.insert("weight_map".into(), serde_json::Value::Object(weight_map));
    let mut s = serde_json::to_string_pretty(&serde_json::Value::Object(root)).expect("JSON");
    s.push('\n');
    s
}

/// Refuses an output that is the input (or one of its files) and an existing output without
/// `force`.
pub fn check_target(cat: &Catalogue, target: &Target, layout: &Layout, force: bool) -> Result<()> {
    let out = target.path();
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    let inputs: Vec<PathBuf> = cat
        .files
        .iter()
        .filter_map(|f| canon(&f.path))
        .chain(canon(&cat.path))
        .collect();
    let out_dir = match target {
        Target::Folder(p) => p.clone(),
        _ => out.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let mut outputs: Vec<PathBuf> = vec![out.to_path_buf()];
    if !matches!(target, Target::Folder(_)) {
        let dir = if out_dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            &out_dir
        };
        outputs.extend(layout.files.iter().map(|f| dir.join(&f.name)));
        outputs.extend(layout.index.iter().map(|i| dir.join(i)));
    }
    for o in &outputs {
        if let Some(c) = canon(o) {
            if inputs.contains(&c) {
                return Err(Error::usage(format!(
                    "{}: the output would overwrite the input; choose another output path",
                    o.display()
                )));
            }
        }
    }
    if let Target::Folder(p) = target {
        if let (Some(a), Some(b)) = (canon(p), canon(&cat.path)) {
            if b.starts_with(&a) {
                return Err(Error::usage(format!(
                    "{}: the output folder contains the input; choose another output path",
                    p.display()
                )));
            }
        }
    }
    if !force {
        if let Some(o) = outputs.iter().find(|o| o.symlink_metadata().is_ok()) {
            return Err(Error::usage(format!(
                "{}: already exists (use --force to replace it)",
                o.display()
            )));
        }
    }
    let parent = match target {
        Target::Folder(p) => p.parent().map(Path::to_path_buf).unwrap_or_default(),
        _ => out_dir,
    };
    let parent = if parent.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        parent
    };
    // A missing folder is created by the conversion (as save_pretrained does); an ancestor
    // that is a file cannot be.
    let mut p = parent.as_path();
    loop {
        if let Ok(m) = std::fs::metadata(p) {
            if !m.is_dir() {
                return Err(Error::usage(format!(
                    "{}: not a folder, so the output cannot go below it",
                    p.display()
                )));
            }
            break;
        }
        match p.parent() {
            Some(q) if !q.as_os_str().is_empty() => p = q,
            _ => break,
        }
    }
    Ok(())
}

/// A GGUF output: one file, the tensors in llama.cpp's order (by layer, then name).
fn gguf_layout(cat: &Catalogue, plan: &Plan, p: &Path) -> Layout {
    let mut all: Vec<usize> = (0..plan.tensors().len()).collect();
    if let Some(h) = plan.gguf_hf.as_deref() {
        // a model folder's: the converter's order
        let at: std::collections::HashMap<usize, usize> = h
            .tensors
            .iter()
            .enumerate()
            .map(|(k, t)| (t.source, k))
            .collect();
        all.sort_by_key(|&i| at.get(&plan.tensors()[i].tensor.0).copied());
    } else {
        all.sort_by(|&a, &b| {
            crate::formats::gguf::llama_order(
                &cat.tensors[plan.tensors()[a].tensor].name,
                &cat.tensors[plan.tensors()[b].tensor].name,
            )
        });
    }
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Layout {
        files: vec![OutputFile {
            name,
            bytes: all.iter().map(|&i| plan.tensors()[i].bytes_out).sum(),
            tensors: all,
        }],
        index: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("5GiB").unwrap(), 5 << 30);
        assert_eq!(parse_size("1.5MB").unwrap(), 1_500_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("GB").is_err());
        assert!(parse_size("0").is_err());
    }
}
