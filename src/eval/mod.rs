//! Running a model at several precisions on real inputs and comparing its outputs with the f32
//! reference (`weightcast eval`). Models run through `candle-transformers`; weights come from any
//! catalogue weightcast reads, cast by weightcast's own kernels.
//!
//! Supported: BERT-family encoders with sentence-transformers pooling (mean pooling and
//! normalisation as the folder's `1_Pooling/config.json` and `modules.json` say), and
//! Llama-family causal language models (`model_type` llama, mistral, qwen2).
//!
//! Here: the model folder (config checks, tokenizer), candidates and their weights. `encoder`
//! and `lm` run the two kinds of model, `bert` feeds candle's BERT encoder a mask that works in
//! f16/bf16, `metrics` compares outputs (pure), `spill` keeps a causal LM's reference logits on
//! disk.

pub mod bert;
pub mod encoder;
pub mod lm;
pub mod metrics;
pub mod spill;

/// The tensor type of the weights eval loads (candle's).
pub use candle_core::Tensor;
pub use encoder::{embed, Run};
pub use lm::{run_lm, LmRun};

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType as CDType, Device};
use candle_transformers::models::bert::Config as BertConfig;
use candle_transformers::models::{llama, qwen2};

use crate::cast;
use crate::catalogue::Catalogue;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::source::Sources;

/// Model types `eval` runs.
pub const SUPPORTED: &[&str] = &["bert", "llama", "mistral", "qwen2"];

/// Sentences used when no `--inputs` file is given: short and long, several topics, so that
/// nearest-neighbour rankings mean something.
pub const DEFAULT_INPUTS: &[&str] = &[
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "A cheetah is running behind its prey.",
    "The new movie is awesome.",
    "The cat sits outside.",
    "The new movie is so great.",
    "A man is playing guitar.",
    "The dog plays in the garden.",
    "Do you like pizza?",
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
    "Quantum computers use qubits that can be in superpositions of states.",
    "Neural networks are trained with stochastic gradient descent.",
    "The Federal Reserve raised interest rates by a quarter point on Wednesday.",
    "Stock markets fell sharply after the announcement.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The mitochondria is the powerhouse of the cell.",
    "She booked a flight to Tokyo for the conference next month.",
    "Please remember to water the plants while I am away on vacation.",
    "The recipe calls for two cups of flour, a pinch of salt and three eggs.",
    "Rust guarantees memory safety without a garbage collector.",
    "Half precision halves the memory a model's weights need.",
    "Tokyo is the capital of Japan.",
    "Paris is known for the Eiffel Tower and its museums.",
    "A long time ago, in a galaxy far, far away, a small rebellion fought an empire that \
     seemed impossible to defeat, and against all odds it won.",
];

/// What kind of model a folder holds.
pub enum Arch {
    /// A BERT-family encoder (embeddings compared).
    Bert(BertConfig),
    /// A Llama-family causal LM (next-token distributions compared).
    Llama(llama::Config),
    /// A Qwen2 causal LM (a Llama with attention biases).
    Qwen2(qwen2::Config),
}

/// A model folder ready to run.
pub struct EvalModel {
    /// The folder.
    pub dir: PathBuf,
    /// The architecture and its config.
    pub arch: Arch,
    /// The folder's tokenizer.
    pub tokenizer: tokenizers::Tokenizer,
    /// Mean pooling (otherwise the CLS token).
    pub mean_pooling: bool,
    /// L2-normalise the pooled embedding.
    pub normalize: bool,
}

/// RoPE scaling, from `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5),
/// in the form candle's configs read: the rope types candle implements for this architecture
/// (`default`; `llama3` for Llama and Mistral) are passed on, any other is refused by name
/// rather than run with other positions than transformers uses.
fn rope_scaling(
    obj: &mut serde_json::Map<String, serde_json::Value>,
    model_type: &str,
) -> std::result::Result<(), String> {
    let given = ["rope_scaling", "rope_parameters"]
        .iter()
        .find_map(|k| obj.get(*k).filter(|v| v.is_object()).cloned());
    let Some(r) = given else {
        obj.remove("rope_scaling");
        return Ok(());
    };
    let kind = r
        .get("rope_type")
        .or_else(|| r.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default")
        .to_string();
    match (model_type, kind.as_str()) {
        (_, "default") => {
            obj.remove("rope_scaling");
        }
        ("llama" | "mistral", "llama3") => {
            let mut out = serde_json::Map::new();
            for k in [
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            ] {
                let v = r
                    .get(k)
                    .filter(|v| v.is_number())
                    .ok_or_else(|| format!("llama3 RoPE scaling without a numeric `{k}`"))?;
                out.insert(k.into(), v.clone());
            }
            out.insert("rope_type".into(), "llama3".into());
            obj.insert("rope_scaling".into(), serde_json::Value::Object(out));
        }
        (m, other) => {
            return Err(format!(
                "RoPE scaling `{other}` is not implemented by candle's {m} model: eval would \
                 compute other logits than transformers, so it refuses (types run: default{})",
                if matches!(m, "llama" | "mistral") {
                    ", llama3"
                } else {
                    ""
                }
            ))
        }
    }
    Ok(())
}

fn json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::invalid(path, format!("not valid JSON: {e}")))
}

