//! `inspect`: what a file or folder holds, read without the data.

use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;

use crate::audit::Class;
use crate::catalogue::Catalogue;
use crate::quant::Role;

use super::document::Ordered;

/// `inspect --json`.
#[derive(Debug, Clone, Serialize)]
pub struct InspectDoc {
    /// A quantized input's scheme.
    pub quantization: Option<Value>,
    /// The input.
    pub path: PathBuf,
    /// Its format, in words.
    pub format: &'static str,
    /// Its weights files.
    pub files: Vec<Value>,
    /// Tensors.
    pub tensor_count: usize,
    /// Parameters.
    pub parameter_count: u64,
    /// Tensor bytes.
    pub bytes: u64,
    /// Per dtype: tensors, parameters, bytes.
    pub dtypes: Ordered<Value>,
    /// The files' metadata.
    pub metadata: Ordered<String>,
    /// The pickle's globals by class.
    pub globals: Globals,
    /// What reading found (tensors left out, tied weights).
    pub notes: Vec<String>,
    /// Every tensor.
    pub tensors: Vec<InspectTensor>,
    /// A GGUF input: version, architecture, every metadata key (arrays summarised) and every
    /// tensor with its ggml type (block-quantized ones included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gguf: Option<Value>,
}

/// The pickle's globals by class.
#[derive(Debug, Clone, Serialize)]
pub struct Globals {
    /// In torch's weights-only allowlist.
    pub allowed: Vec<String>,
    /// Neither allowed nor known dangerous.
    pub other: Vec<String>,
    /// Known to run code.
    pub dangerous: Vec<String>,
}

/// One tensor.
#[derive(Debug, Clone, Serialize)]
pub struct InspectTensor {
    /// Its name.
    pub name: String,
    /// Its dtype.
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Its bytes.
    pub bytes: u64,
    /// The file it is in.
    pub file: String,
    /// The class of the module that holds it (a pickled module).
    pub module_class: Option<String>,
    /// A GGUF tensor in a ggml block type: the type its f32 values are dequantized from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ggml_type: Option<&'static str>,
    /// What it is to a quantization scheme (quantized inputs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Value>,
}

/// `inspect --json`'s document of `cat`.
pub fn inspect(cat: &Catalogue) -> InspectDoc {
    use serde_json::json;
    let of = |c: Class| -> Vec<String> {
        cat.globals
            .iter()
            .filter(|g| g.1 == c)
            .map(|g| g.0.clone())
            .collect()
    };
    InspectDoc {
        quantization: cat.quant.as_deref().map(|q| {
            json!({
                "scheme": q.scheme, "found_in": q.found_in, "layouts": q.layouts(),
                "payloads": q.scaled.len(), "unsupported": q.unsupported,
            })
        }),
        path: cat.path.clone(),
        format: cat.describe(),
        files: cat
            .files
            .iter()
            .map(|f| json!({"name": f.name, "bytes": f.len}))
            .collect(),
        tensor_count: cat.tensors.len(),
        parameter_count: cat.total_params(),
        bytes: cat.total_bytes(),
        dtypes: Ordered(
            cat.dtype_totals()
                .into_iter()
                .map(|(d, n, p, b)| {
                    (
                        d.to_string(),
                        json!({"tensors": n, "parameters": p, "bytes": b}),
                    )
                })
                .collect(),
        ),
        metadata: Ordered(cat.metadata()),
        globals: Globals {
            allowed: of(Class::Allowed),
            other: of(Class::Other),
            dangerous: of(Class::Dangerous),
        },
        notes: cat.notes.clone(),
        tensors: cat
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| InspectTensor {
                name: t.name.clone(),
                dtype: t.dtype.to_string(),
                shape: t.shape.clone(),
                bytes: t.nbytes,
                file: cat.files[t.file].name.clone(),
                module_class: t.module_class.clone(),
                ggml_type: t.blocks.map(|b| b.ggml.name),
                role: cat.quant.as_deref().map(|q| match q.role(i) {
                    Some(Role::Payload(s, l)) => json!({
                        "payload": {"scale": cat.tensors[s].name, "layout": l.describe()}}),
                    Some(Role::Scale) => json!("scale"),
                    Some(Role::Companion) => json!("companion"),
                    None => match &t.decode {
                        Some(d) => json!({"packed": {
                            "scheme": d.what,
                            "parts": d.parts.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
                        }}),
                        None => Value::Null,
                    },
                }),
            })
            .collect(),
        gguf: cat.gguf.as_deref().map(gguf_doc),
    }
}

/// Arrays longer than this show their first items and their length.
const ARRAY_SHOWN: usize = 8;

fn gguf_doc(g: &crate::catalogue::gguf::GgufDoc) -> Value {
    use serde_json::json;
    let quantized: Vec<_> = g.quantized().collect();
    json!({
        "version": g.version,
        "architecture": g.architecture(),
        "alignment": g.alignment,
        "data_offset": g.data_offset,
        "metadata": Ordered(g.metadata.iter().map(|(k, v)| {
            (k.clone(), json!({"type": v.type_name(), "value": v.to_json(ARRAY_SHOWN)}))
        }).collect()),
        "tensors": g.tensors.iter().map(|t| json!({
            "name": t.name, "ggml_type": t.ggml.name,
            "shape": t.dims.iter().rev().collect::<Vec<_>>(), "gguf_dims": t.dims,
            "bytes": t.nbytes, "offset": t.offset,
        })).collect::<Vec<_>>(),
        "block_quantized": crate::formats::gguf::type_counts(&quantized)
            .into_iter().map(|(n, c)| json!({"ggml_type": n, "tensors": c}))
            .collect::<Vec<_>>(),
    })
}
