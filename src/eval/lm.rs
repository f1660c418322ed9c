//! Running a Llama-family causal LM over the inputs, one token at a time with the KV cache,
//! handing every position's next-token logits to the caller.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType as CDType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, qwen2};

use super::{candle_dtype, ce, Arch, EvalModel};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// The shape config.json gives each weight of a Llama-family layer.
fn layer_shapes(arch: &Arch, i: usize) -> Vec<(String, Vec<usize>)> {
    let (h, heads, kv, inter) = match arch {
        Arch::Llama(c) => (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.intermediate_size,
        ),
        Arch::Qwen2(c) => (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.intermediate_size,
        ),
        Arch::Bert(_) => return vec![],
    };
    let hd = h / heads.max(1);
    [
        ("self_attn.q_proj.weight", vec![heads * hd, h]),
        ("self_attn.k_proj.weight", vec![kv * hd, h]),
        ("self_attn.v_proj.weight", vec![kv * hd, h]),
        ("self_attn.o_proj.weight", vec![h, heads * hd]),
        ("mlp.gate_proj.weight", vec![inter, h]),
        ("mlp.up_proj.weight", vec![inter, h]),
        ("mlp.down_proj.weight", vec![h, inter]),
        ("input_layernorm.weight", vec![h]),
        ("post_attention_layernorm.weight", vec![h]),
    ]
    .into_iter()
    .map(|(n, s)| (format!("model.layers.{i}.{n}"), s))
    .collect()
}

/// What running a causal LM candidate gave (its logits went to the caller's sink).
pub struct LmRun {
    /// Median seconds per token over the timed passes.
    pub median_token_s: f64,
    /// Tokens per second.
    pub tokens_per_s: f64,
}

/// Runs a Llama-family model over every input, one token at a time with the KV cache, so that
/// every position's next-token logits are seen; times `timed_runs` passes after a warm-up.
/// The warm-up pass hands each position's logits (f32) to `sink(input, position, logits)` as
/// they come, so memory holds one row, not the input set's.
pub fn run_lm(
    model: &EvalModel,
    weights: HashMap<String, Tensor>,
    compute: DType,
    ids: &[Vec<u32>],
    timed_runs: usize,
    mut sink: impl FnMut(usize, usize, &[f32]) -> Result<()>,
) -> Result<LmRun> {
    let cd = candle_dtype(compute)?;
    let layers = match &model.arch {
        Arch::Llama(c) => c.num_hidden_layers,
        Arch::Qwen2(c) => c.num_hidden_layers,
        Arch::Bert(_) => return Err(Error::usage("run_lm needs a causal LM")),
    };
    // candle's Llama loader unwraps every layer: check what it will ask for first, for an
    // error instead of a panic.
    for i in 0..layers {
        for (name, want) in layer_shapes(&model.arch, i) {
            match weights.get(&name).map(|t| t.dims().to_vec()) {
                None => return Err(Error::usage(format!("tensor `{name}` is missing"))),
                Some(got) if got != want => {
                    return Err(Error::usage(format!(
                        "tensor `{name}` has shape {got:?} where config.json gives {want:?}"
                    )))
                }
                Some(_) => {}
            }
        }
    }
    let vb = VarBuilder::from_tensors(weights, cd, &Device::Cpu);
    // The rotary tables are built for max_position_embeddings positions (a config value, up to
    // 131072 and more): only the positions the inputs reach are needed, and each position's
    // row does not depend on the table's length.
    let longest = ids.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
    enum Lm {
        Llama(llama::Llama, llama::Config),
        Qwen2(qwen2::ModelForCausalLM),
    }
    let mut lm = match &model.arch {
        Arch::Llama(c) => {
            let mut c = c.clone();
            c.max_position_embeddings = c.max_position_embeddings.min(longest);
            Lm::Llama(
                llama::Llama::load(vb, &c).map_err(ce("loading the model"))?,
                c,
            )
        }
        Arch::Qwen2(c) => {
            let mut c = c.clone();
            c.max_position_embeddings = c.max_position_embeddings.min(longest);
            Lm::Qwen2(qwen2::ModelForCausalLM::new(&c, vb).map_err(ce("loading the model"))?)
        }
        Arch::Bert(_) => unreachable!("checked above"),
    };
    let mut times = Vec::new();
    let mut total = 0f64;
    let n_tokens: usize = ids.iter().map(|v| v.len()).sum();
    for pass in 0..=timed_runs {
        let start_pass = Instant::now();
        for (s, seq) in ids.iter().enumerate() {
            let mut cache = match &mut lm {
                Lm::Llama(_, c) => {
                    Some(llama::Cache::new(true, cd, c, &Device::Cpu).map_err(ce("cache"))?)
                }
                Lm::Qwen2(m) => {
                    m.clear_kv_cache();
                    None
                }
            };
            for (pos, &tok) in seq.iter().enumerate() {
                let x = Tensor::new(&[[tok]], &Device::Cpu).map_err(ce("input"))?;
                let t = Instant::now();
                let out = match (&mut lm, cache.as_mut()) {
                    (Lm::Llama(m, _), Some(c)) => m.forward(&x, pos, c),
                    (Lm::Qwen2(m), _) => m.forward(&x, pos),
                    (Lm::Llama(..), None) => unreachable!("a Llama always has a cache"),
                }
                .map_err(ce("running the model"))?;
                if pass > 0 {
                    times.push(t.elapsed().as_secs_f64());
                    continue;
                }
                let row: Vec<f32> = out
                    .to_dtype(CDType::F32)
                    .and_then(|o| o.flatten_all())
                    .and_then(|o| o.to_vec1())
                    .map_err(ce("logits"))?;
                sink(s, pos, &row)?;
            }
        }
        if pass > 0 {
            total += start_pass.elapsed().as_secs_f64();
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(LmRun {
        median_token_s: times.get(times.len() / 2).copied().unwrap_or(0.0),
        tokens_per_s: if total > 0.0 {
            (n_tokens * timed_runs) as f64 / total
        } else {
            0.0
        },
    })
}
