//! weightcast: change the precision of pretrained model weights.
//!
//! Data flows one way: a format reads an input into a [`Catalogue`] (names, dtypes, shapes and
//! byte ranges, never the data), a [`Plan`] decides each tensor's target dtype from the
//! [`rules`], and [`convert`] streams each tensor through the [`cast`] kernels into the output.
//!
//! ```no_run
//! use weightcast::{formats, rules::RuleSet, Plan, DType, convert};
//! let cat = formats::open("model.safetensors".as_ref())?;
//! let plan = Plan::new(&cat, &RuleSet::default(), DType::F16);
//! convert::convert(&cat, &plan, "model-f16.safetensors".as_ref(),
//!                  &convert::Options::default(), &convert::NoProgress)?;
//! # Ok::<(), weightcast::Error>(())
//! ```
#![deny(missing_docs)]

pub mod analysis;
pub mod audit;
pub mod cast;
pub mod catalogue;
pub mod commands;
pub mod convert;
pub mod diff;
pub mod dtype;
pub mod error;
#[cfg(feature = "eval")]
pub mod eval;
pub mod formats;
pub mod load;
pub mod output;
pub mod plan;
pub mod quant;
pub mod remote;
pub mod rules;
pub mod source;
pub mod stats;

pub use catalogue::Catalogue;
pub use dtype::DType;
pub use error::{Error, Result};
pub use plan::Plan;
