//! A BERT encoder that runs in f16 and bf16: candle-transformers' own encoder layers
//! (`BertEncoder`), fed with an attention mask built as transformers builds it.
//!
//! candle-transformers 0.11's `BertModel::forward` builds the additive mask as
//! `(1 - mask) * f32::MIN` with both factors cast to the compute dtype first. In f16 and bf16
//! `f32::MIN` becomes `-inf`, and `0 * -inf` is NaN, so every output is NaN whatever the
//! weights. transformers uses `torch.finfo(dtype).min` (-65504 in f16), a finite number. The
//! embedding sum in front of the encoder (word + position + token type, then LayerNorm) is a
//! private type of the crate, so it is assembled here from `candle-nn`'s own layers; the
//! twelve-odd layers that are the model are the crate's.

use candle_core::{DType, Result, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, Module, VarBuilder};
use candle_transformers::models::bert::{BertEncoder, Config};

/// An encoder ready to run: `forward` gives the last hidden state.
pub struct Bert {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
    encoder: BertEncoder,
}

/// The prefix of the model's tensors: none, `bert.`, or the model type (`roberta.`), as
/// `BertModel::load` tries them.
fn prefix(vb: &VarBuilder, config: &Config) -> String {
    let mut tries = vec![String::new(), "bert.".to_string()];
    if let Some(t) = &config.model_type {
        tries.push(format!("{t}."));
    }
    tries
        .into_iter()
        .find(|p| vb.contains_tensor(&format!("{p}embeddings.word_embeddings.weight")))
        .unwrap_or_default()
}

impl Bert {
    /// Loads the weights under `vb` (in the dtype `vb` gives them).
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Bert> {
        let p = prefix(&vb, config);
        let vb = if p.is_empty() {
            vb
        } else {
            vb.pp(p.trim_end_matches('.'))
        };
        let e = vb.pp("embeddings");
        let h = config.hidden_size;
        Ok(Bert {
            word: embedding(config.vocab_size, h, e.pp("word_embeddings"))?,
            position: embedding(
                config.max_position_embeddings,
                h,
                e.pp("position_embeddings"),
            )?,
            token_type: embedding(config.type_vocab_size, h, e.pp("token_type_embeddings"))?,
            norm: layer_norm(h, config.layer_norm_eps, e.pp("LayerNorm"))?,
            encoder: BertEncoder::load(vb.pp("encoder"), config)?,
        })
    }

    /// The last hidden state for `ids` (batch, len) with `mask` (batch, len; 1 = token).
    pub fn forward(&self, ids: &Tensor, token_types: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.forward_layers(ids, token_types, mask, self.encoder.layers.len())
    }

    /// The hidden state after the embeddings and the first `layers` encoder layers.
    pub fn forward_layers(
        &self,
        ids: &Tensor,
        token_types: &Tensor,
        mask: &Tensor,
        layers: usize,
    ) -> Result<Tensor> {
        let (_, len) = ids.dims2()?;
        let positions = Tensor::arange(0u32, len as u32, ids.device())?;
        let x = (self.word.forward(ids)? + self.token_type.forward(token_types)?)?
            .broadcast_add(&self.position.forward(&positions)?)?;
        let x = self.norm.forward(&x)?;
        if layers == 0 {
            return Ok(x);
        }
        let mask = additive_mask(mask, x.dtype())?;
        if layers >= self.encoder.layers.len() {
            return self.encoder.forward(&x, &mask);
        }
        // The crate runs a layer only through its encoder: a copy (the weights are shared)
        // holding the first `layers`.
        let mut prefix = self.encoder.clone();
        prefix.layers.truncate(layers);
        prefix.forward(&x, &mask)
    }

    /// Where NaN or inf first appears for this batch: `embeddings`, `encoder.layer.N`, or None
    /// when the output is finite. A binary search over prefixes of the encoder (non-finite
    /// values do not heal: LayerNorm of inf is NaN, and NaN spreads).
    pub fn first_non_finite(
        &self,
        ids: &Tensor,
        token_types: &Tensor,
        mask: &Tensor,
    ) -> Result<Option<String>> {
        let bad = |k: usize| -> Result<bool> {
            let h = self.forward_layers(ids, token_types, mask, k)?;
            let finite = h
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|v| v.is_finite());
            Ok(!finite)
        };
        let n = self.encoder.layers.len();
        if !bad(n)? {
            return Ok(None);
        }
        // The smallest k (0 = the embeddings) whose prefix output is non-finite.
        let (mut lo, mut hi) = (0usize, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if bad(mid)? {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(Some(if lo == 0 {
            "embeddings".to_string()
        } else {
            format!("encoder.layer.{}", lo - 1)
        }))
    }
}

/// The smallest finite value of a floating dtype (`torch.finfo(dtype).min`).
pub fn finfo_min(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -65504.0,
        DType::BF16 => -3.3895313892515355e38,
        DType::F64 => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// `(1 - mask) * finfo(dtype).min`, shaped (batch, 1, 1, len) to add to attention scores:
/// 0 where a token is, the most negative finite value where padding is.
pub fn additive_mask(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let m = mask.unsqueeze(1)?.unsqueeze(1)?.to_dtype(DType::F32)?;
    // 1 - m is exactly 0 or 1, so the product is exactly 0 or min: no rounding, no 0 * inf.
    let neg = m.affine(-1.0, 1.0)?.affine(finfo_min(dtype), 0.0)?;
    neg.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn mask_is_finite_in_every_dtype() {
        let mask = Tensor::new(&[[1u32, 1, 0]], &Device::Cpu).unwrap();
        for dt in [DType::F16, DType::BF16, DType::F32] {
            let m: Vec<f32> = additive_mask(&mask, dt)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(m[..2], [0.0, 0.0], "{dt:?}");
            assert!(m[2].is_finite() && m[2] < -6e4, "{dt:?}: {}", m[2]);
        }
    }
}
