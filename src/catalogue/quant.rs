//! What the catalogue records of a quantized checkpoint: which tensors are scaled FP8 payloads
//! and which their scales, and how each scale covers its payload; which weights are packed in
//! a low-bit scheme and the parts they are read from. Found by
//! [`crate::quant::detect`]; used by the plan and the executor through [`crate::quant`].

/// A weight stored packed in a low-bit scheme: how its stored parts give its values (read by
/// [`crate::source::Sources`] through the pure kernels of [`crate::cast::packed`]).
#[derive(Debug, Clone)]
pub struct Decode {
    /// The scheme's arithmetic and geometry.
    pub packing: crate::cast::packed::Packing,
    /// The stored tensors the values come from, in the order the packing names them (payload
    /// first).
    pub parts: Vec<super::TensorEntry>,
    /// The scheme, in words, with its parts' names (`mxfp4: `X_blocks`, `X_scales``).
    pub what: String,
}

/// How a scale tensor covers its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScaleLayout {
    /// One scale for the whole tensor (shape `()`, `(1,)` or `(1, 1)`).
    Tensor,
    /// One scale per output row (shape `(out, 1)` or `(out,)`).
    Channel,
    /// One scale per `rows x cols` block of a 2-D weight; edge blocks may be partial.
    Block(u64, u64),
}

impl ScaleLayout {
    /// What the plan says: `per tensor`, `per channel`, `block 128x128`.
    pub fn describe(self) -> String {
        match self {
            ScaleLayout::Tensor => "per tensor".into(),
            ScaleLayout::Channel => "per channel".into(),
            ScaleLayout::Block(r, c) => format!("block {r}x{c}"),
        }
    }
}

/// A payload tensor and the scale that gives its values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scaled {
    /// Catalogue index of the payload (FP8 values).
    pub payload: usize,
    /// Catalogue index of its scale.
    pub scale: usize,
    /// How the scale covers the payload.
    pub layout: ScaleLayout,
}

/// What a tensor is to the quantization scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Scaled values; the scale is the catalogue tensor given.
    Payload(usize, ScaleLayout),
    /// The scale of a payload.
    Scale,
    /// Another tensor of the scheme (activation scales, markers): meaningless once dequantized.
    Companion,
}

/// Where the scheme was declared (what a dequantized output must no longer say).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Declared {
    /// `config.json` holds a `quantization_config`.
    pub config: bool,
    /// The folder holds `hf_quant_config.json` (ModelOpt).
    pub hf_quant_config: bool,
    /// The safetensors metadata holds `_quantization_metadata` (ComfyUI).
    pub metadata: bool,
}

/// A quantized input: the scheme, every payload with its scale, and what else belongs to it.
#[derive(Debug, Clone, Default)]
pub struct Quantization {
    /// The scheme, in words (`fp8 (DeepSeek/vLLM block scales)`, `compressed-tensors
    /// float-quantized`, ...).
    pub scheme: String,
    /// Where it was found (`config.json quantization_config`, `tensor names`, ...).
    pub found_in: String,
    /// Payloads and their scales.
    pub scaled: Vec<Scaled>,
    /// Other tensors of the scheme (catalogue indices).
    pub companions: Vec<usize>,
    /// Why weightcast cannot dequantize it, when it cannot.
    pub unsupported: Option<String>,
    /// Where the scheme is declared.
    pub declared: Declared,
    /// For packed low-bit weights: the tensors as stored (payloads, scales, zero points), which
    /// the catalogue lists as the weights they decode into; `--on-quantized keep` writes these.
    pub stored: Option<Vec<super::TensorEntry>>,
}

impl Quantization {
    /// What catalogue tensor `i` is to the scheme.
    pub fn role(&self, i: usize) -> Option<Role> {
        if let Some(s) = self.scaled.iter().find(|s| s.payload == i) {
            return Some(Role::Payload(s.scale, s.layout));
        }
        if self.scaled.iter().any(|s| s.scale == i) {
            return Some(Role::Scale);
        }
        self.companions.contains(&i).then_some(Role::Companion)
    }

    /// The layouts in use, for a one-line summary (`block 128x128`, `per channel`).
    pub fn layouts(&self) -> Vec<String> {
        let mut v: Vec<String> = self.scaled.iter().map(|s| s.layout.describe()).collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Which FP4 layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fp4Kind {
    /// NVFP4: E4M3 scales per 16 values, an f32 global scale.
    Nv,
    /// MXFP4: E8M0 exponents per 32 values.
    Mx,
    /// MXFP4 in gpt-oss's MoE expert layout: `X` `[E, I, R]` stored as `X_blocks`
    /// `[E, R, I/32, 16]` and `X_scales` `[E, R, I/32]`, groups of 32 along `I`.
    GptOss,
}

/// One tensor of an FP4 output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp4Part {
    /// `X.weight_packed`: the values, two per byte.
    Packed,
    /// `X.weight_scale`: one scale per group.
    Scale,
    /// `X.weight_global_scale` (NVFP4).
    Global,
}
