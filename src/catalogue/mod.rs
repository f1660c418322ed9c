//! The in-memory catalogue: every tensor of an input (one file, a sharded set or a model folder),
//! where its bytes are, and the objects around the tensors (metadata, the folder's other files).
//! Formats build it; planning and conversion read it. It never holds tensor data.

pub mod gguf;
pub mod quant;
pub mod torch;

use std::path::PathBuf;

use crate::dtype::DType;

/// What kind of input the catalogue was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// One `.safetensors` file.
    Safetensors,
    /// A `*.safetensors.index.json` and its shards.
    ShardedSafetensors,
    /// A Hugging Face model folder.
    Folder,
    /// A `torch.save` zip checkpoint.
    Torch,
    /// A legacy (torch < 1.6, stacked pickles) `torch.save` checkpoint.
    TorchLegacy,
    /// A TorchScript archive (`torch.jit.save`).
    TorchScript,
    /// Tensors in the caller's memory (`weightcast.save`).
    Memory,
    /// A llama.cpp GGUF file.
    Gguf,
    /// An ONNX model (`.onnx`, with its external data files).
    Onnx,
}

impl InputKind {
    /// A PyTorch file (torch.save zip, legacy, or TorchScript).
    pub fn is_torch(self) -> bool {
        matches!(
            self,
            InputKind::Torch | InputKind::TorchLegacy | InputKind::TorchScript
        )
    }

    /// A short human name.
    pub fn describe(self) -> &'static str {
        match self {
            InputKind::Safetensors => "safetensors",
            InputKind::ShardedSafetensors => "sharded safetensors",
            InputKind::Folder => "model folder (safetensors)",
            InputKind::Torch => "PyTorch checkpoint (torch.save zip)",
            InputKind::TorchLegacy => "PyTorch checkpoint (legacy stacked pickles)",
            InputKind::TorchScript => "TorchScript archive",
            InputKind::Memory => "tensors in memory",
            InputKind::Gguf => "GGUF (llama.cpp)",
            InputKind::Onnx => "ONNX model",
        }
    }
}

/// One weights file of the input.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Full path.
    pub path: PathBuf,
    /// File name as referenced by an index (`model-00001-of-00002.safetensors`).
    pub name: String,
    /// Length in bytes.
    pub len: u64,
    /// The file's `__metadata__`, in order.
    pub metadata: Option<Vec<(String, String)>>,
    /// Tensor data is stored big-endian (a torch.save `byteorder` of `big`): readers swap it.
    pub big_endian: bool,
    /// A file read by ranges over HTTP(S) or from an object store (`path` is then its URL).
    pub remote: Option<std::sync::Arc<dyn crate::remote::RangeRead>>,
}

impl SourceFile {
    /// A local file of `len` bytes, named after its file name, without metadata.
    pub fn local(path: &std::path::Path, len: u64) -> SourceFile {
        SourceFile {
            path: path.to_path_buf(),
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            len,
            metadata: None,
            big_endian: false,
            remote: None,
        }
    }
}

/// An index into [`Catalogue::tensors`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(pub usize);

impl std::ops::Index<TensorId> for [TensorEntry] {
    type Output = TensorEntry;
    fn index(&self, i: TensorId) -> &TensorEntry {
        &self[i.0]
    }
}

impl std::ops::Index<TensorId> for Vec<TensorEntry> {
    type Output = TensorEntry;
    fn index(&self, i: TensorId) -> &TensorEntry {
        &self[i.0]
    }
}

/// One tensor and where its bytes live.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Name.
    pub name: String,
    /// Element type as stored.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Index into [`Catalogue::files`].
    pub file: usize,
    /// Absolute byte offset of the data in that file.
    pub offset: u64,
    /// Byte length of the data (as a contiguous tensor).
    pub nbytes: u64,
    /// For a non-contiguous view (PyTorch): its layout in the storage, gathered on read.
    pub strided: Option<Strided>,
    /// For a tensor in a deflate-compressed zip record (a torch archive re-zipped with
    /// compression): the record, inflated once into a temporary file by the reader; `offset` is
    /// then within the inflated record.
    pub packed: Option<Packed>,
    /// For a PyTorch tensor: the storage it is a view of (index into [`Catalogue::storages`]).
    pub storage: Option<usize>,
    /// For a tensor of a pickled module: the module's class (`torch.nn.modules.linear.Linear`).
    pub module_class: Option<String>,
    /// Block-quantized data (a GGUF tensor in a ggml type such as Q8_0): the tensor reads as
    /// the f32 values `gguf.quants.dequantize` gives (its `dtype` is F32 and `nbytes` counts
    /// them); `offset` is where its blocks start.
    pub blocks: Option<Blocks>,
    /// Rows read in another order: the q/k projections llama.cpp's converter permutes.
    pub rows: Option<Rows>,
    /// A weight stored packed in a low-bit scheme (MXFP4, NVFP4, packed integers): the tensor
    /// reads as the values the scheme's reference code dequantizes from its stored parts
    /// (`file`/`offset` are its payload's; `nbytes` counts the dequantized values).
    pub decode: Option<std::sync::Arc<quant::Decode>>,
}