/// The architecture `config.json` describes, with the spellings and defaults candle's configs
/// need filled in.
fn read_arch(cfg_path: &Path) -> Result<Arch> {
    let cfg = json(cfg_path)?;
    let model_type = cfg
        .get("model_type")
        .and_then(|m| m.as_str())
        .unwrap_or("?")
        .to_string();
    // transformers >= 5 writes `rope_parameters.rope_theta` and a null `sliding_window`;
    // candle's configs read the older spellings.
    let mut cfg = cfg;
    if let Some(obj) = cfg.as_object_mut() {
        if !obj.contains_key("rope_theta") {
            if let Some(t) = obj
                .get("rope_parameters")
                .and_then(|r| r.get("rope_theta"))
                .cloned()
            {
                obj.insert("rope_theta".into(), t);
            }
        }
        rope_scaling(obj, &model_type).map_err(|e| Error::invalid(cfg_path, e))?;
        if obj.get("sliding_window").is_some_and(|v| v.is_null()) {
            let m = obj
                .get("max_position_embeddings")
                .cloned()
                .unwrap_or(4096.into());
            obj.insert("sliding_window".into(), m);
        }
    }
    if model_type == "bert" {
        // transformers' BertConfig defaults, for the fields a config.json may leave out
        // (dropout and initialisation do nothing at inference, but candle requires them).
        if let Some(obj) = cfg.as_object_mut() {
            for (k, v) in [
                ("vocab_size", serde_json::json!(30522)),
                ("hidden_size", serde_json::json!(768)),
                ("num_hidden_layers", serde_json::json!(12)),
                ("num_attention_heads", serde_json::json!(12)),
                ("intermediate_size", serde_json::json!(3072)),
                ("hidden_act", serde_json::json!("gelu")),
                ("hidden_dropout_prob", serde_json::json!(0.1)),
                ("max_position_embeddings", serde_json::json!(512)),
                ("type_vocab_size", serde_json::json!(2)),
                ("initializer_range", serde_json::json!(0.02)),
                ("layer_norm_eps", serde_json::json!(1e-12)),
                ("pad_token_id", serde_json::json!(0)),
                ("classifier_dropout", serde_json::Value::Null),
            ] {
                obj.entry(k).or_insert(v);
            }
        }
    }
    let arch = match model_type.as_str() {
        "bert" => Arch::Bert(
            serde_json::from_value(cfg)
                .map_err(|e| Error::invalid(cfg_path, format!("not a BERT config: {e}")))?,
        ),
        "llama" | "mistral" => {
            let c: llama::LlamaConfig = serde_json::from_value(cfg)
                .map_err(|e| Error::invalid(cfg_path, format!("not a Llama config: {e}")))?;
            Arch::Llama(c.into_config(false))
        }
        "qwen2" => Arch::Qwen2(
            serde_json::from_value(cfg)
                .map_err(|e| Error::invalid(cfg_path, format!("not a Qwen2 config: {e}")))?,
        ),
        _ => {
            return Err(Error::usage(format!(
                "{}: model_type `{model_type}` is not supported by eval (supported: {})",
                cfg_path.display(),
                SUPPORTED.join(", ")
            )))
        }
    };
    check_config(&arch).map_err(|what| Error::invalid(cfg_path, what))?;
    Ok(arch)
}

