//! A GGUF file from a Hugging Face folder, as llama.cpp's `convert_hf_to_gguf.py` (vendored by
//! llama-cpp-python 0.3.36) writes it: its metadata keys in its order (the naming keys, the
//! architecture's parameters, the SentencePiece vocabulary and special tokens), its tensor names,
//! order and q/k row permutation, and which tensors stay F32. The executor streams the data.
//!
//! Supported: Llama-architecture models (`LlamaForCausalLM`, `MistralForCausalLM`) with a
//! SentencePiece `tokenizer.model`. Anything the reference converter would do differently from
//! what is ported here is refused by name rather than written differently.

pub mod card;
pub mod names;
pub mod naming;
pub mod pre_hashes;
pub mod to_hf;
pub mod vocab;

use std::path::Path;

use serde_json::Value as Json;

use crate::catalogue::gguf::Value;
use crate::catalogue::quant::Role;
use crate::catalogue::{Catalogue, InputKind};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// llama.cpp's file types (`LlamaFileType`) a GGUF from a folder is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    /// `ALL_F32` (0).
    F32,
    /// `MOSTLY_F16` (1).
    F16,
    /// `MOSTLY_BF16` (32).
    BF16,
    /// `MOSTLY_Q8_0` (7).
    Q8_0,
}

impl FileType {
    /// The dtype a plan casts to by default (Q8_0 is quantized from f32).
    pub fn planned(self) -> DType {
        match self {
            FileType::F32 | FileType::Q8_0 => DType::F32,
            FileType::F16 => DType::F16,
            FileType::BF16 => DType::BF16,
        }
    }

    /// `general.file_type`.
    pub fn id(self) -> u64 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::BF16 => 32,
            FileType::Q8_0 => 7,
        }
    }
}

/// One output tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct HfTensor {
    /// The catalogue tensor it is read from.
    pub source: usize,
    /// Its GGUF name.
    pub name: String,
    /// GGUF dims (fastest first).
    pub dims: Vec<u64>,
    /// Rows permuted as `LlamaModel.permute` does (q/k projections): the head count.
    pub permute: Option<u64>,
    /// Written in F32 whatever the file type (1-D tensors, norms, biases).
    pub f32_only: bool,
}

/// Catalogue tensors left out of an output, each with why.
pub type Skipped = Vec<(usize, String)>;

/// What a GGUF output of a folder holds.
#[derive(Debug, Clone, PartialEq)]
pub struct HfGguf {
    /// `general.architecture`.
    pub arch: &'static str,
    /// Every metadata key, in file order.
    pub metadata: Vec<(String, Value)>,
    /// The tensors, in file order.
    pub tensors: Vec<HfTensor>,
    /// Catalogue tensors left out, and why.
    pub skipped: Skipped,
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::invalid(path, format!("not JSON: {e}")))
}

/// The folder of a Hugging Face checkpoint the catalogue was read from.
fn folder(cat: &Catalogue) -> Result<&Path> {
    cat.folder
        .as_ref()
        .map(|f| f.dir.as_path())
        .filter(|d| d.join("config.json").is_file())
        .ok_or_else(|| {
            Error::usage(format!(
                "{}: a .gguf output is written from a GGUF file or a Hugging Face model folder \
                 (config.json and the tokenizer next to the weights)",
                cat.path.display()
            ))
        })
}

/// The converter's tensor order: part files in sorted order, each file's tensors sorted by
/// name (as gguf-py's `SafetensorsLocal` lists them); other inputs in their own order.
fn converter_order(cat: &Catalogue) -> Vec<usize> {
    let mut ids: Vec<usize> = (0..cat.tensors.len()).collect();
    if cat.kind == InputKind::Safetensors
        || cat.files.iter().all(|f| f.name.ends_with(".safetensors"))
    {
        ids.sort_by(|&a, &b| {
            let (ta, tb) = (&cat.tensors[a], &cat.tensors[b]);
            cat.files[ta.file]
                .name
                .cmp(&cat.files[tb.file].name)
                .then_with(|| ta.name.cmp(&tb.name))
        });
    }
    ids
}

