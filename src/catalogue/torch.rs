//! What the catalogue keeps of a PyTorch file: its parsed pickle and how the pickle's tensors
//! map to the catalogue's, for the plan and the `.pt` writer. Read by [`crate::formats::torch`].

use crate::audit::Class;
use crate::catalogue::TensorEntry;
use crate::formats::pickle::{NodeId, Pickle};

/// Where a tensor's `_rebuild_tensor_v2/v3` call sits in the pickle: what a `.pt` writer
/// rewrites when it converts the tensor's storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    /// An object made by REDUCE of `_rebuild_tensor_v2/v3` with its argument tuple.
    Call(NodeId),
    /// `_rebuild_from_type_v2(func, type, args, state)` (a tensor carrying Python attributes):
    /// the inner call is its arguments 0 (the function) and 2 (its argument tuple).
    FromType(NodeId),
}

/// Which list a tensor of the pickle is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorRef {
    /// [`Catalogue::tensors`](crate::catalogue::Catalogue::tensors): the selected state dict.
    Selected(usize),
    /// [`TorchDoc::others`]: the rest of the file (optimizer state, EMA copies, ...).
    Other(usize),
}

/// One tensor rebuild of the pickle, decoded once for every consumer.
#[derive(Debug, Clone)]
pub struct Rebuild {
    /// The tensor's node (a Parameter or subclass wrapper included).
    pub node: NodeId,
    /// Where its `_rebuild_tensor_v2/v3` call is.
    pub site: Site,
    /// Whether that call is `_rebuild_tensor_v3` (the dtype as its seventh argument).
    pub v3: bool,
    /// Its storage's persistent-id node.
    pub persid: NodeId,
    /// Index into [`Catalogue::storages`](crate::catalogue::Catalogue::storages).
    pub storage: usize,
    /// The catalogue tensor it is (tied weights: several rebuilds, one tensor).
    pub tensor: TensorRef,
}

/// An index into [`TorchDoc::others`]: a tensor outside the selected state dict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OtherId(pub usize);

impl std::ops::Index<OtherId> for [OtherTensor] {
    type Output = OtherTensor;
    fn index(&self, i: OtherId) -> &OtherTensor {
        &self[i.0]
    }
}

impl std::ops::Index<OtherId> for Vec<OtherTensor> {
    type Output = OtherTensor;
    fn index(&self, i: OtherId) -> &OtherTensor {
        &self[i.0]
    }
}

/// A tensor outside the selected state dict.
#[derive(Debug, Clone)]
pub struct OtherTensor {
    /// Where its bytes are; its name is its path from the top of the file
    /// (`optimizer_state_dict.state.0.exp_avg`).
    pub entry: TensorEntry,
    /// The top-level entry it is under (`optimizer_state_dict`).
    pub section: String,
}

/// A PyTorch file's pickle and how its tensors map to the catalogue: what a `.pt` output
/// writes back, decided by the plan.
#[derive(Debug, Clone)]
pub struct TorchDoc {
    /// The parsed `data.pkl` (or a legacy file's main pickle).
    pub pickle: Pickle,
    /// A legacy (non-zip) file.
    pub legacy: bool,
    /// A TorchScript archive.
    pub torchscript: bool,
    /// The node whose tensors are the catalogue's tensors (the state dict).
    pub selected: NodeId,
    /// The entry it was taken from (`model_state_dict`), when not the whole file.
    pub entry: Option<String>,
    /// Every tensor rebuild reachable from the top of the pickle.
    pub rebuilds: Vec<Rebuild>,
    /// Tensors outside the selected state dict.
    pub others: Vec<OtherTensor>,
    /// Top-level entries other than the selected one: (name, tensors, tensor bytes).
    pub entries: Vec<(String, usize, u64)>,
    /// The entries among them that are training state (optimizer, scheduler, AMP scaler,
    /// RNG states, gradient buffers), and what each is: what `--inference` drops.
    pub training: Vec<(String, &'static str)>,
    /// What two readers would read differently in the file (a `.pt` output refuses it).
    pub ambiguities: Vec<String>,
    /// Every global of every pickle torch.load would unpickle (the main one's and, for a
    /// legacy file, the other pickles of its stack), as (shown name, class) once resolved as
    /// the unpickler resolves it.
    pub globals: Vec<(String, Class)>,
    /// Tied tensors left out of the catalogue: (name, the catalogue tensor it is the same
    /// view as). A loader into memory gives both names the same tensor.
    pub aliases: Vec<(String, String)>,
}
