//! A GGUF file of the llama, qwen2 or qwen3 architecture read back as the Hugging Face checkpoint
//! it came from,
//! as transformers loads it (`from_pretrained(..., gguf_file=)`, `load_gguf_checkpoint`): the
//! tensors under their Hugging Face names, the q/k projections' rows permuted back
//! (`_reverse_permute_weights`), and a `config.json`, `generation_config.json` and the
//! tokenizer (`tokenizer.model` rebuilt from the vocabulary, `tokenizer_config.json`) written
//! beside them in a temporary folder that a folder output copies.

use std::path::PathBuf;

use serde_json::{json, Map, Value as Json};

use crate::catalogue::gguf::{GgufDoc, Value};
use crate::catalogue::{Catalogue, FolderInfo, Rows};
use crate::error::{Error, Result};

/// The architectures read back, with their Hugging Face class.
fn hf_class(arch: &str) -> Option<&'static str> {
    Some(match arch {
        "llama" => "LlamaForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        _ => return None,
    })
}

/// The Hugging Face name of a llama, qwen2 or qwen3 GGUF tensor (`arch`).
fn hf_name(gguf: &str, block_count: u64, arch: &str) -> Option<String> {
    let map = if arch == "qwen3" {
        &super::names::QWEN3
    } else {
        &super::names::LLAMA
    };
    map.hf_name(gguf, block_count)
}

fn uint(doc: &GgufDoc, key: &str) -> Option<u64> {
    match doc.get(key)? {
        Value::U(v, _) => Some(*v),
        Value::I(v, _) => u64::try_from(*v).ok(),
        _ => None,
    }
}

fn float(doc: &GgufDoc, key: &str) -> Option<f64> {
    match doc.get(key)? {
        Value::F32(v) => Some(f64::from(*v)),
        Value::F(v, _) => Some(*v),
        _ => None,
    }
}

/// Why a GGUF file keeps its own names in a non-GGUF output, or `None` when it is read as a
/// Hugging Face llama checkpoint.
fn unmapped(cat: &Catalogue, doc: &GgufDoc) -> Option<String> {
    let arch = doc.architecture().unwrap_or("?");
    if hf_class(arch).is_none() {
        return Some(format!(
            "architecture `{arch}` has no Hugging Face mapping here (llama, qwen2, qwen3)"
        ));
    }
    let blocks = uint(doc, &format!("{arch}.block_count")).unwrap_or(0);
    cat.tensors
        .iter()
        .find(|t| hf_name(&t.name, blocks, arch).is_none())
        .map(|t| format!("tensor `{}` has no Hugging Face name", t.name))
}

/// The catalogue of a llama GGUF file as the Hugging Face checkpoint transformers loads from it
/// (names, q/k rows, a folder of `config.json`, `generation_config.json` and the tokenizer);
/// any other GGUF file as it is, with a note saying why.
pub fn as_hugging_face(mut cat: Catalogue) -> Result<Catalogue> {
    let Some(doc) = cat.gguf.clone() else {
        return Ok(cat);
    };
    if let Some(why) = unmapped(&cat, &doc) {
        cat.notes
            .push(format!("the output keeps the GGUF tensor names: {why}"));
        return Ok(cat);
    }
    let arch = doc.architecture().unwrap_or("").to_string();
    let blocks = uint(&doc, &format!("{arch}.block_count")).unwrap_or(0);
    let heads = uint(&doc, &format!("{arch}.attention.head_count")).unwrap_or(0);
    let kv = uint(&doc, &format!("{arch}.attention.head_count_kv")).unwrap_or(heads);
    // only llama's converter permutes the q/k rows
    let permuted = arch == "llama";
    for t in &mut cat.tensors {
        let name = hf_name(&t.name, blocks, &arch).expect("checked");
        let h = if !permuted {
            None
        } else if t.name.starts_with("blk.") && t.name.contains(".attn_q.") {
            Some(heads)
        } else if t.name.starts_with("blk.") && t.name.contains(".attn_k.") {
            Some(kv)
        } else {
            None
        };
        if let Some(h) = h {
            let rows = t.shape.first().copied().unwrap_or(0);
            if h == 0 || rows % (2 * h) != 0 {
                return Err(Error::invalid(
                    &cat.path,
                    format!(
                        "tensor `{}`: {rows} rows do not split into {h} heads of row pairs",
                        t.name
                    ),
                ));
            }
            t.rows = Some(Rows {
                heads: h,
                undo: true,
            });
        }
        t.name = name;
    }
    let dir = tempfile::Builder::new()
        .prefix("weightcast-gguf-")
        .tempdir()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let tied = !doc.tensors.iter().any(|t| t.name == "output.weight");
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        ("config.json", pretty(&config(&doc, &arch, tied))),
        ("generation_config.json", pretty(&generation(&doc))),
    ];
    if let Some(tok) = super::vocab::tokenizer_files(&doc, &arch)? {
        files.extend(tok);
    }
    let mut other = Vec::new();
    for (name, bytes) in files {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
        other.push(PathBuf::from(name));
    }
    cat.folder = Some(FolderInfo {
        dir: dir.path().to_path_buf(),
        other_files: other,
        index_name: None,
        keep: Some(std::sync::Arc::new(dir)),
    });
    Ok(cat)
}