/// The folder's `tokenizer.json`, truncated to what the model reads and padded as it needs.
fn read_tokenizer(dir: &Path, arch: &Arch, max_positions: usize) -> Result<tokenizers::Tokenizer> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(Error::invalid(dir, "no tokenizer.json in the model folder"));
    }
    let mut tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| Error::invalid(&tok_path, format!("cannot load tokenizer: {e}")))?;
    let max_len = json(&dir.join("sentence_bert_config.json"))
        .ok()
        .and_then(|v| v.get("max_seq_length").and_then(|m| m.as_u64()))
        .unwrap_or(max_positions as u64) as usize;
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: max_len.min(max_positions),
            ..Default::default()
        }))
        .map_err(|e| Error::invalid(&tok_path, format!("truncation: {e}")))?;
    // A tokenizer.json may carry its own padding (all-MiniLM-L6-v2's pads every input to
    // 128): an encoder pads a batch to its longest input and masks the rest; a causal LM
    // reads each input alone, with no padding to predict.
    match arch {
        Arch::Bert(c) => {
            tokenizer.with_padding(Some(tokenizers::PaddingParams {
                strategy: tokenizers::PaddingStrategy::BatchLongest,
                pad_id: c.pad_token_id as u32,
                ..Default::default()
            }));
        }
        Arch::Llama(_) | Arch::Qwen2(_) => {
            tokenizer.with_padding(None);
        }
    }
    Ok(tokenizer)
}

impl EvalModel {
    /// Loads `config.json`, `tokenizer.json` and the sentence-transformers pooling of a folder.
    pub fn open(dir: &Path) -> Result<EvalModel> {
        let cfg_path = dir.join("config.json");
        let arch = read_arch(&cfg_path)?;
        let max_positions = match &arch {
            Arch::Bert(c) => c.max_position_embeddings,
            Arch::Llama(c) => c.max_position_embeddings,
            Arch::Qwen2(c) => c.max_position_embeddings,
        };
        let tokenizer = read_tokenizer(dir, &arch, max_positions)?;
        let pooling = json(&dir.join("1_Pooling/config.json")).ok();
        let mean_pooling = pooling
            .as_ref()
            .and_then(|p| p.get("pooling_mode_cls_token").and_then(|v| v.as_bool()))
            .map(|cls| !cls)
            .unwrap_or(true);
        let normalize = json(&dir.join("modules.json"))
            .ok()
            .and_then(|m| m.as_array().cloned())
            .is_some_and(|mods| {
                mods.iter().any(|m| {
                    m.get("type")
                        .and_then(|t| t.as_str())
                        .is_some_and(|t| t.ends_with("Normalize"))
                })
            });
        Ok(EvalModel {
            dir: dir.to_path_buf(),
            arch,
            tokenizer,
            mean_pooling,
            normalize,
        })
    }
}

impl EvalModel {
    /// The dtype a candidate with the floating dtypes `mix` (from [`float_mix`]) computes in,
    /// and why when it is not the dtype most weights have: `f32_compute` asks for f32; fp8 and
    /// f64 matmuls are not on this CPU path. A mixed candidate (norms kept in f32 by a rule)
    /// computes wholly in its main dtype, as candle runs one dtype per model: the kept tensors
    /// are rounded at load, and what keeping them buys shows with `--compute f32`.
    pub fn compute_dtype(
        &self,
        mix: &[(DType, u64)],
        f32_compute: bool,
    ) -> (DType, Option<String>) {
        if f32_compute {
            return (DType::F32, None);
        }
        let main = mix.first().map_or(DType::F32, |m| m.0);
        match main {
            DType::F8E4M3 | DType::F8E5M2 | DType::F64 => (
                DType::F32,
                Some(format!(
                    "{} compute is not available on this CPU path: computed in f32",
                    main.torch_name()
                )),
            ),
            d if mix.len() > 1 => {
                let others: Vec<&str> = mix[1..].iter().map(|m| m.0.torch_name()).collect();
                (
                    d,
                    Some(format!(
                        "its {} tensors computed in {}: --compute f32 shows what keeping them buys",
                        others.join("/"),
                        d.torch_name()
                    )),
                )
            }
            d => (d, None),
        }
    }
}