/// `--to auto`: the converter's guess from the first tensor of two or more dimensions that is
/// bf16 or f16, in its order (f16 when there is none).
pub fn guess_file_type(cat: &Catalogue) -> FileType {
    for i in converter_order(cat) {
        let t = &cat.tensors[i];
        if t.shape.len() < 2 {
            continue;
        }
        match t.dtype {
            DType::BF16 => return FileType::BF16,
            DType::F16 => return FileType::F16,
            _ => {}
        }
    }
    FileType::F16
}

/// The model families a GGUF output of a folder supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// `LlamaModel` of the converter (Llama, Mistral).
    Llama,
    /// `BertModel` (BERT encoders: all-MiniLM-L6-v2).
    Bert,
    /// `Qwen2Model` (q/k/v biases).
    Qwen2,
    /// `Qwen3Model` (q/k norms).
    Qwen3,
}

impl Family {
    /// Its tensor names.
    fn names(self) -> &'static names::TensorMap {
        match self {
            Family::Llama | Family::Qwen2 => &names::LLAMA,
            Family::Qwen3 => &names::QWEN3,
            Family::Bert => &names::BERT,
        }
    }

    fn arch(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Bert => "bert",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }
}

/// `BertModel.filter_tensors`: a `bert.` prefix dropped, `gamma`/`beta` as `weight`/`bias`;
/// `None` for what the converter leaves out (position ids, pooler, pre-training heads).
fn bert_filter(name: &str) -> Option<String> {
    let mut n = name.strip_prefix("bert.").unwrap_or(name).to_string();
    if let Some(b) = n.strip_suffix(".gamma") {
        n = format!("{b}.weight");
    }
    if let Some(b) = n.strip_suffix(".beta") {
        n = format!("{b}.bias");
    }
    let dropped = matches!(
        n.as_str(),
        "embeddings.position_ids" | "pooler.dense.weight" | "pooler.dense.bias"
    ) || n.starts_with("cls.predictions")
        || n.starts_with("cls.seq_relationship");
    (!dropped).then_some(n)
}

/// `_try_set_pooling_type`: the sentence-transformers pooling of `modules.json`, if any.
fn pooling(dir: &Path, arch: &str, md: &mut Vec<(String, Value)>) -> Result<()> {
    let modules = dir.join("modules.json");
    if !modules.is_file() {
        return Ok(());
    }
    let list = read_json(&modules)?;
    let path = list.as_array().into_iter().flatten().find_map(|m| {
        m.get("type")
            .and_then(Json::as_str)
            .filter(|t| t.ends_with("Pooling"))
            .and(m.get("path").and_then(Json::as_str))
    });
    let Some(path) = path else {
        return Ok(());
    };
    let pooling_path = dir.join(path).join("config.json");
    let p = read_json(&pooling_path)?;
    let on = |k: &str| p.get(k).and_then(Json::as_bool).unwrap_or(false);
    let mode = if on("pooling_mode_mean_tokens") {
        1
    } else if on("pooling_mode_cls_token") {
        2
    } else if on("pooling_mode_lasttoken") {
        3
    } else {
        match p.get("pooling_mode").and_then(Json::as_str) {
            Some("mean") => 1,
            Some("cls") => 2,
            Some("lasttoken") => 3,
            _ => {
                return Err(Error::usage(format!(
                    "{}: only MEAN, CLS and LAST pooling go into a GGUF file",
                    pooling_path.display()
                )))
            }
        }
    };
    kv(
        md,
        &format!("{arch}.pooling_type"),
        Value::U(mode, "uint32"),
    );
    Ok(())
}

