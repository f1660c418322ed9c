//! The tokenizer keys `convert_hf_to_gguf.py` writes for a SentencePiece (`tokenizer.model`)
//! vocabulary, and gguf-py's `SpecialVocab` (special token ids, `add_*_token`, the chat
//! template), as vendored by llama-cpp-python 0.3.36.
//!
//! `tokenizer.model` is a protobuf `ModelProto`; only its pieces (field 1: piece, score, type)
//! are read, by a bounded walk over the bytes.

use std::path::Path;

use serde_json::Value as Json;

use crate::catalogue::gguf::Value;
use crate::error::{Error, Result};

/// One SentencePiece piece: its text, score and type (`ModelProto.SentencePiece.Type`).
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// Its text.
    pub text: String,
    /// Its score.
    pub score: f32,
    /// NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6.
    pub kind: u64,
}

struct Proto<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Proto<'_> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.pos)?;
            self.pos += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// The next field: (number, wire type, its bytes for length-delimited / fixed ones, its
    /// value for varints).
    fn field(&mut self) -> Option<(u64, u64, &[u8], u64)> {
        let key = self.varint()?;
        let (num, wire) = (key >> 3, key & 7);
        let take = |s: &mut Self, n: usize| -> Option<&[u8]> {
            let end = s.pos.checked_add(n).filter(|&e| e <= s.b.len())?;
            let out = &s.b[s.pos..end];
            s.pos = end;
            Some(out)
        };
        match wire {
            0 => {
                let v = self.varint()?;
                Some((num, wire, &[], v))
            }
            1 => take(self, 8).map(|s| (num, wire, s, 0)),
            2 => {
                let n = usize::try_from(self.varint()?).ok()?;
                take(self, n).map(|s| (num, wire, s, 0))
            }
            5 => take(self, 4).map(|s| (num, wire, s, 0)),
            _ => None,
        }
    }
}

/// The pieces of a SentencePiece `tokenizer.model`.
pub fn sentencepiece(path: &Path) -> Result<Vec<Piece>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_sentencepiece(path, &bytes)
}

/// The pieces of a SentencePiece model's bytes (`path` names it in errors).
pub fn parse_sentencepiece(path: &Path, bytes: &[u8]) -> Result<Vec<Piece>> {
    let bad = |pos: usize| {
        Error::invalid(
            path,
            format!("byte {pos}: not a SentencePiece model (protobuf ModelProto)"),
        )
    };
    let mut top = Proto { b: bytes, pos: 0 };
    let mut pieces = Vec::new();
    while top.pos < bytes.len() {
        let at = top.pos;
        let (num, wire, body, _) = top.field().ok_or_else(|| bad(at))?;
        if num != 1 || wire != 2 {
            continue;
        }
        let mut p = Piece {
            text: String::new(),
            score: 0.0,
            kind: 1,
        };
        let mut inner = Proto { b: body, pos: 0 };
        while inner.pos < body.len() {
            let (n, w, s, v) = inner.field().ok_or_else(|| bad(at))?;
            match (n, w) {
                (1, 2) => p.text = String::from_utf8(s.to_vec()).map_err(|_| bad(at))?,
                (2, 5) => p.score = f32::from_le_bytes(s.try_into().expect("4 bytes")),
                (3, 0) => p.kind = v,
                _ => {}
            }
        }
        pieces.push(p);
    }
    if pieces.is_empty() {
        return Err(bad(0));
    }
    Ok(pieces)
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::invalid(path, format!("not JSON: {e}")))
}