/// A tensor whose rows are read permuted per attention head, as llama.cpp's
/// `convert_hf_to_gguf.py` reorders the q/k projections (`LlamaModel.permute`:
/// `reshape(heads, 2, rows / heads / 2, ...).swapaxes(1, 2)`), or back (`undo`, as transformers'
/// `_reverse_permute_weights` reads a GGUF file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rows {
    /// Attention heads the rows split into.
    pub heads: u64,
    /// The inverse permutation.
    pub undo: bool,
}

impl Rows {
    /// The stored row that row `o` of a tensor of `rows` rows reads.
    pub fn source_row(&self, o: u64, rows: u64) -> u64 {
        let hd = rows / self.heads.max(1);
        let half = (hd / 2).max(1);
        let (h, within) = (o / hd.max(1), o % hd.max(1));
        if self.undo {
            // stored row h*hd + i*2 + j holds row h*hd + j*half + i
            let (j, i) = (within / half, within % half);
            h * hd + i * 2 + j
        } else {
            let (i, j) = (within / 2, within % 2);
            h * hd + j * half + i
        }
    }
}

/// The ggml blocks a tensor's values are dequantized from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Blocks {
    /// The ggml type.
    pub ggml: gguf::GgmlType,
    /// Bytes of blocks.
    pub nbytes: u64,
}

/// A deflate-compressed zip record holding tensor data.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Packed {
    /// The zip entry's full name (`archive/data/3`).
    pub entry: String,
    /// Its size once inflated, as the zip directory declares it (checked when inflating).
    pub size: u64,
}

/// A non-contiguous view of a storage: `offset` is its first element, these strides (in
/// elements) place the others within `span` bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Strided {
    /// Element strides, one per dimension.
    pub strides: Vec<u64>,
    /// Bytes of storage the view covers from its first element.
    pub span: u64,
}

impl TensorEntry {
    /// A tensor whose `nbytes` bytes start at `offset` in file `file` (an index into
    /// [`Catalogue::files`]): what every entry has. Everything else is unset (contiguous, in a
    /// stored record, no storage, module class, blocks or permuted rows); the `with_*` methods
    /// set it. Callers check `nbytes` against the dtype and shape where the input can disagree.
    pub fn new(
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<u64>,
        file: usize,
        offset: u64,
        nbytes: u64,
    ) -> TensorEntry {
        TensorEntry {
            name: name.into(),
            dtype,
            shape,
            file,
            offset,
            nbytes,
            strided: None,
            packed: None,
            storage: None,
            module_class: None,
            blocks: None,
            rows: None,
            decode: None,
        }
    }

    /// The entry as a non-contiguous view (`None`: contiguous).
    pub fn with_strided(mut self, strided: Option<Strided>) -> TensorEntry {
        self.strided = strided;
        self
    }

    /// The entry in a deflate-compressed zip record (`None`: stored).
    pub fn with_packed(mut self, packed: Option<Packed>) -> TensorEntry {
        self.packed = packed;
        self
    }

    /// The entry as a view of storage `storage` (an index into [`Catalogue::storages`]).
    pub fn with_storage(mut self, storage: usize) -> TensorEntry {
        self.storage = Some(storage);
        self
    }

    /// The entry read from ggml blocks (`None`: plain values).
    pub fn with_blocks(mut self, blocks: Option<Blocks>) -> TensorEntry {
        self.blocks = blocks;
        self
    }

    /// The entry read by dequantizing the stored parts `decode` names.
    pub fn with_decode(mut self, decode: quant::Decode) -> TensorEntry {
        self.decode = Some(std::sync::Arc::new(decode));
        self
    }

    /// The entry with its rows read permuted.
    pub fn with_rows(mut self, rows: Rows) -> TensorEntry {
        self.rows = Some(rows);
        self
    }