/// `BertModel.set_vocab`: the WordPiece vocabulary of `tokenizer.json` (`get_vocab_base`),
/// its pre-tokenizer name, tokens in llama.cpp's phantom-space form, and the special tokens.
fn bert_vocab(dir: &Path, cfg: &Json, md: &mut Vec<(String, Value)>) -> Result<()> {
    let v = vocab::vocab_base(
        dir,
        cfg.get("vocab_size").and_then(Json::as_u64),
        "WordPiece",
    )?;
    let type_count = cfg
        .get("type_vocab_size")
        .and_then(Json::as_u64)
        .unwrap_or(1);
    kv(
        md,
        "tokenizer.ggml.token_type_count",
        Value::U(type_count, "uint32"),
    );
    kv(md, "tokenizer.ggml.model", Value::Str("bert".into()));
    kv(md, "tokenizer.ggml.pre", Value::Str(v.pre));
    let n = v.tokens.len() as u64;
    let tokens = v
        .tokens
        .into_iter()
        .zip(&v.types)
        .map(|(t, &ty)| {
            Value::Str(if ty == 3 {
                t
            } else if let Some(rest) = t.strip_prefix("##") {
                rest.to_string()
            } else {
                format!("\u{2581}{t}")
            })
        })
        .collect();
    kv(md, "tokenizer.ggml.tokens", Value::Array("string", tokens));
    kv(
        md,
        "tokenizer.ggml.token_type",
        Value::Array(
            "int32",
            v.types.into_iter().map(|t| Value::I(t, "int32")).collect(),
        ),
    );
    for (k, val) in vocab::special_vocab(dir, Some(n))? {
        kv(md, &k, val);
    }
    Ok(())
}

/// `Qwen3Model._is_qwen3_reranker`.
fn qwen3_reranker(dir: &Path, cfg: &Json) -> bool {
    let readme = std::fs::read_to_string(dir.join("README.md"))
        .unwrap_or_default()
        .to_lowercase();
    if readme.contains("# qwen3-reranker") || readme.contains("# qwen3-vl-reranker") {
        return true;
    }
    let s = |k: &str| {
        cfg.get(k)
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_lowercase()
    };
    let arch = cfg
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Json::as_str)
        .unwrap_or("")
        .to_lowercase();
    let dir_name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    [dir_name, s("_name_or_path"), s("model_type"), arch.clone()]
        .iter()
        .any(|h| h.contains("qwen3-reranker") || h.contains("qwen3-vl-reranker"))
        || arch.contains("sequenceclassification")
}

/// `_set_vocab_gpt2`: a byte-level BPE vocabulary (`get_vocab_base`), its pre-tokenizer name,
/// its merges and special tokens.
fn gpt2_vocab(dir: &Path, cfg: &Json, md: &mut Vec<(String, Value)>) -> Result<()> {
    if dir.join("tokenizer.model").is_file() {
        return Err(Error::usage(format!(
            "{}: a SentencePiece tokenizer.model in a Qwen folder is not supported for a .gguf \
             output yet",
            dir.display()
        )));
    }
    let v = vocab::vocab_base(dir, cfg.get("vocab_size").and_then(Json::as_u64), "BPE")?;
    kv(md, "tokenizer.ggml.model", Value::Str("gpt2".into()));
    kv(md, "tokenizer.ggml.pre", Value::Str(v.pre));
    kv(
        md,
        "tokenizer.ggml.tokens",
        Value::Array("string", v.tokens.into_iter().map(Value::Str).collect()),
    );
    kv(
        md,
        "tokenizer.ggml.token_type",
        Value::Array(
            "int32",
            v.types.into_iter().map(|t| Value::I(t, "int32")).collect(),
        ),
    );
    let merges = vocab::merges(dir)?;
    if !merges.is_empty() {
        kv(
            md,
            "tokenizer.ggml.merges",
            Value::Array("string", merges.into_iter().map(Value::Str).collect()),
        );
    }
    for (k, val) in vocab::special_vocab(dir, None)? {
        kv(md, &k, val);
    }
    Ok(())
}

fn num(cfg: &Json, keys: &[&str]) -> Option<u64> {
    keys.iter().find_map(|k| cfg.get(*k)).and_then(Json::as_u64)
}

fn float(cfg: &Json, keys: &[&str]) -> Option<f64> {
    keys.iter().find_map(|k| cfg.get(*k)).and_then(Json::as_f64)
}

fn kv(out: &mut Vec<(String, Value)>, key: &str, v: Value) {
    // gguf-py's writer: a key set again keeps its place
    match out.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = v,
        None => out.push((key.to_string(), v)),
    }
}