/// `_create_vocab_sentencepiece` + `_set_vocab_sentencepiece`: the tokenizer keys, in order,
/// for a vocabulary of `vocab_size` (`config.json`'s, or the model's own).
pub fn sentencepiece_keys(dir: &Path, vocab_size: Option<u64>) -> Result<Vec<(String, Value)>> {
    let spm = dir.join("tokenizer.model");
    let pieces = sentencepiece(&spm)?;
    let n = vocab_size.unwrap_or(pieces.len() as u64) as usize;
    if n > 1 << 24 {
        return Err(Error::invalid(
            dir.join("config.json"),
            format!("vocab_size {n} is out of range"),
        ));
    }
    let mut tokens: Vec<String> = (0..n).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000.0f32; n];
    let mut types = vec![5i64; n];
    for (i, p) in pieces.iter().enumerate().take(n) {
        tokens[i] = p.text.clone();
        scores[i] = p.score;
        // as the converter asks SentencePieceProcessor: unknown, control, unused, byte; any
        // other piece (user-defined too) is normal
        types[i] = match p.kind {
            2 | 3 | 5 | 6 => p.kind as i64,
            _ => 1,
        };
    }
    if dir.join("added_tokens.json").is_file() {
        return Err(Error::usage(format!(
            "{}: added_tokens.json is not supported for a GGUF output yet",
            dir.display()
        )));
    }
    if let Some(tc) = read_json(&dir.join("tokenizer_config.json"))? {
        if let Some(Json::Object(decoder)) = tc.get("added_tokens_decoder") {
            if !decoder.is_empty() {
                return Err(Error::usage(format!(
                    "{}: tokenizer_config.json's added_tokens_decoder is not supported for a GGUF output yet",
                    dir.display()
                )));
            }
        }
    }
    let mut kv = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::Str("llama".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::Str("default".into()),
        ),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array("string", tokens.into_iter().map(Value::Str).collect()),
        ),
        (
            "tokenizer.ggml.scores".to_string(),
            Value::Array("float32", scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(
                "int32",
                types.into_iter().map(|t| Value::I(t, "int32")).collect(),
            ),
        ),
    ];
    kv.extend(special_vocab(dir, Some(n as u64))?);
    Ok(kv)
}

const SPECIAL: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

/// The GGUF key of a special token id (`cls` has none: gguf-py skips it).
fn id_key(typ: &str) -> Option<&'static str> {
    Some(match typ {
        "bos" => "tokenizer.ggml.bos_token_id",
        "eos" => "tokenizer.ggml.eos_token_id",
        "unk" => "tokenizer.ggml.unknown_token_id",
        "sep" => "tokenizer.ggml.seperator_token_id",
        "pad" => "tokenizer.ggml.padding_token_id",
        "mask" => "tokenizer.ggml.mask_token_id",
        _ => return None,
    })
}

fn add_key(typ: &str) -> Option<&'static str> {
    Some(match typ {
        "bos" => "tokenizer.ggml.add_bos_token",
        "eos" => "tokenizer.ggml.add_eos_token",
        "sep" => "tokenizer.ggml.add_sep_token",
        _ => return None,
    })
}

/// gguf-py's `SpecialVocab(dir, n_vocab=...)` then `add_to_gguf`, for a folder without
/// `tokenizer.json` post-processing: special ids from `tokenizer_config.json` (through
/// `tokenizer.json`'s added tokens) then `config.json`, `add_*_token`, the chat template.
pub fn special_vocab(dir: &Path, n_vocab: Option<u64>) -> Result<Vec<(String, Value)>> {
    let tok = read_json(&dir.join("tokenizer.json"))?;
    if let Some(t) = &tok {
        if t.get("post_processor").is_some_and(|p| !p.is_null()) {
            return Err(Error::usage(format!(
                "{}: tokenizer.json's post_processor is not supported for a GGUF output yet",
                dir.display()
            )));
        }
        if t.get("normalizer").is_some_and(|p| !p.is_null()) {
            return Err(Error::usage(format!(
                "{}: tokenizer.json's normalizer is not supported for a GGUF output yet",
                dir.display()
            )));
        }
    }
    let mut ids: Vec<(&str, u64)> = vec![];
    let set = |ids: &mut Vec<(&'static str, u64)>, typ: &'static str, v: Option<&Json>| {
        let Some(id) = v.and_then(Json::as_i64) else {
            return Ok(());
        };
        if id < 0 {
            return Err(Error::invalid(
                dir,
                format!("invalid value for special token type {typ}: {id}"),
            ));
        }
        if n_vocab.is_none_or(|n| (id as u64) < n) && !ids.iter().any(|(t, _)| *t == typ) {
            ids.push((typ, id as u64));
        }
        Ok(())
    };
    let mut adds: Vec<(&str, bool)> = vec![];
    let mut chat: Option<String> = None;
    let tc = read_json(&dir.join("tokenizer_config.json"))?
        .filter(|tc| tc.as_object().is_some_and(|o| !o.is_empty()));
    if let Some(tc) = tc {
        let jinja = dir.join("chat_template.jinja");
        let alt = if jinja.is_file() {
            if dir.join("additional_chat_templates").is_dir() {
                return Err(Error::usage(format!(
                    "{}: additional chat templates are not supported for a GGUF output yet",
                    dir.display()
                )));
            }
            Some(Json::String(
                std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?,
            ))
        } else {
            read_json(&dir.join("chat_template.json"))?
                .and_then(|j| j.get("chat_template").cloned())
        };
        match tc.get("chat_template").cloned().or(alt) {
            Some(Json::String(s)) => chat = Some(s),
            Some(Json::Array(_)) => {
                return Err(Error::usage(format!(
                    "{}: a list of chat templates is not supported for a GGUF output yet",
                    dir.display()
                )))
            }
            _ => {}
        }
        let added: Vec<Json> = tok
            .as_ref()
            .and_then(|t| t.get("added_tokens"))
            .and_then(Json::as_array)
            .cloned()
            .unwrap_or_default();
        for typ in SPECIAL {
            if let Some(Json::Bool(b)) = tc.get(format!("add_{typ}_token")) {
                if !adds.iter().any(|(t, _)| *t == typ) {
                    adds.push((typ, *b));
                }
            }
            let content = match tc.get(format!("{typ}_token")) {
                Some(Json::String(s)) => s.clone(),
                Some(Json::Object(o)) => match o.get("content") {
                    Some(Json::String(s)) => s.clone(),
                    _ => continue,
                },
                _ => continue,
            };
            let id = added
                .iter()
                .find(|a| a.get("content").and_then(Json::as_str) == Some(&content))
                .and_then(|a| a.get("id"));
            set(&mut ids, typ, id)?;
        }
    }
    if let Some(cfg) = read_json(&dir.join("config.json"))? {
        for typ in SPECIAL {
            let key = format!("{typ}_token_id");
            let v = cfg
                .get(&key)
                .filter(|v| !v.is_null())
                .or_else(|| cfg.get("text_config").and_then(|t| t.get(&key)));
            set(&mut ids, typ, v)?;
        }
    }
    let mut kv = vec![];
    for (typ, id) in ids {
        if let Some(k) = id_key(typ) {
            kv.push((k.to_string(), Value::U(id, "uint32")));
        }
    }
    for (typ, b) in adds {
        if let Some(k) = add_key(typ) {
            kv.push((k.to_string(), Value::Bool(b)));
        }
    }
    if let Some(c) = chat {
        kv.push(("tokenizer.chat_template".to_string(), Value::Str(c)));
    }
    Ok(kv)
}

fn varint(b: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            b.push(byte);
            return;
        }
        b.push(byte | 0x80);
    }
}