impl EvalModel {
    /// The token ids of each input, as a causal LM reads them (no padding).
    pub fn token_ids(&self, inputs: &[String]) -> Result<Vec<Vec<u32>>> {
        let ids = inputs
            .iter()
            .map(|text| {
                self.tokenizer
                    .encode(text.as_str(), true)
                    .map(|enc| enc.get_ids().to_vec())
                    .map_err(|e| Error::Usage(format!("tokenizing: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        self.check_ids(ids.iter().flatten())?;
        Ok(ids)
    }

    /// The model's vocabulary size (config.json).
    pub fn vocab_size(&self) -> usize {
        match &self.arch {
            Arch::Bert(c) => c.vocab_size,
            Arch::Llama(c) => c.vocab_size,
            Arch::Qwen2(c) => c.vocab_size,
        }
    }

    /// An error when the tokenizer gives an id the model has no embedding for.
    fn check_ids<'a>(&self, mut ids: impl Iterator<Item = &'a u32>) -> Result<()> {
        let vocab = self.vocab_size();
        match ids.find(|&&id| id as usize >= vocab) {
            Some(id) => Err(Error::invalid(
                self.dir.join("tokenizer.json"),
                format!(
                    "token id {id} is outside the model's vocabulary of {vocab} (config.json \
                     vocab_size): is this tokenizer the model's?"
                ),
            )),
            None => Ok(()),
        }
    }
}

/// The sizes candle divides by or allocates from, checked before candle sees them: a zero head
/// count panics in its loaders, a kv-head count that does not divide the heads panics in
/// Llama's (it unwraps each layer).
fn check_config(arch: &Arch) -> std::result::Result<(), String> {
    let (hidden, heads, kv) = match arch {
        Arch::Bert(c) => (c.hidden_size, c.num_attention_heads, c.num_attention_heads),
        Arch::Llama(c) => (c.hidden_size, c.num_attention_heads, c.num_key_value_heads),
        Arch::Qwen2(c) => (c.hidden_size, c.num_attention_heads, c.num_key_value_heads),
    };
    if hidden == 0 || heads == 0 || kv == 0 {
        return Err(format!(
            "hidden_size {hidden}, num_attention_heads {heads}, num_key_value_heads {kv}: none \
             may be 0"
        ));
    }
    if hidden % heads != 0 || heads % kv != 0 {
        return Err(format!(
            "hidden_size {hidden} must be a multiple of num_attention_heads {heads}, and that of \
             num_key_value_heads {kv}"
        ));
    }
    let theta = match arch {
        Arch::Bert(_) => 1.0,
        Arch::Llama(c) => c.rope_theta as f64,
        Arch::Qwen2(c) => c.rope_theta,
    };
    if !(theta.is_finite() && theta > 0.0) {
        return Err(format!("rope_theta {theta} must be a positive number"));
    }
    Ok(())
}

/// Elements per floating dtype of a candidate, most first: after `plan` when it is converted
/// on the fly, as stored otherwise.
pub fn float_mix(cat: &Catalogue, plan: Option<&Plan>) -> Vec<(DType, u64)> {
    let mut m = std::collections::BTreeMap::<DType, u64>::new();
    let plan = plan.map_or_else(|| Cow::Owned(Plan::stored(cat)), Cow::Borrowed);
    for p in plan.tensors() {
        let (t, d) = (&cat.tensors[p.tensor], p.to);
        if d.is_float() {
            *m.entry(d).or_default() += t.numel();
        }
    }
    let mut v: Vec<_> = m.into_iter().collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.1));
    v
}

pub(crate) fn candle_dtype(d: DType) -> Result<CDType> {
    Ok(match d {
        DType::F32 => CDType::F32,
        DType::F16 => CDType::F16,
        DType::BF16 => CDType::BF16,
        DType::F64 => CDType::F64,
        DType::F8E4M3 => CDType::F8E4M3,
        DType::I64 => CDType::I64,
        DType::I32 => CDType::I32,
        DType::U8 => CDType::U8,
        other => return Err(Error::usage(format!("eval cannot hold {other} weights"))),
    })
}

/// candle's error as one line: with RUST_BACKTRACE set, candle appends a backtrace to its
/// message.
pub(crate) fn ce(what: &str) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |e| {
        let e = match e {
            candle_core::Error::WithBacktrace { inner, .. } => *inner,
            e => e,
        };
        let msg = e.to_string();
        Error::Usage(format!(
            "{what}: {}",
            msg.lines().next().unwrap_or_default()
        ))
    }
}

/// Checks that a candidate holds the model's tensors as the model does: the same shape, and
/// floating where the model's are floating (integer tensors the same dtype). Tensors the
/// candidate lacks are left to the loader, which knows which ones the architecture needs.
pub fn check_candidate(model: &Catalogue, candidate: &Catalogue) -> Result<()> {
    let by_name: HashMap<&str, &crate::catalogue::TensorEntry> = candidate
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    for m in &model.tensors {
        let Some(c) = by_name.get(m.name.as_str()) else {
            continue;
        };
        if c.shape != m.shape {
            return Err(Error::invalid(
                &candidate.path,
                format!(
                    "tensor `{}` has shape {:?} where the model has {:?}",
                    m.name, c.shape, m.shape
                ),
            ));
        }
        let same_kind = if m.dtype.is_float() {
            c.dtype.is_float()
        } else {
            c.dtype == m.dtype
        };
        if !same_kind {
            return Err(Error::invalid(
                &candidate.path,
                format!(
                    "tensor `{}` is {} where the model has {}",
                    m.name,
                    c.dtype.torch_name(),
                    m.dtype.torch_name()
                ),
            ));
        }
    }
    Ok(())
}

/// Elements cast at a time when loading weights.
const CAST_CHUNK: usize = 1 << 20;

/// The weights of `cat` as candle tensors, cast as `plan` says (or as stored without a plan),
/// with the floating ones then widened to `compute` where it differs (exact: the rounding a
/// candidate's storage dtype does stays); returns them with their stored bytes. Everything is
/// done a chunk at a time with weightcast's kernels, so a tensor is never held in two dtypes
/// at once.
pub fn weights(
    cat: &Catalogue,
    plan: Option<&Plan>,
    compute: DType,
) -> Result<(HashMap<String, Tensor>, u64)> {
    let sources = Sources::open(cat)?;
    let mut out = HashMap::new();
    let mut total = 0;
    let fail = |t: &crate::catalogue::TensorEntry, e: cast::CastError| {
        Error::invalid(&cat.path, format!("tensor `{}`: {e}", t.name))
    };
    let plan = plan.map_or_else(|| Cow::Owned(Plan::stored(cat)), Cow::Borrowed);
    for p in plan.tensors() {
        let (t, to) = (&cat.tensors[p.tensor], p.to);
        let load = if to.is_float() { compute } else { to };
        let n = t.numel() as usize;
        // A scaled FP8 candidate weighs what it stores: payload and scale.
        total += match p.dequant {
            Some(d) => t.nbytes + cat.tensors[d.scale].nbytes,
            None => (n * to.bitsize() / 8) as u64,
        };
        let table = match p.dequant {
            Some(d) => Some(d.table(cat, &sources, p.tensor.0)?),
            None => None,
        };
        let bytes = if to == t.dtype && load == to && table.is_none() {
            let mut raw = vec![0u8; t.nbytes as usize];
            sources.read(t, 0, &mut raw)?;
            raw
        } else {
            let (from_w, to_w, load_w) =
                (t.dtype.bitsize() / 8, to.bitsize() / 8, load.bitsize() / 8);
            let mut o = vec![0u8; n * load_w];
            let (mut raw, mut mid) = (Vec::new(), Vec::new());
            for (k, dst) in o.chunks_mut(CAST_CHUNK * load_w).enumerate() {
                let count = dst.len() / load_w;
                raw.resize(count * from_w, 0);
                sources.read(t, (k * CAST_CHUNK * from_w) as u64, &mut raw)?;
                if let Some(table) = &table {
                    // Dequantized to `to`, then widened to `load`.
                    let first = (k * CAST_CHUNK) as u64;
                    let range = cast::Range::Ignore;
                    if load == to {
                        table
                            .dequantize_to(t.dtype, &raw, first, to, dst, range)
                            .map_err(|e| fail(t, e))?;
                    } else {
                        mid.resize(count * to_w, 0);
                        table
                            .dequantize_to(t.dtype, &raw, first, to, &mut mid, range)
                            .map_err(|e| fail(t, e))?;
                        cast::cast_par(to, load, &mid, dst).map_err(|e| fail(t, e))?;
                    }
                    continue;
                }
                match (to == t.dtype, load == to) {
                    (true, _) => cast::cast_par(to, load, &raw, dst).map_err(|e| fail(t, e))?,
                    (false, true) => {
                        cast::cast_par(t.dtype, to, &raw, dst).map_err(|e| fail(t, e))?
                    }
                    (false, false) => {
                        mid.resize(count * to_w, 0);
                        cast::cast_par(t.dtype, to, &raw, &mut mid).map_err(|e| fail(t, e))?;
                        cast::cast_par(to, load, &mid, dst).map_err(|e| fail(t, e))?;
                    }
                }
            }
            o
        };
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        let tensor = Tensor::from_raw_buffer(&bytes, candle_dtype(load)?, &shape, &Device::Cpu)
            .map_err(ce(&t.name))?;
        out.insert(t.name.clone(), tensor);
    }
    Ok((out, total))
}

/// The number of threads candle runs CPU matmuls on (`RAYON_NUM_THREADS`, or the physical
/// cores it detects).
pub fn thread_count() -> usize {
    candle_core::utils::get_num_threads()
}

/// Resets the peak-resident-memory mark (Linux: `5` into `/proc/self/clear_refs`), so that
/// [`peak_rss`] afterwards measures one candidate; false where the kernel does not allow it.
pub fn reset_peak_rss() -> bool {
    // Memory the previous candidate freed stays in the allocator's heap (glibc raises its mmap
    // threshold after large frees), and so in the resident set the mark starts from: hand it
    // back first, or every candidate would be charged for the one before it.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it takes no pointer and
    // touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident memory of this process since the last [`reset_peak_rss`], in bytes (`VmHWM`).
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