/// The converter's hyperparameters: `AutoConfig.from_pretrained(dir).to_dict()`, which fills
/// what `config.json` leaves out with the config class's defaults (transformers 5's
/// `LlamaConfig` and `MistralConfig`: `head_dim`, `num_key_value_heads`, `rope_parameters`...).
fn hparams(mut cfg: Json, hf_arch: &str) -> Json {
    let mistral = hf_arch == "MistralForCausalLM";
    let qwen = hf_arch.starts_with("Qwen");
    let Some(o) = cfg.as_object_mut() else {
        return cfg;
    };
    let mut default = |k: &str, v: Json| {
        if o.get(k).is_none_or(Json::is_null) {
            o.insert(k.to_string(), v);
        }
    };
    // transformers 5's LlamaConfig, MistralConfig, Qwen2Config and Qwen3Config defaults
    default("vocab_size", if qwen { 151936 } else { 32000 }.into());
    default("hidden_size", 4096.into());
    let inter = match () {
        _ if qwen => 22016,
        _ if mistral => 14336,
        _ => 11008,
    };
    default("intermediate_size", inter.into());
    default("num_hidden_layers", 32.into());
    default("num_attention_heads", 32.into());
    let ctx = match () {
        _ if qwen => 32768,
        _ if mistral => 131072,
        _ => 2048,
    };
    default("max_position_embeddings", ctx.into());
    default("rms_norm_eps", 1e-6.into());
    let heads = o
        .get("num_attention_heads")
        .and_then(Json::as_u64)
        .unwrap_or(32);
    let hidden = o.get("hidden_size").and_then(Json::as_u64).unwrap_or(4096);
    if o.get("num_key_value_heads").is_none_or(Json::is_null) {
        let kv = if mistral { 8 } else { heads };
        o.insert("num_key_value_heads".into(), kv.into());
    }
    if o.get("head_dim").is_none_or(Json::is_null) && heads > 0 {
        // Qwen2's config leaves it unset, Qwen3's defaults to 128
        match hf_arch {
            "Qwen2ForCausalLM" => {}
            "Qwen3ForCausalLM" => {
                o.insert("head_dim".into(), 128.into());
            }
            _ => {
                o.insert("head_dim".into(), (hidden / heads).into());
            }
        }
    }
    // rope: rope_parameters (or the older rope_scaling) with rope_theta inside, rope_type set
    let theta = o.get("rope_theta").cloned().filter(|v| !v.is_null());
    let mut rope = o
        .get("rope_parameters")
        .filter(|v| v.is_object())
        .or_else(|| o.get("rope_scaling").filter(|v| v.is_object()))
        .cloned()
        .unwrap_or_else(|| Json::Object(Default::default()));
    if let Some(r) = rope.as_object_mut() {
        if !r.contains_key("rope_theta") {
            r.insert("rope_theta".into(), theta.unwrap_or(10000.0.into()));
        }
        if !r.contains_key("rope_type") {
            let t = r.get("type").cloned().unwrap_or("default".into());
            r.insert("rope_type".into(), t);
        }
    }
    o.insert("rope_parameters".into(), rope);
    o.remove("rope_scaling");
    o.remove("rope_theta");
    cfg
}

