//! Formats at the edge: each reads its files into a [`Catalogue`](crate::catalogue::Catalogue)
//! or writes one out.

pub mod folder;
pub mod gguf;
pub mod memory;
pub mod onnx;
pub mod open;
pub mod pickle;
pub mod safetensors;
pub mod sniff;
pub mod torch;

pub use open::{open, open_with, what_is};
