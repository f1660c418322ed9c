//! gpt-oss's MXFP4 MoE experts.

use super::{Ctx, Found};
use crate::cast::packed::{Mxfp4Experts, Packing};
use crate::dtype::DType;
use crate::quant::Quantization;

/// gpt-oss's MoE experts (`X_blocks` `[E, R, G, 16]` and `X_scales` `[E, R, G]`, both uint8,
/// beside each other), decoded into `X` `[E, G * 32, R]` in bf16 as transformers' mxfp4
/// integration dequantizes them. Found when the config says `quant_method: mxfp4`, or from the
/// names alone.
pub(super) fn experts(ctx: &Ctx, q: &mut Quantization, found: &mut Vec<Found>) {
    for (i, t) in ctx.cat.tensors.iter().enumerate() {
        let Some(stem) = t.name.strip_suffix("_blocks") else {
            continue;
        };
        let scales_name = format!("{stem}_scales");
        let Some((s, sc)) = ctx.get(&scales_name) else {
            if ctx.method == "mxfp4" {
                q.unsupported
                    .get_or_insert(format!("`{}` has no `{scales_name}`", t.name));
            }
            continue;
        };
        let fits = t.dtype == DType::U8
            && sc.dtype == DType::U8
            && t.shape.len() == 4
            && t.shape[3] == 16
            && sc.shape.len() == 3
            && t.shape[..3] == sc.shape[..];
        if !fits {
            q.unsupported.get_or_insert(format!(
                "`{}` {} {:?} and `{}` {} {:?} are not MXFP4 blocks [experts, rows, groups, 16] \
                 and scales [experts, rows, groups] in uint8",
                t.name, t.dtype, t.shape, sc.name, sc.dtype, sc.shape
            ));
            continue;
        }
        let packing = Packing::Mxfp4Experts(Mxfp4Experts {
            experts: t.shape[0],
            rows: t.shape[1],
            groups: t.shape[2],
            transpose: true,
        });
        if ctx.get(stem).is_some() {
            q.unsupported.get_or_insert(format!(
                "`{stem}` is both a tensor and the weight `{}` decodes into",
                t.name
            ));
            continue;
        }
        found.push(Found {
            parts: vec![i, s],
            name: stem.to_string(),
            dtype: DType::BF16,
            packing,
            what: format!("mxfp4 (`{}`, `{}`)", t.name, sc.name),
        });
    }
    if !found.is_empty() && q.scheme.is_empty() {
        q.scheme = "mxfp4 (gpt-oss MoE experts)".into();
        q.found_in = "tensor names".into();
    }
}