/// The GGUF output of a Hugging Face folder in file type `ftype`, its `config.json` read with
/// the rules' `[config]` edits (`edits`: existing top-level keys set to their new values) as
/// the model the output holds has them.
pub fn describe(
    cat: &Catalogue,
    ftype: FileType,
    edits: &[crate::rules::ConfigEdit],
) -> Result<HfGguf> {
    let dir = folder(cat)?;
    let cfg_path = dir.join("config.json");
    let mut cfg = read_json(&cfg_path)?;
    if let Some(o) = cfg.as_object_mut() {
        for e in edits {
            if let Some(slot) = o.get_mut(&e.key) {
                *slot = e.new.clone();
            }
        }
    }
    let hf_arch = cfg
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Json::as_str)
        .unwrap_or("")
        .to_string();
    let hf_arch = hf_arch.as_str();
    let family = match hf_arch {
        "LlamaForCausalLM" | "MistralForCausalLM" => Family::Llama,
        "BertModel" | "BertForMaskedLM" => Family::Bert,
        "Qwen2ForCausalLM" => Family::Qwen2,
        "Qwen3ForCausalLM" => Family::Qwen3,
        _ => {
            return Err(Error::usage(format!(
                "{}: a .gguf output of a model folder supports LlamaForCausalLM, \
                 MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, BertModel and \
                 BertForMaskedLM so far, not `{hf_arch}`",
                cat.path.display()
            )))
        }
    };
    let cfg = match family {
        Family::Bert => cfg,
        _ => hparams(cfg, hf_arch),
    };
    if family == Family::Qwen3 && qwen3_reranker(dir, &cfg) {
        return Err(Error::usage(format!(
            "{}: Qwen3 rerankers are not supported for a .gguf output yet",
            cat.path.display()
        )));
    }
    let unsupported = |what: &str| {
        Err(Error::usage(format!(
            "{}: {what} is not supported for a .gguf output yet",
            cfg_path.display()
        )))
    };
    // a quantized folder is dequantized on its way in (its packed or scaled weights read as
    // plain ones); one that cannot be is refused
    let dequantized = cat
        .quant
        .as_deref()
        .is_some_and(|q| q.unsupported.is_none() && (q.stored.is_some() || !q.scaled.is_empty()));
    for key in [
        "text_config",
        "num_local_experts",
        "draft_vocab_size",
        "quantization_config",
        "classifier_pooling",
    ] {
        if key == "quantization_config" && dequantized {
            continue;
        }
        if cfg.get(key).is_some_and(|v| !v.is_null()) {
            return unsupported(&format!("`{key}`"));
        }
    }
    let (tensors, skipped) = output_tensors(cat, family, &cfg, &cfg_path)?;
    let total: u64 = tensors.iter().map(|t| t.dims.iter().product::<u64>()).sum();

    let mut md: Vec<(String, Value)> = vec![];
    let arch = family.arch();
    kv(&mut md, "general.architecture", Value::Str(arch.into()));
    kv(&mut md, "general.type", Value::Str("model".into()));
    naming_keys(dir, &cfg, total, &mut md)?;
    text_params(&cfg, &cfg_path, arch, ftype, &mut md)?;
    match family {
        Family::Llama => llama_tail(&cfg, &cfg_path, &mut md)?,
        Family::Bert => {
            kv(&mut md, "bert.attention.causal", Value::Bool(false));
            pooling(dir, arch, &mut md)?
        }
        Family::Qwen2 | Family::Qwen3 => pooling(dir, arch, &mut md)?,
    }
    kv(
        &mut md,
        "general.quantization_version",
        Value::U(2, "uint32"),
    );
    match family {
        Family::Llama => llama_vocab(dir, &cfg, &mut md)?,
        Family::Bert => bert_vocab(dir, &cfg, &mut md)?,
        Family::Qwen2 | Family::Qwen3 => gpt2_vocab(dir, &cfg, &mut md)?,
    }
    Ok(HfGguf {
        arch,
        metadata: md,
        tensors,
        skipped,
    })
}