fn field_bytes(b: &mut Vec<u8>, num: u64, bytes: &[u8]) {
    varint(b, num << 3 | 2);
    varint(b, bytes.len() as u64);
    b.extend_from_slice(bytes);
}

fn field_varint(b: &mut Vec<u8>, num: u64, v: u64) {
    varint(b, num << 3);
    varint(b, v);
}

/// A SentencePiece `ModelProto` of `pieces`: BPE (the algorithm llama.cpp's SPM tokenizer
/// runs over the scores), the special ids, byte fallback when there are byte pieces, and the
/// normalizer llama.cpp applies (no normalization, a dummy prefix as `add_space_prefix` says,
/// spaces escaped, repeated whitespace kept).
pub fn sentencepiece_model(pieces: &[Piece], ids: [i64; 4], add_dummy_prefix: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        let mut m = Vec::new();
        field_bytes(&mut m, 1, p.text.as_bytes());
        varint(&mut m, 2 << 3 | 5);
        m.extend(p.score.to_le_bytes());
        field_varint(&mut m, 3, p.kind);
        field_bytes(&mut out, 1, &m);
    }
    let mut trainer = Vec::new();
    field_varint(&mut trainer, 3, 2);
    if pieces.iter().any(|p| p.kind == 6) {
        field_varint(&mut trainer, 35, 1);
    }
    for (num, id) in (40..44).zip(ids) {
        // int32: a negative id is its 64-bit two's complement
        field_varint(&mut trainer, num, id as u64);
    }
    field_bytes(&mut out, 2, &trainer);
    let mut norm = Vec::new();
    field_bytes(&mut norm, 1, b"identity");
    field_varint(&mut norm, 3, add_dummy_prefix as u64);
    field_varint(&mut norm, 4, 0);
    field_varint(&mut norm, 5, 1);
    field_bytes(&mut out, 3, &norm);
    out
}