fn pretty(v: &Json) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(v).expect("JSON");
    s.push('\n');
    s.into_bytes()
}

/// The special token ids a config carries, from the tokenizer keys (transformers' GGUF
/// mapping puts `unk_token_id` in the model config too).
fn token_ids(doc: &GgufDoc, into: &mut Map<String, Json>, unk: bool) {
    for (key, name) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.unknown_token_id", "unk_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if name == "unk_token_id" && !unk {
            continue;
        }
        if let Some(v) = uint(doc, key) {
            into.insert(name.into(), v.into());
        }
    }
}

/// `config.json`: what transformers' GGUF loader maps for llama (`GGUF_CONFIG_MAPPING`), the
/// vocabulary size from the tokens when the file has no `llama.vocab_size`, and
/// `tie_word_embeddings` when there is no `output.weight`.
fn config(doc: &GgufDoc, arch: &str, tied: bool) -> Json {
    let mut c = Map::new();
    c.insert(
        "architectures".into(),
        json!([hf_class(arch).unwrap_or("LlamaForCausalLM")]),
    );
    c.insert("model_type".into(), arch.into());
    // rope.dimension_count is llama's head_dim; qwen3's is its key length (transformers'
    // mapping leaves it out, so its loader falls back to Qwen3Config's 128)
    let head_dim = match arch {
        "llama" => "rope.dimension_count",
        "qwen3" => "attention.key_length",
        _ => "",
    };
    for (key, name) in [
        ("context_length", "max_position_embeddings"),
        ("block_count", "num_hidden_layers"),
        ("feed_forward_length", "intermediate_size"),
        ("embedding_length", "hidden_size"),
        (head_dim, "head_dim"),
        ("attention.head_count", "num_attention_heads"),
        ("attention.head_count_kv", "num_key_value_heads"),
        ("vocab_size", "vocab_size"),
    ] {
        if let Some(v) = uint(doc, &format!("{arch}.{key}")).filter(|_| !key.is_empty()) {
            c.insert(name.into(), v.into());
        }
    }
    if let Some(e) = float(doc, &format!("{arch}.attention.layer_norm_rms_epsilon")) {
        c.insert("rms_norm_eps".into(), e.into());
    }
    if !c.contains_key("vocab_size") {
        if let Some(Value::Array(_, items)) = doc.get("tokenizer.ggml.tokens") {
            c.insert("vocab_size".into(), items.len().into());
        }
    }
    let theta = float(doc, &format!("{arch}.rope.freq_base")).unwrap_or(10000.0);
    c.insert(
        "rope_parameters".into(),
        json!({"rope_theta": theta, "rope_type": "default"}),
    );
    c.insert("tie_word_embeddings".into(), tied.into());
    token_ids(doc, &mut c, true);
    Json::Object(c)
}

/// `generation_config.json`: the special token ids, and the sampling defaults the file
/// carries (`general.sampling.*`, with `do_sample`).
fn generation(doc: &GgufDoc) -> Json {
    let mut g = Map::new();
    token_ids(doc, &mut g, false);
    for (key, name) in [
        ("general.sampling.temp", "temperature"),
        ("general.sampling.top_p", "top_p"),
        ("general.sampling.min_p", "min_p"),
        ("general.sampling.penalty_repeat", "repetition_penalty"),
    ] {
        if let Some(Value::F32(v)) = doc.get(key) {
            // the shortest decimal that is this float32 (0.7, not 0.699999988079071)
            let v: f64 = v.to_string().parse().unwrap_or(f64::from(*v));
            g.insert(name.into(), v.into());
        }
    }
    if let Some(Value::I(v, _)) = doc.get("general.sampling.top_k") {
        g.insert("top_k".into(), (*v).into());
    }
    // sampling defaults mean sampling (transformers ignores them, with a warning, otherwise)
    if ["temperature", "top_p", "min_p", "top_k"]
        .iter()
        .any(|k| g.contains_key(*k))
    {
        g.insert("do_sample".into(), true.into());
    }
    Json::Object(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_back() {
        assert_eq!(
            hf_name("blk.1.attn_q.weight", 2, "llama").as_deref(),
            Some("model.layers.1.self_attn.q_proj.weight")
        );
        let out = hf_name("output.weight", 2, "llama");
        assert_eq!(out.as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("blk.2.attn_q.weight", 2, "llama"), None);
        assert_eq!(hf_name("rope_freqs.weight", 2, "llama"), None);
        assert_eq!(hf_name("blk.0.attn_q_norm.weight", 2, "llama"), None);
        assert_eq!(
            hf_name("blk.0.attn_q_norm.weight", 2, "qwen3").as_deref(),
            Some("model.layers.0.self_attn.q_norm.weight")
        );
    }
}