    /// For a tensor read from ggml blocks: the entry that reads its blocks as they are, as
    /// bytes (what copies them unchanged).
    pub fn blocks_as_bytes(&self) -> Option<TensorEntry> {
        let b = self.blocks?;
        let mut e = self.clone();
        e.dtype = DType::U8;
        e.shape = vec![b.nbytes];
        e.nbytes = b.nbytes;
        e.blocks = None;
        Some(e)
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// A storage of a PyTorch checkpoint: one record of bytes that tensors are views onto (several
/// tensors for views and tied weights). A `.pt` output converts storages, not tensors.
#[derive(Debug, Clone)]
pub struct StorageEntry {
    /// Its key (`3` for the record `data/3`).
    pub key: String,
    /// Element type, as its tensors (or its typed storage class) say; `None` when no tensor on
    /// it could be read (its bytes are then copied as they are).
    pub dtype: Option<DType>,
    /// Index into [`Catalogue::files`].
    pub file: usize,
    /// Absolute byte offset of the record's data in that file (within the inflated record when
    /// `packed`).
    pub offset: u64,
    /// Record size in bytes.
    pub nbytes: u64,
    /// The deflate-compressed zip record holding it, if compressed.
    pub packed: Option<Packed>,
    /// A tensor weightcast does not read (quantized, sparse, a subclass) uses it: it is never
    /// cast.
    pub pinned: bool,
}

impl StorageEntry {
    /// The whole record as a 1-D tensor of its dtype (bytes, when the dtype is unknown), for
    /// reading it through [`crate::source::Sources`].
    pub fn as_tensor(&self) -> TensorEntry {
        let dtype = self.dtype.unwrap_or(DType::U8);
        let es = (dtype.bitsize() / 8).max(1) as u64;
        TensorEntry::new(
            format!("storage data/{}", self.key),
            dtype,
            vec![self.nbytes / es],
            self.file,
            self.offset,
            self.nbytes / es * es,
        )
        .with_packed(self.packed.clone())
    }
}

/// A model folder's files besides the weights.
#[derive(Debug, Clone, Default)]
pub struct FolderInfo {
    /// The folder.
    pub dir: PathBuf,
    /// Paths (relative to `dir`) of files that are not weights: copied as they are, except
    /// `config.json`, whose dtype is updated.
    pub other_files: Vec<PathBuf>,
    /// Name of the index file, when the weights are sharded.
    pub index_name: Option<String>,
    /// For a Hugging Face repository read remotely: the temporary folder holding its small
    /// files (`dir`), kept while the catalogue lives.
    pub keep: Option<std::sync::Arc<tempfile::TempDir>>,
}

/// What an ONNX model holds besides tensor data (read by [`crate::formats::onnx`]).
#[derive(Debug, Clone, Default)]
pub struct OnnxDoc {
    /// `ModelProto.ir_version`.
    pub ir_version: u64,
    /// `producer_name` and `producer_version`, joined by a space.
    pub producer: String,
    /// The operator sets imported: (domain, version).
    pub opsets: Vec<(String, u64)>,
    /// One per weight, in the catalogue's order (`weights[i]` is `tensors[i]`).
    pub weights: Vec<OnnxWeight>,
    /// Per weight, what the rules see as its class: `onnx:` then its op types, comma-separated
    /// (`op:Conv` and `kind:norm` select by them).
    pub classes: Vec<String>,
}

/// Where an ONNX weight is in the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnnxWeight {
    /// Its `TensorProto.name` as stored (empty for an unnamed attribute tensor).
    pub onnx_name: String,
    /// The graph holding it: empty for the main graph, else the path of the subgraph
    /// (`If_0.then_branch`), a function (`function:DOMAIN:NAME`) or training graph.
    pub graph: String,
    /// What holds it.
    pub origin: OnnxOrigin,
    /// Op context: the op types consuming it (an initializer, a `Constant`'s output) or
    /// holding it (another node's tensor attribute), sorted, each once.
    pub ops: Vec<String>,
    /// `TensorProto.data_type`.
    pub data_type: i32,
    /// The `TensorProto` message's byte range in the model file (offset, length).
    pub proto: (u64, u64),
    /// Where its values are stored.
    pub stored: OnnxStored,
}

/// What holds an ONNX weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnnxOrigin {
    /// A graph initializer.
    Initializer,
    /// The `value` attribute of a `Constant` node.
    Constant,
    /// A tensor attribute of another node (the attribute's name).
    Attribute(String),
}

/// Where an ONNX weight's values are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnnxStored {
    /// `raw_data`, in the model file.
    Raw,
    /// Packed `float_data` / `double_data`, in the model file.
    Packed,
    /// Typed fields decoded into memory (`int32_data`, `int64_data`, ...).
    Decoded,
    /// An external data file (its location, relative to the model's folder).
    External(String),
}