/// A file to write: its name and bytes.
pub type NamedFile = (&'static str, Vec<u8>);

/// The tokenizer files of a GGUF file's SentencePiece vocabulary (`tokenizer.ggml.model` =
/// `llama`): `tokenizer.model` and `tokenizer_config.json`; `None` for other vocabularies.
pub fn tokenizer_files(doc: &crate::catalogue::gguf::GgufDoc) -> Result<Option<Vec<NamedFile>>> {
    if !matches!(doc.get("tokenizer.ggml.model"), Some(Value::Str(m)) if m == "llama") {
        return Ok(None);
    }
    let Some(Value::Array(_, tokens)) = doc.get("tokenizer.ggml.tokens") else {
        return Ok(None);
    };
    let scores = match doc.get("tokenizer.ggml.scores") {
        Some(Value::Array(_, s)) => s.clone(),
        _ => vec![],
    };
    let types = match doc.get("tokenizer.ggml.token_type") {
        Some(Value::Array(_, t)) => t.clone(),
        _ => vec![],
    };
    let pieces: Vec<Piece> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| Piece {
            text: match t {
                Value::Str(s) => s.clone(),
                _ => String::new(),
            },
            score: match scores.get(i) {
                Some(Value::F32(f)) => *f,
                _ => 0.0,
            },
            kind: match types.get(i) {
                Some(Value::I(k, _)) if (1..=6).contains(k) => *k as u64,
                _ => 1,
            },
        })
        .collect();
    let id = |key: &str| match doc.get(key) {
        Some(Value::U(v, _)) => Some(*v as i64),
        Some(Value::I(v, _)) => Some(*v),
        _ => None,
    };
    let (unk, bos, eos, pad) = (
        id("tokenizer.ggml.unknown_token_id"),
        id("tokenizer.ggml.bos_token_id"),
        id("tokenizer.ggml.eos_token_id"),
        id("tokenizer.ggml.padding_token_id"),
    );
    let unk_or_first = unk.or_else(|| pieces.iter().position(|p| p.kind == 2).map(|i| i as i64));
    let flag = |key: &str| match doc.get(key) {
        Some(Value::Bool(b)) => Some(*b),
        _ => None,
    };
    let model = sentencepiece_model(
        &pieces,
        [
            unk_or_first.unwrap_or(0),
            bos.unwrap_or(-1),
            eos.unwrap_or(-1),
            pad.unwrap_or(-1),
        ],
        flag("tokenizer.ggml.add_space_prefix").unwrap_or(true),
    );
    let text_of = |i: Option<i64>| {
        i.and_then(|i| pieces.get(usize::try_from(i).ok()?))
            .map(|p| Json::String(p.text.clone()))
    };
    let mut tc = serde_json::Map::new();
    tc.insert("tokenizer_class".into(), "LlamaTokenizer".into());
    tc.insert(
        "add_bos_token".into(),
        flag("tokenizer.ggml.add_bos_token").unwrap_or(true).into(),
    );
    tc.insert(
        "add_eos_token".into(),
        flag("tokenizer.ggml.add_eos_token").unwrap_or(false).into(),
    );
    for (name, i) in [
        ("bos_token", bos),
        ("eos_token", eos),
        ("unk_token", unk),
        ("pad_token", pad),
    ] {
        if let Some(t) = text_of(i) {
            tc.insert(name.into(), t);
        }
    }
    if let Some(Value::Str(c)) = doc.get("tokenizer.chat_template") {
        tc.insert("chat_template".into(), c.clone().into());
    }
    let mut config = serde_json::to_string_pretty(&Json::Object(tc)).expect("JSON");
    config.push('\n');
    Ok(Some(vec![
        ("tokenizer.model", model),
        ("tokenizer_config.json", config.into_bytes()),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentencepiece_round_trip_and_bad_bytes() {
        let pieces = vec![
            Piece {
                text: "<unk>".into(),
                score: 0.0,
                kind: 2,
            },
            Piece {
                text: "<s>".into(),
                score: 0.0,
                kind: 3,
            },
            Piece {
                text: "\u{2581}t".into(),
                score: -1.5,
                kind: 1,
            },
            Piece {
                text: "<0x0A>".into(),
                score: 0.0,
                kind: 6,
            },
        ];
        let bytes = sentencepiece_model(&pieces, [0, 1, -1, -1], true);
        let p = Path::new("t.model");
        assert_eq!(parse_sentencepiece(p, &bytes).unwrap(), pieces);
        // every truncation and a sweep of corrupted bytes: an error or pieces, never a panic
        for n in 0..bytes.len() {
            let _ = parse_sentencepiece(p, &bytes[..n]);
        }
        let mut x = 0x9E37_79B9u32;
        for _ in 0..2000 {
            let mut b = bytes.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let i = x as usize % b.len();
                b[i] = (x >> 8) as u8;
            }
            let _ = parse_sentencepiece(p, &b);
        }
        assert!(parse_sentencepiece(p, b"").is_err());
        assert!(parse_sentencepiece(p, &[0x0a, 0xff, 0xff, 0xff]).is_err());
    }
}
