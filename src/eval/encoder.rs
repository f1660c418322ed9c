//! Running a BERT-family encoder over the inputs: pooled, normalised sentence embeddings as
//! sentence-transformers computes them, with timings.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType as CDType, Device, Tensor};
use candle_nn::VarBuilder;

use super::{bert, candle_dtype, ce, Arch, EvalModel};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// What running one candidate gave.
pub struct Run {
    /// One embedding per input.
    pub embeddings: Vec<Vec<f32>>,
    /// Median seconds per batch over the timed runs.
    pub median_batch_s: f64,
    /// Non-padding tokens per second.
    pub tokens_per_s: f64,
    /// Where NaN or inf first appeared (`embeddings` or `encoder.layer.N`), when it did.
    pub first_non_finite: Option<String>,
}

/// Embeds `inputs` with `weights` computed in `compute`, `batch` inputs at a time; times
/// `timed_runs` passes after one warm-up.
pub fn embed(
    model: &EvalModel,
    weights: HashMap<String, Tensor>,
    compute: DType,
    inputs: &[String],
    batch: usize,
    timed_runs: usize,
) -> Result<Run> {
    let cd = candle_dtype(compute)?;
    let Arch::Bert(config) = &model.arch else {
        return Err(Error::usage("embed needs an encoder model"));
    };
    let vb = VarBuilder::from_tensors(weights, cd, &Device::Cpu);
    let bert = bert::Bert::load(vb, config).map_err(ce("loading the model"))?;
    // Tokenised once: the timed passes run the model only.
    let mut batches = Vec::new();
    let mut tokens = 0usize;
    for b in inputs.chunks(batch.max(1)) {
        let enc = model
            .tokenizer
            .encode_batch(b.to_vec(), true)
            .map_err(|e| Error::Usage(format!("tokenizing: {e}")))?;
        let n = enc.len();
        let len = enc.first().map_or(0, |e| e.get_ids().len());
        let ids: Vec<u32> = enc.iter().flat_map(|e| e.get_ids().to_vec()).collect();
        model.check_ids(ids.iter())?;
        let mask: Vec<u32> = enc
            .iter()
            .flat_map(|e| e.get_attention_mask().to_vec())
            .collect();
        tokens += mask.iter().filter(|&&m| m == 1).count();
        let ids = Tensor::from_vec(ids, (n, len), &Device::Cpu).map_err(ce("input ids"))?;
        let mask = Tensor::from_vec(mask, (n, len), &Device::Cpu).map_err(ce("attention mask"))?;
        let types = ids.zeros_like().map_err(ce("token types"))?;
        batches.push((ids, mask, types));
    }
    let mut embeddings = Vec::new();
    let mut times = Vec::new();
    let mut first_non_finite = None;
    for pass in 0..=timed_runs {
        let mut pass_embeddings = Vec::new();
        for (ids, mask_t, types) in &batches {
            let start = Instant::now();
            let hidden = bert
                .forward(ids, types, mask_t)
                .map_err(ce("running the model"))?
                .to_dtype(CDType::F32)
                .map_err(ce("output"))?;
            let pooled = if model.mean_pooling {
                let m = mask_t
                    .to_dtype(CDType::F32)
                    .map_err(ce("mask"))?
                    .unsqueeze(2)
                    .map_err(ce("mask"))?;
                let summed = hidden
                    .broadcast_mul(&m)
                    .and_then(|x| x.sum(1))
                    .map_err(ce("pooling"))?;
                let counts = m
                    .sum(1)
                    .and_then(|c| c.clamp(1e-9f32, f32::MAX))
                    .map_err(ce("pooling"))?;
                summed.broadcast_div(&counts).map_err(ce("pooling"))?
            } else {
                hidden
                    .narrow(1, 0, 1)
                    .and_then(|x| x.squeeze(1))
                    .map_err(ce("pooling"))?
            };
            let pooled = if model.normalize {
                let norm = pooled
                    .sqr()
                    .and_then(|x| x.sum_keepdim(1))
                    .and_then(|x| x.sqrt())
                    .and_then(|x| x.clamp(1e-12f32, f32::MAX))
                    .map_err(ce("normalising"))?;
                pooled.broadcast_div(&norm).map_err(ce("normalising"))?
            } else {
                pooled
            };
            let rows: Vec<Vec<f32>> = pooled.to_vec2().map_err(ce("output"))?;
            if pass > 0 {
                times.push(start.elapsed().as_secs_f64());
            } else if first_non_finite.is_none() && rows.iter().flatten().any(|v| !v.is_finite()) {
                first_non_finite = bert
                    .first_non_finite(ids, types, mask_t)
                    .map_err(ce("running the model"))?;
            }
            pass_embeddings.extend(rows);
        }
        if pass == 0 {
            embeddings = pass_embeddings;
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times.get(times.len() / 2).copied().unwrap_or(0.0);
    let total: f64 = times.iter().sum::<f64>() / timed_runs.max(1) as f64;
    Ok(Run {
        embeddings,
        median_batch_s: median,
        tokens_per_s: if total > 0.0 {
            tokens as f64 / total
        } else {
            0.0
        },
        first_non_finite,
    })
}