/// Everything weightcast knows about an input before touching any tensor data.
#[derive(Debug, Clone)]
pub struct Catalogue {
    /// The path the user gave.
    pub path: PathBuf,
    /// What it is.
    pub kind: InputKind,
    /// Weights files, in shard order.
    pub files: Vec<SourceFile>,
    /// Tensors, file by file in data order.
    pub tensors: Vec<TensorEntry>,
    /// The index's `metadata` object for sharded inputs.
    pub index_metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// The folder's other files, for folder inputs.
    pub folder: Option<FolderInfo>,
    /// What reading found worth telling (tensors left out, tied tensors, dangerous globals).
    pub notes: Vec<String>,
    /// For pickle-based inputs: every global the pickle references, with its class.
    pub globals: Vec<(String, crate::audit::Class)>,
    /// For PyTorch inputs: the storages the tensors are views of.
    pub storages: Vec<StorageEntry>,
    /// For a single PyTorch file: its pickle, every tensor rebuild in it, the tensors outside the
    /// selected state dict and the other top-level entries (what a `.pt` output writes back).
    pub torch: Option<std::sync::Arc<torch::TorchDoc>>,
    /// The quantization scheme of a scaled-FP8 input: payloads, their scales, and where the
    /// scheme is declared.
    pub quant: Option<std::sync::Arc<quant::Quantization>>,
    /// For a GGUF input: its metadata and tensor table (ggml types).
    pub gguf: Option<std::sync::Arc<gguf::GgufDoc>>,
    /// For an ONNX input: the model's header and where each weight comes from.
    pub onnx: Option<std::sync::Arc<OnnxDoc>>,
}

impl Catalogue {
    /// The catalogue of `tensors` in `files`: what every input has. A format sets the rest
    /// (the index's metadata, the folder, the pickle, the quantization) where it has them.
    pub fn new(
        path: PathBuf,
        kind: InputKind,
        files: Vec<SourceFile>,
        tensors: Vec<TensorEntry>,
    ) -> Catalogue {
        Catalogue {
            path,
            kind,
            files,
            tensors,
            index_metadata: None,
            folder: None,
            notes: vec![],
            globals: vec![],
            storages: vec![],
            torch: None,
            quant: None,
            gguf: None,
            onnx: None,
        }
    }

    /// Sum of tensor bytes.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.nbytes).sum()
    }

    /// Sum of element counts.
    pub fn total_params(&self) -> u64 {
        self.tensors.iter().map(|t| t.numel()).sum()
    }

    /// Metadata of the first file (what a single output file keeps).
    pub fn metadata(&self) -> Vec<(String, String)> {
        self.files
            .first()
            .and_then(|f| f.metadata.clone())
            .unwrap_or_default()
    }

    /// What the input is, in words: its kind, and for a model folder what its weights are.
    pub fn describe(&self) -> &'static str {
        match self.kind {
            InputKind::Folder if !self.files.iter().any(|f| f.name.ends_with(".safetensors")) => {
                "model folder (PyTorch weights)"
            }
            k => k.describe(),
        }
    }

    /// Removes `prefix` from tensor names (`module.` of DataParallel); returns how many were
    /// renamed. Two tensors ending with the same name are an error.
    pub fn strip_prefix(&mut self, prefix: &str) -> crate::error::Result<usize> {
        let mut n = 0;
        let mut seen = std::collections::HashSet::new();
        for t in &mut self.tensors {
            if let Some(s) = t.name.strip_prefix(prefix) {
                if s.is_empty() || s.starts_with('.') {
                    return Err(crate::error::Error::usage(format!(
                        "--strip-prefix {prefix}: `{}` would become `{s}`{}",
                        t.name,
                        if s.starts_with('.') {
                            format!(" (did you mean `{prefix}.`?)")
                        } else {
                            String::new()
                        }
                    )));
                }
                t.name = s.to_string();
                n += 1;
            }
            if !seen.insert(t.name.clone()) {
                return Err(crate::error::Error::usage(format!(
                    "--strip-prefix {prefix}: two tensors would be named `{}`",
                    t.name
                )));
            }
        }
        // Tied tensors listed once keep naming their twin by its new name.
        if let Some(doc) = self.torch.as_mut() {
            if !doc.aliases.is_empty() {
                let doc = std::sync::Arc::make_mut(doc);
                for (alias, kept) in &mut doc.aliases {
                    for name in [alias, kept] {
                        if let Some(s) = name.strip_prefix(prefix) {
                            *name = s.to_string();
                        }
                    }
                }
            }
        }
        Ok(n)
    }

    /// Per dtype: (tensors, elements, bytes), in dtype order.
    pub fn dtype_totals(&self) -> Vec<(DType, u64, u64, u64)> {
        let mut m = std::collections::BTreeMap::<DType, (u64, u64, u64)>::new();
        for t in &self.tensors {
            let e = m.entry(t.dtype).or_default();
            e.0 += 1;
            e.1 += t.numel();
            e.2 += t.nbytes;
        }
        m.into_iter().map(|(d, (a, b, c))| (d, a, b, c)).collect()
    }
}
