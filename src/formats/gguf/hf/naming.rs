//! The `general.*` naming keys `convert_hf_to_gguf.py` derives from a model's folder name and
//! its `config.json` `_name_or_path`, ported from gguf-py's `metadata.py`
//! (`get_model_id_components`, `id_to_title`) and `utility.py` (`size_label`) as vendored by
//! llama-cpp-python 0.3.36.

use regex::Regex;
use std::sync::LazyLock;

/// What a model id says of a model: (name, organization, basename, finetune, version,
/// size label).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IdParts {
    /// The id without its organization.
    pub name: Option<String>,
    /// The organization (before `/`).
    pub organization: Option<String>,
    /// Base name.
    pub basename: Option<String>,
    /// Fine-tune.
    pub finetune: Option<String>,
    /// Version.
    pub version: Option<String>,
    /// Size label (`7B`).
    pub size_label: Option<String>,
}

static VERSION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^(?:(v|iter)?\d+([.]\d+)*)$").expect("regex"));
static QUANT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^(?:i?q\d(_\w)*|b?fp?(16|32))$").expect("regex"));
static SIZE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)^(?:(([A]|\d+[x])?\d+([._]\d+)?[KMBT][\d]?|small|mini|medium|large|x?xl))$")
        .expect("regex")
});
static FINETUNE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^(?:chat|instruct|vision|lora)$").expect("regex"));
static NUMBERISH: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(v\d+(?:\.\d+)*|\d.*)$").expect("regex"));

fn is_cased(c: char) -> bool {
    c.is_lowercase() || c.is_uppercase()
}

/// Python's `str.islower()`.
fn py_islower(s: &str) -> bool {
    s.chars().any(is_cased) && !s.chars().any(|c| c.is_uppercase())
}

/// Python's `str.title()`: a cased letter after a cased one is lowered, others raised.
fn py_title(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut prev_cased = false;
    for c in s.chars() {
        if prev_cased {
            out.extend(c.to_lowercase());
        } else {
            out.extend(c.to_uppercase());
        }
        prev_cased = is_cased(c);
    }
    out
}

