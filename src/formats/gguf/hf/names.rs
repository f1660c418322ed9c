//! Tensor names between Hugging Face checkpoints and GGUF (gguf-py's `TensorNameMap` for the
//! architectures weightcast converts), one table per architecture, read both ways.

/// An architecture's names: whole-model tensors, and per-layer modules under `layers.N.` in
/// the Hugging Face checkpoint and `blk.N.` in GGUF. Each pair is (Hugging Face, GGUF), without
/// the `.weight`/`.bias` suffix.
pub struct TensorMap {
    /// Tensors outside the layers.
    pub fixed: &'static [(&'static str, &'static str)],
    /// The Hugging Face prefix of layer N (`model.layers.`).
    pub layers: &'static str,
    /// Modules of a layer.
    pub modules: &'static [(&'static str, &'static str)],
}

const LLAMA_FIXED: &[(&str, &str)] = &[
    ("model.embed_tokens", "token_embd"),
    ("lm_head", "output"),
    ("model.norm", "output_norm"),
];

const LLAMA_MODULES: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// `LLAMA` (Llama, Mistral) and `QWEN2`.
pub const LLAMA: TensorMap = TensorMap {
    fixed: LLAMA_FIXED,
    layers: "model.layers.",
    modules: LLAMA_MODULES,
};

/// `QWEN3`: Llama's names and the q/k norms.
pub const QWEN3: TensorMap = TensorMap {
    fixed: LLAMA_FIXED,
    layers: "model.layers.",
    modules: &[
        ("input_layernorm", "attn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("post_attention_layernorm", "ffn_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
    ],
};

/// `BERT`.
pub const BERT: TensorMap = TensorMap {
    fixed: &[
        ("embeddings.word_embeddings", "token_embd"),
        ("embeddings.position_embeddings", "position_embd"),
        ("embeddings.token_type_embeddings", "token_types"),
        ("embeddings.LayerNorm", "token_embd_norm"),
    ],
    layers: "encoder.layer.",
    modules: &[
        ("attention.self.query", "attn_q"),
        ("attention.self.key", "attn_k"),
        ("attention.self.value", "attn_v"),
        ("attention.output.dense", "attn_output"),
        ("attention.output.LayerNorm", "attn_output_norm"),
        ("intermediate.dense", "ffn_up"),
        ("output.dense", "ffn_down"),
        ("output.LayerNorm", "layer_output_norm"),
    ],
};

/// A name's base and its `weight`/`bias` suffix.
fn split(name: &str) -> Option<(&str, &str)> {
    match name.rsplit_once('.') {
        Some((b, s @ ("weight" | "bias"))) => Some((b, s)),
        _ => None,
    }
}

impl TensorMap {
    /// Converts `name` between the two namings: `to_gguf` from Hugging Face's, else back.
    fn map(&self, name: &str, block_count: u64, to_gguf: bool) -> Option<String> {
        let (base, suffix) = split(name)?;
        let pick = |&(hf, gguf): &(&'static str, &'static str)| {
            if to_gguf {
                (hf, gguf)
            } else {
                (gguf, hf)
            }
        };
        if let Some((_, to)) = self.fixed.iter().map(pick).find(|(from, _)| *from == base) {
            return Some(format!("{to}.{suffix}"));
        }
        let (from_prefix, to_prefix) = if to_gguf {
            (self.layers, "blk.")
        } else {
            ("blk.", self.layers)
        };
        let (bid, module) = base.strip_prefix(from_prefix)?.split_once('.')?;
        let bid: u64 = bid.parse().ok().filter(|&b| b < block_count)?;
        let (_, to) = self
            .modules
            .iter()
            .map(pick)
            .find(|(from, _)| *from == module)?;
        Some(format!("{to_prefix}{bid}.{to}.{suffix}"))
    }

    /// The GGUF name of Hugging Face tensor `hf`, in a model of `block_count` layers.
    pub fn gguf_name(&self, hf: &str, block_count: u64) -> Option<String> {
        self.map(hf, block_count, true)
    }

    /// The Hugging Face name of GGUF tensor `gguf`.
    pub fn hf_name(&self, gguf: &str, block_count: u64) -> Option<String> {
        self.map(gguf, block_count, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ways() {
        let q = "model.layers.3.self_attn.q_proj.weight";
        assert_eq!(
            LLAMA.gguf_name(q, 4).as_deref(),
            Some("blk.3.attn_q.weight")
        );
        assert_eq!(LLAMA.hf_name("blk.3.attn_q.weight", 4).as_deref(), Some(q));
        assert_eq!(
            LLAMA.gguf_name("lm_head.weight", 4).as_deref(),
            Some("output.weight")
        );
        assert_eq!(
            LLAMA.gguf_name("model.layers.4.mlp.up_proj.weight", 4),
            None
        );
        assert_eq!(LLAMA.gguf_name("model.layers.3.mlp.foo.weight", 4), None);
        assert_eq!(LLAMA.hf_name("blk.0.attn_q_norm.weight", 2), None);
        assert_eq!(
            QWEN3.hf_name("blk.0.attn_q_norm.weight", 2).as_deref(),
            Some("model.layers.0.self_attn.q_norm.weight")
        );
        assert_eq!(
            BERT.gguf_name("encoder.layer.5.output.LayerNorm.bias", 6)
                .as_deref(),
            Some("blk.5.layer_output_norm.bias")
        );
        assert_eq!(
            BERT.gguf_name("encoder.layer.6.output.dense.weight", 6),
            None
        );
        assert_eq!(LLAMA.hf_name("rope_freqs.weight", 2), None);
    }
}