/// The output tensors of a folder in the converter's order (names, dims, q/k permutation,
/// F32-only), and the tensors it leaves out.
fn output_tensors(
    cat: &Catalogue,
    family: Family,
    cfg: &Json,
    cfg_path: &Path,
) -> Result<(Vec<HfTensor>, Skipped)> {
    let n_head = num(cfg, &["n_heads", "num_attention_heads"])
        .ok_or_else(|| Error::invalid(cfg_path, "no num_attention_heads"))?;
    let n_kv = num(cfg, &["n_kv_heads", "num_key_value_heads"]).unwrap_or(n_head);
    let block_count = num(
        cfg,
        &["n_layers", "num_hidden_layers", "n_layer", "num_layers"],
    )
    .ok_or_else(|| Error::invalid(cfg_path, "no num_hidden_layers"))?;

    let mut tensors = Vec::new();
    let mut skipped = Vec::new();
    for i in converter_order(cat) {
        let t = &cat.tensors[i];
        let hf = match family {
            Family::Llama | Family::Qwen2 | Family::Qwen3 => t.name.clone(),
            Family::Bert => match bert_filter(&t.name) {
                Some(n) => n,
                None => {
                    skipped.push((i, "not in llama.cpp's BERT (pooler, heads)".to_string()));
                    continue;
                }
            },
        };
        if hf.ends_with(".attention.masked_bias")
            || hf.ends_with(".attention.bias")
            || hf.ends_with(".rotary_emb.inv_freq")
        {
            skipped.push((i, "not in a GGUF file (llama.cpp computes it)".to_string()));
            continue;
        }
        // a scaled FP8 checkpoint: scales and companions leave (the plan dequantizes the
        // payloads with them), payloads enter as their dequantized values
        let role = cat.quant.as_deref().and_then(|q| q.role(i));
        if matches!(role, Some(Role::Scale | Role::Companion)) {
            skipped.push((
                i,
                "part of the quantization scheme, dequantized".to_string(),
            ));
            continue;
        }
        let payload = matches!(role, Some(Role::Payload(..)));
        if !payload && !matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::usage(format!(
                "tensor `{}`: {} has no place in a GGUF file written from a folder",
                t.name, t.dtype
            )));
        }
        let name = family.names().gguf_name(&hf, block_count).ok_or_else(|| {
            Error::usage(format!(
                "tensor `{}`: no GGUF name for it in the {} architecture",
                t.name,
                family.arch()
            ))
        })?;
        let permute = match family {
            Family::Bert | Family::Qwen2 | Family::Qwen3 => None,
            _ if hf.ends_with("q_proj.weight") || hf.ends_with("q_proj.bias") => Some(n_head),
            _ if hf.ends_with("k_proj.weight") || hf.ends_with("k_proj.bias") => Some(n_kv),
            _ => None,
        };
        if let Some(h) = permute {
            let rows = t.shape.first().copied().unwrap_or(0);
            if h == 0 || rows % (2 * h) != 0 {
                return Err(Error::invalid(
                    cfg_path,
                    format!(
                        "tensor `{}`: {rows} rows do not split into {h} heads of row pairs",
                        t.name
                    ),
                ));
            }
        }
        // as the converter: 1-D, norms, biases, and its named exceptions
        let f32_only = t.shape.len() <= 1
            || name.ends_with("_norm.weight")
            || !name.ends_with(".weight")
            || name == "position_embd.weight"
            || name == "token_types.weight";
        tensors.push(HfTensor {
            source: i,
            dims: t.shape.iter().rev().copied().collect(),
            name,
            permute,
            f32_only,
        });
    }
    Ok((tensors, skipped))
}

/// `Metadata.load` (no override file) then `set_gguf_meta_model`: the sampling defaults of
/// `generation_config.json`, then the authorship keys (`card`).
fn naming_keys(dir: &Path, cfg: &Json, total: u64, md: &mut Vec<(String, Value)>) -> Result<()> {
    let gen_path = dir.join("generation_config.json");
    let gen = if gen_path.is_file() {
        read_json(&gen_path).unwrap_or(Json::Null)
    } else {
        Json::Null
    };
    // (key, generation_config names, GGUF type: s string, i int32, f float32)
    let sampling: [(&str, &[&str], char); 12] = [
        ("sequence", &["sequence"], 's'),
        ("top_k", &["top_k"], 'i'),
        ("top_p", &["top_p"], 'f'),
        ("min_p", &["min_p"], 'f'),
        ("xtc_probability", &["xtc_probability"], 'f'),
        ("xtc_threshold", &["xtc_threshold"], 'f'),
        ("temp", &["temperature"], 'f'),
        ("penalty_last_n", &["penalty_last_n"], 'i'),
        (
            "penalty_repeat",
            &["penalty_repeat", "repetition_penalty"],
            'f',
        ),
        ("mirostat", &["mirostat"], 'i'),
        ("mirostat_tau", &["mirostat_tau"], 'f'),
        ("mirostat_eta", &["mirostat_eta"], 'f'),
    ];
    for (key, from, ty) in sampling {
        if let Some(v) = from
            .iter()
            .find_map(|k| gen.get(*k))
            .filter(|v| !v.is_null())
        {
            let val = match ty {
                's' => v.as_str().map(|s| Value::Str(s.into())),
                'i' => v.as_i64().map(|x| Value::I(x, "int32")),
                _ => v.as_f64().map(|x| Value::F32(x as f32)),
            };
            let val = val.ok_or_else(|| {
                Error::usage(format!(
                    "{}: `{}` of an unexpected type",
                    gen_path.display(),
                    from[0]
                ))
            })?;
            kv(md, &format!("general.sampling.{key}"), val);
        }
    }
    let name_or_path = cfg.get("_name_or_path").and_then(Json::as_str);
    for (k, v) in card::Authorship::load(dir, name_or_path, total)?.keys() {
        kv(md, &k, v);
    }
    Ok(())
}