/// `Metadata.id_to_title`: words title-cased unless they are acronyms or version numbers.
pub fn id_to_title(s: &str) -> String {
    s.trim()
        .replace('-', " ")
        .split_whitespace()
        .map(|w| {
            if py_islower(w) && !NUMBERISH.is_match(w) {
                py_title(w)
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Default, Clone)]
struct Kinds {
    basename: bool,
    size_label: bool,
    finetune: bool,
    version: bool,
    typ: bool,
}

impl Kinds {
    fn count(&self) -> usize {
        [
            self.basename,
            self.size_label,
            self.finetune,
            self.version,
            self.typ,
        ]
        .iter()
        .filter(|b| **b)
        .count()
    }
}

/// A size part normalised as `get_model_id_components` does (`7b` -> `7B`, `7b1` -> `7.1B`);
/// whether it is a context length rather than a size (then lowered, a finetune).
fn size_part(part: &str, total_params: i64) -> (String, bool) {
    let mut p: Vec<char> = part.replace('_', ".").chars().collect();
    if p.last().is_some_and(|c| c.is_ascii_digit()) && p.len() >= 2 {
        let n = p.len();
        let (a, b) = (p[n - 2], p[n - 1]);
        p.truncate(n - 2);
        p.extend(['.', b, a]);
    }
    let n = p.len();
    if n > 1 && p[n - 2].is_ascii_digit() && "kmbt".contains(p[n - 1]) {
        p[n - 1] = p[n - 1].to_ascii_uppercase();
    }
    let mut finetune = false;
    if total_params != 0 {
        let n = p.len();
        let num: String = p[..n - 1].iter().collect();
        if let Ok(v) = num.parse::<f64>() {
            let exp = " KMBT".find(p[n - 1]).map(|i| i as i32).unwrap_or(-1);
            let label = v * 1000f64.powi(exp);
            let far = if total_params < 0 {
                label < (total_params.abs() / 8) as f64
            } else {
                (label - total_params as f64).abs() > (7 * total_params).div_euclid(8) as f64
            };
            if far {
                finetune = true;
                let last = p[n - 1].to_lowercase().next().unwrap_or(p[n - 1]);
                p[n - 1] = last;
            }
        }
    }
    (p.into_iter().collect(), finetune)
}

/// `Metadata.get_model_id_components`.
pub fn model_id_components(model_id: &str, total_params: i64) -> IdParts {
    if model_id.contains(' ') {
        return IdParts {
            name: Some(model_id.to_string()),
            ..IdParts::default()
        };
    }
    let (mut org, full) = match model_id.split_once('/') {
        Some((o, n)) => (Some(o.to_string()), n.to_string()),
        None => (None, model_id.to_string()),
    };
    if org.as_deref().is_some_and(|o| o.starts_with('.')) {
        org = None;
    }
    let mut parts: Vec<String> = full
        .split('-')
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect();
    let mut kinds = vec![Kinds::default(); parts.len()];
    for i in 0..parts.len() {
        let part = parts[i].clone();
        if VERSION.is_match(&part) {
            kinds[i].version = true;
        } else if QUANT.is_match(&part) {
            kinds[i].typ = true;
            parts[i] = part.to_uppercase();
        } else if i > 0 && SIZE.is_match(&part) {
            let (p, finetune) = size_part(&part, total_params);
            kinds[i].finetune = finetune;
            if kinds[i].count() == 0 {
                kinds[i].size_label = true;
            }
            parts[i] = p;
        } else if i > 0 && FINETUNE.is_match(&part) {
            if total_params < 0 && part.eq_ignore_ascii_case("lora") {
                kinds[i].typ = true;
            } else {
                kinds[i].finetune = true;
            }
        }
    }
    // word sizes go when a numeric one is there
    let numeric_size = parts
        .iter()
        .zip(&kinds)
        .any(|(p, k)| k.size_label && p.chars().any(|c| c.is_numeric()));
    if numeric_size {
        for (p, k) in parts.iter().zip(kinds.iter_mut()) {
            if k.size_label && p.chars().all(|c| c.is_alphabetic()) {
                k.size_label = false;
            }
        }
    }
    let mut at_start = true;
    for (p, k) in parts.iter().zip(kinds.iter_mut()) {
        let alpha_first = p.chars().next().is_some_and(|c| c.is_alphabetic());
        if at_start && ((k.count() == 0 && alpha_first) || k.version) {
            k.basename = true;
        } else {
            at_start = false;
            if k.count() == 0 {
                k.finetune = true;
            }
        }
    }
    for k in kinds.iter_mut().rev() {
        if k.basename && k.count() > 1 {
            k.basename = false;
        } else {
            break;
        }
    }
    let join = |f: &dyn Fn(&Kinds) -> bool| {
        let mut seen: Vec<&str> = vec![];
        for (p, k) in parts.iter().zip(&kinds) {
            if f(k) {
                seen.push(p);
            }
        }
        (!seen.is_empty()).then(|| seen.join("-"))
    };
    let mut basename = join(&|k| k.basename);
    let size_label = {
        let mut uniq: Vec<&str> = vec![];
        for (p, k) in parts.iter().zip(&kinds) {
            if k.size_label && !uniq.contains(&p.as_str()) {
                uniq.push(p);
            }
        }
        (!uniq.is_empty()).then(|| uniq.join("-"))
    };
    let finetune = join(&|k| k.finetune);
    let version = join(&|k| k.version && !k.basename);
    if size_label.is_none() && finetune.is_none() && version.is_none() {
        basename = None;
    }
    IdParts {
        name: Some(full),
        organization: org,
        basename,
        finetune,
        version,
        size_label,
    }
}

/// `model_weight_count_rounded_notation` (`99K`, `1.1B`).
pub fn rounded_count(n: u64, min_digits: usize) -> String {
    let x = n as f64;
    let (scaled, suffix) = if x > 1e12 {
        (x * 1e-12, "T")
    } else if x > 1e9 {
        (x * 1e-9, "B")
    } else if x > 1e6 {
        (x * 1e-6, "M")
    } else {
        (x * 1e-3, "K")
    };
    let digits = (scaled.round_ties_even() as u64).to_string();
    let fix = min_digits.saturating_sub(digits.trim_start_matches('0').len());
    format!("{scaled:.fix$}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_as_gguf_py() {
        // values from gguf-py 0.3.36's Metadata.get_model_id_components / id_to_title
        assert_eq!(id_to_title("tiny-llama"), "Tiny Llama");
        assert_eq!(id_to_title("Mistral-7B-v0.1"), "Mistral 7B v0.1");
        assert_eq!(py_title("llama3b"), "Llama3B");
        let p = model_id_components("meta-llama/Llama-2-7b-chat-hf", 6_738_415_616);
        assert_eq!(p.name.as_deref(), Some("Llama-2-7b-chat-hf"));
        assert_eq!(p.organization.as_deref(), Some("meta-llama"));
        assert_eq!(p.basename.as_deref(), Some("Llama-2"));
        assert_eq!(p.size_label.as_deref(), Some("7B"));
        assert_eq!(p.finetune.as_deref(), Some("chat-hf"));
        let p = model_id_components("tiny-llama", 98_624);
        assert_eq!(p.basename, None);
        assert_eq!(rounded_count(98_624, 2), "99K");
        assert_eq!(rounded_count(22_565_376, 2), "23M");
        assert_eq!(rounded_count(1_100_048_384, 2), "1.1B");
    }
}
