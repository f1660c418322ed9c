//! Converting into memory: the layout of a state dict loaded for a framework (`load` of the
//! Python package). Each tensor is a view of one buffer: a PyTorch storage converted whole
//! (its views and tied tensors keep sharing it), or a tensor of its own. The caller allocates
//! the buffers ([`MemoryLayout::buffers`]) and [`crate::convert::convert_into`] fills them
//! through the same executor as every output.

use crate::catalogue::{Catalogue, TensorEntry};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::plan::Plan;

/// One buffer the caller allocates.
#[derive(Debug, Clone)]
pub struct Buffer {
    /// Bytes.
    pub nbytes: u64,
    /// What fills it.
    pub(crate) source: BufferSource,
}

#[derive(Debug, Clone)]
pub(crate) enum BufferSource {
    /// Plan entry `i` (of `plan.tensors()`), contiguous.
    Tensor(usize),
    /// Storage `s`, read whole from `from`, written as `to` (its values multiplied by
    /// `factor` on the way).
    Storage {
        s: usize,
        from: DType,
        to: DType,
        factor: Option<crate::rules::Factor>,
    },
}

/// One tensor of the result: a view of a buffer.
#[derive(Debug, Clone)]
pub struct View {
    /// Name in the state dict.
    pub name: String,
    /// The buffer it views.
    pub buffer: usize,
    /// Its dtype in memory.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Element strides.
    pub strides: Vec<u64>,
    /// First element, in elements from the buffer's start.
    pub offset: u64,
}

/// The buffers and views of a plan's state dict, in the catalogue's order.
#[derive(Debug, Clone)]
pub struct MemoryLayout {
    /// Buffers to allocate, in the order they are filled.
    pub buffers: Vec<Buffer>,
    /// The tensors.
    pub views: Vec<View>,
}

fn contiguous(shape: &[u64]) -> Vec<u64> {
    let mut s = vec![1u64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1].max(1);
    }
    s
}

/// The memory layout of `plan`'s tensors (the state dict; scales of a dequantized input
/// excluded, as in every output).
pub fn layout(cat: &Catalogue, plan: &Plan) -> Result<MemoryLayout> {
    let mut buffers = Vec::new();
    let mut views = Vec::new();
    // storage -> buffer
    let mut of_storage: Vec<Option<usize>> = vec![None; cat.storages.len()];
    for (i, p) in plan.tensors().iter().enumerate() {
        let t: &TensorEntry = &cat.tensors[p.tensor];
        let shared = t.storage.and_then(|s| {
            let st = &cat.storages[s];
            // A storage is converted whole when its dtype is the tensor's and no scale or
            // quantization touches it (the plan settled one target per storage).
            (st.dtype == Some(p.from)
                && p.dequant.is_none()
                && p.scaled.is_none()
                && st.packed == t.packed
                && t.offset >= st.offset)
                .then_some(s)
        });
        let Some(s) = shared else {
            buffers.push(Buffer {
                nbytes: p.bytes_out,
                source: BufferSource::Tensor(i),
            });
            views.push(View {
                name: t.name.clone(),
                buffer: buffers.len() - 1,
                dtype: p.to,
                strides: contiguous(&t.shape),
                shape: t.shape.clone(),
                offset: 0,
            });
            continue;
        };
        let st = &cat.storages[s];
        let (isz, osz) = (p.from.bitsize() as u64 / 8, p.to.bitsize() as u64 / 8);
        let b = match of_storage[s] {
            Some(b) => {
                if let BufferSource::Storage { to, factor, .. } = buffers[b].source {
                    let same = match (factor, p.factor) {
                        (None, None) => true,
                        (Some(a), Some(b)) => a.same(b),
                        _ => false,
                    };
                    if to != p.to || !same {
                        return Err(Error::invalid(
                            &cat.path,
                            format!(
                                "storage data/{} would get two dtypes or factors: the plan was \
                                 not settled",
                                st.key
                            ),
                        ));
                    }
                }
                b
            }
            None => {
                buffers.push(Buffer {
                    nbytes: st.nbytes / isz * osz,
                    source: BufferSource::Storage {
                        s,
                        from: p.from,
                        to: p.to,
                        factor: p.factor,
                    },
                });
                of_storage[s] = Some(buffers.len() - 1);
                buffers.len() - 1
            }
        };
        views.push(View {
            name: t.name.clone(),
            buffer: b,
            dtype: p.to,
            shape: t.shape.clone(),
            strides: t
                .strided
                .as_ref()
                .map(|x| x.strides.clone())
                .unwrap_or_else(|| contiguous(&t.shape)),
            offset: (t.offset - st.offset) / isz,
        });
    }
    // Tied tensors the catalogue lists once: the same view under each name, as torch.load
    // gives them.
    if let Some(doc) = cat.torch.as_deref() {
        for (alias, kept) in &doc.aliases {
            if let Some(v) = views.iter().find(|v| &v.name == kept).cloned() {
                views.push(View {
                    name: alias.clone(),
                    ..v
                });
            }
        }
    }
    Ok(MemoryLayout { buffers, views })
}