/// `TextModel.set_gguf_parameters`, for architecture `a`.
fn text_params(
    cfg: &Json,
    cfg_path: &Path,
    a: &str,
    ftype: FileType,
    md: &mut Vec<(String, Value)>,
) -> Result<()> {
    let u32v = |x: u64| Value::U(x, "uint32");
    let block = num(
        cfg,
        &["n_layers", "num_hidden_layers", "n_layer", "num_layers"],
    )
    .unwrap_or(0);
    kv(md, &format!("{a}.block_count"), u32v(block));
    let groups: [(&str, &[&str]); 5] = [
        (
            "context_length",
            &[
                "max_position_embeddings",
                "n_ctx",
                "n_positions",
                "max_length",
                "max_sequence_length",
                "model_max_length",
            ],
        ),
        ("embedding_length", &["hidden_size", "n_embd", "dim"]),
        (
            "feed_forward_length",
            &[
                "prefix_dense_intermediate_size",
                "dense_intermediate_size",
                "intermediate_size",
                "n_inner",
                "hidden_dim",
            ],
        ),
        (
            "attention.head_count",
            &["num_attention_heads", "n_head", "n_heads"],
        ),
        (
            "attention.head_count_kv",
            &["num_key_value_heads", "n_kv_heads"],
        ),
    ];
    for (key, from) in groups {
        if let Some(v) = from
            .iter()
            .find_map(|k| cfg.get(*k))
            .filter(|v| !v.is_null())
        {
            let n = v.as_u64().ok_or_else(|| {
                Error::invalid(cfg_path, format!("`{}` is not a whole number", from[0]))
            })?;
            kv(md, &format!("{a}.{key}"), u32v(n));
        }
    }
    if cfg.get("is_causal") == Some(&Json::Bool(false)) {
        kv(md, &format!("{a}.attention.causal"), Value::Bool(false));
    }
    rope_keys(cfg, cfg_path, a, md)?;
    if let Some(e) = float(cfg, &["rms_norm_eps", "norm_eps"]) {
        kv(
            md,
            &format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(e as f32),
        );
    }
    if let Some(e) = float(
        cfg,
        &["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"],
    ) {
        kv(
            md,
            &format!("{a}.attention.layer_norm_epsilon"),
            Value::F32(e as f32),
        );
    }
    let head_dim = cfg.get("head_dim").and_then(Json::as_u64);
    if let Some(h) = head_dim {
        kv(md, &format!("{a}.attention.key_length"), u32v(h));
        kv(md, &format!("{a}.attention.value_length"), u32v(h));
    }
    kv(md, "general.file_type", u32v(ftype.id()));
    Ok(())
}

/// The rest of `LlamaModel.set_gguf_parameters`: the vocabulary size and RoPE dimensions.
fn llama_tail(cfg: &Json, cfg_path: &Path, md: &mut Vec<(String, Value)>) -> Result<()> {
    let u32v = |x: u64| Value::U(x, "uint32");
    let a = "llama";
    let head_dim = cfg.get("head_dim").and_then(Json::as_u64);
    let vocab = cfg
        .get("vocab_size")
        .and_then(Json::as_u64)
        .ok_or_else(|| Error::invalid(cfg_path, "no vocab_size"))?;
    kv(md, &format!("{a}.vocab_size"), u32v(vocab));
    let rope_dim = match head_dim {
        Some(h) => h,
        None => {
            let hidden = num(cfg, &["hidden_size"]).unwrap_or(0);
            let heads = num(cfg, &["num_attention_heads"]).unwrap_or(1).max(1);
            hidden / heads
        }
    };
    kv(md, &format!("{a}.rope.dimension_count"), u32v(rope_dim));
    Ok(())
}

