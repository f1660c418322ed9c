//! Formats at the edge: each reads its files into a [`Catalogue`](crate::catalogue::Catalogue)
//! or writes one out.

pub mod checkpoint;
pub mod folder;
pub mod gguf;
pub mod gguf_hf;
pub mod gguf_write;
pub mod memory;
pub mod open;
pub mod pickle;
pub mod safetensors;
pub mod sniff;
pub mod torch;
pub mod torch_scan;
pub mod torch_write;

pub use open::{open, open_with, what_is};