/// The RoPE keys of `TextModel.set_gguf_parameters`: scaling (linear only, others refused)
/// and the base frequency.
fn rope_keys(cfg: &Json, cfg_path: &Path, a: &str, md: &mut Vec<(String, Value)>) -> Result<()> {
    let rope = cfg
        .get("rope_parameters")
        .filter(|v| !v.is_null())
        .or_else(|| cfg.get("rope_scaling").filter(|v| !v.is_null()))
        .cloned()
        .unwrap_or(Json::Object(Default::default()));
    let rope_type = rope
        .get("rope_type")
        .or_else(|| rope.get("type"))
        .and_then(Json::as_str);
    match rope_type {
        None | Some("default") => {}
        Some("linear") if rope.get("factor").is_some_and(|f| f.is_number()) => {
            kv(
                md,
                &format!("{a}.rope.scaling.type"),
                Value::Str("linear".into()),
            );
            let f = rope.get("factor").and_then(Json::as_f64).unwrap_or(1.0);
            kv(
                md,
                &format!("{a}.rope.scaling.factor"),
                Value::F32(f as f32),
            );
        }
        Some(other) => {
            return Err(Error::usage(format!(
                "{}: RoPE type `{other}` is not supported for a .gguf output yet",
                cfg_path.display()
            )))
        }
    }
    let theta = rope.get("rope_theta").and_then(Json::as_f64).or_else(|| {
        float(
            cfg,
            &[
                "global_rope_theta",
                "rope_global_theta",
                "rope_theta_global",
                "rope_theta",
                "rotary_emb_base",
            ],
        )
    });
    if let Some(t) = theta {
        kv(md, &format!("{a}.rope.freq_base"), Value::F32(t as f32));
    }
    Ok(())
}

/// `LlamaModel.set_vocab` for a SentencePiece tokenizer.
fn llama_vocab(dir: &Path, cfg: &Json, md: &mut Vec<(String, Value)>) -> Result<()> {
    if dir.join("tekken.json").is_file() && !dir.join("tokenizer.json").is_file() {
        return Err(Error::usage(format!(
            "{}: Mistral's tekken tokenizer is not supported for a .gguf output yet",
            dir.display()
        )));
    }
    let tc_path = dir.join("tokenizer_config.json");
    if tc_path.is_file() {
        let tc = read_json(&tc_path)?;
        if let Some(Json::Bool(b)) = tc.get("add_prefix_space") {
            kv(md, "tokenizer.ggml.add_space_prefix", Value::Bool(*b));
        }
    }
    if !dir.join("tokenizer.model").is_file() {
        return Err(Error::usage(format!(
            "{}: no tokenizer.model: a .gguf output of a Llama folder needs its SentencePiece \
             tokenizer (BPE tokenizers are not supported yet)",
            dir.display()
        )));
    }
    let vocab = cfg.get("vocab_size").and_then(Json::as_u64);
    if vocab == Some(32016) {
        return Err(Error::usage(format!(
            "{}: CodeLlama's infill tokens are not supported for a .gguf output yet",
            dir.display()
        )));
    }
    for (k, v) in vocab::sentencepiece_keys(dir, vocab)? {
        kv(md, &k, v);
    }
    if vocab == Some(49152) {
        kv(md, "tokenizer.ggml.add_bos_token", Value::Bool(false));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_as_llama_model_permute() {
        use crate::catalogue::Rows;
        // 2 heads of 6 rows: [0 1 2 3 4 5 | ...] -> [0 3 1 4 2 5 | ...], and back
        let p = Rows {
            heads: 2,
            undo: false,
        };
        let got: Vec<u64> = (0..12).map(|o| p.source_row(o, 12)).collect();
        assert_eq!(got, vec![0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]);
        let u = Rows {
            heads: 2,
            undo: true,
        };
        for o in 0..12 {
            assert_eq!(p.source_row(u.source_row(o, 12), 12), o);
        }
    }

    #[test]
    fn bert_filter_drops() {
        assert_eq!(
            bert_filter("bert.embeddings.LayerNorm.gamma").as_deref(),
            Some("embeddings.LayerNorm.weight")
        );
        assert_eq!(bert_filter("pooler.dense.weight"), None);
        assert_eq!(bert_filter("cls.predictions.bias"), None);
    }
}
