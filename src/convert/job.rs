//! One conversion's state while it runs: the input, the plan, the options, the sources and
//! what the executor reported (overflow counts, which tensors became all zeros); the headers
//! and pieces it hands the executor.

use super::executor::{FileSink, Nonzero};
use super::*;
use crate::catalogue::TensorId;
use crate::quant::fp4::{Fp4Kind, Fp4Part, Fp4Table};

pub(super) struct Job<'a> {
    pub(super) cat: &'a Catalogue,
    pub(super) plan: &'a Plan,
    pub(super) sources: &'a Sources<'a>,
    pub(super) opts: &'a Options,
    pub(super) progress: &'a dyn Progress,
    /// Scales computed for a scaled FP8 output, by payload.
    pub(super) scales: Mutex<std::collections::HashMap<usize, Arc<ScaleTable>>>,
    /// Scales computed for an FP4 output, by weight (dropped once its file is written).
    pub(super) fp4: Mutex<std::collections::HashMap<usize, Arc<Fp4Table>>>,
    /// Largest magnitudes of the weights of an FP4 output (NVFP4's fused global scales).
    pub(super) amax: Mutex<std::collections::HashMap<usize, u32>>,
    /// Per cast tensor (by name): whether any input value and any output value was non-zero.
    pub(super) nonzero: Nonzero,
    /// A `.pt` output's writer plan, made once by [`plan_output`].
    pub(super) pt: Option<&'a crate::formats::torch::write::PtOutput>,
}

impl<'a> Job<'a> {
    pub(super) fn new(
        cat: &'a Catalogue,
        plan: &'a Plan,
        sources: &'a Sources<'a>,
        opts: &'a Options,
        progress: &'a dyn Progress,
    ) -> Job<'a> {
        Job {
            cat,
            plan,
            sources,
            opts,
            progress,
            scales: Mutex::new(Default::default()),
            fp4: Mutex::new(Default::default()),
            amax: Mutex::new(Default::default()),
            nonzero: Mutex::new(Default::default()),
            pt: None,
        }
    }

    /// The job of writing `output` (its `.pt` writer plan included).
    pub(super) fn writing(mut self, output: &'a Output) -> Job<'a> {
        self.pt = output.pt.as_ref();
        self
    }

    /// The warning for tensors the cast turned into all zeros (every non-zero value flushed),
    /// in plan order, if any.
    pub(super) fn flushed_warning(&self) -> Option<String> {
        let seen = self.nonzero.lock().expect("nonzero");
        let names: Vec<String> = self
            .plan
            .tensors()
            .iter()
            .map(|p| &self.cat.tensors[p.tensor].name)
            .filter(|n| seen.get(*n).is_some_and(|&(i, o)| i && !o))
            .cloned()
            .collect();
        flushed_warning(&names, self.opts.caller)
    }

    pub(super) fn check_cancel(&self) -> Result<()> {
        match &self.opts.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(Error::Interrupted),
            _ => Ok(()),
        }
    }

    /// The overflow counts of plan entries, named.
    pub(super) fn named(&self, counts: &[(usize, u64)]) -> Vec<(String, DType, u64)> {
        counts
            .iter()
            .map(|&(i, n)| {
                let p = &self.plan.tensors()[i];
                (self.cat.tensors[p.tensor].name.clone(), p.to, n)
            })
            .collect()
    }

    /// Once every tensor is written and before anything is committed: a remote input that
    /// changed meanwhile is an error, then the overflow counts become an error or the clamp
    /// report ([`Job::check_overflow`]).
    pub(super) fn written(&self, named: Vec<(String, DType, u64)>) -> Result<Vec<(String, u64)>> {
        self.sources.check_unchanged()?;
        self.check_overflow(named)
    }

    /// Turns the overflow counts of the written tensors (or storages) into an error
    /// (`--on-overflow error`) or the clamp report.
    pub(super) fn check_overflow(
        &self,
        named: Vec<(String, DType, u64)>,
    ) -> Result<Vec<(String, u64)>> {
        match self.opts.on_overflow {
            OnOverflow::Clamp | OnOverflow::Allow => {
                // `allow` counts nothing (Range::Ignore), so this is the clamp report.
                Ok(named.into_iter().map(|(n, _, c)| (n, c)).collect())
            }
            _ if named.is_empty() => Ok(vec![]),
            _ => Err(overflow_refusal(&self.cat.path, &named, self.opts.caller)),
        }
    }

    /// Flushes a written output file to disk (unless `--no-sync`); an error names it.
    pub(super) fn finish(&self, file: &File, path: &Path) -> Result<()> {
        if self.opts.sync {
            file.sync_all().map_err(|e| Error::io(path, e))?;
        }
        Ok(())
    }

    /// The safetensors header of one output file.
    pub(super) fn header(&self, of: &OutputFile) -> Result<Vec<u8>> {
        let cat = self.cat;
        let names: Vec<OutTensor<'_>> = of
            .tensors
            .iter()
            .map(|&i| {
                let p = &self.plan.tensors()[i];
                let t = &cat.tensors[p.tensor];
                OutTensor {
                    name: &t.name,
                    dtype: p.to,
                    shape: &t.shape,
                    nbytes: p.bytes_out,
                }
            })
            .collect();
        let mut metadata = of
            .tensors
            .first()
            .and_then(|&i| {
                cat.files[cat.tensors[self.plan.tensors()[i].tensor].file]
                    .metadata
                    .clone()
            })
            .unwrap_or_else(|| cat.metadata());
        if self.plan.quant == QuantPlan::Dequantize {
            metadata.retain(|(k, _)| k != "_quantization_metadata");
        }
        if !metadata.iter().any(|(k, _)| k == "format") {
            metadata.insert(0, ("format".into(), "pt".into()));
        }
        encode_header(&metadata, &names)
    }

    /// Writes one safetensors file: header, then every tensor streamed through the cast.
    /// Returns, per plan entry with any, the count of values that left the target's range.
    pub(super) fn write_file(
        &self,
        dst: &File,
        dst_path: &Path,
        of: &OutputFile,
    ) -> Result<Vec<(usize, u64)>> {
        let header = self.header(of)?;
        dst.set_len(header.len() as u64 + of.bytes)
            .map_err(|e| Error::io(dst_path, e))?;
        (&*dst)
            .write_all(&header)
            .map_err(|e| Error::io(dst_path, e))?;

        self.precompute_scales(&of.tensors)?;
        let pieces: Vec<Piece<'_>> = of
            .tensors
            .iter()
            .map(|&i| self.piece(&self.plan.tensors()[i]))
            .collect::<Result<_>>()?;
        let counts = self.exec().run(
            &pieces,
            &mut FileSink::new(dst, dst_path, self.opts.sync, header.len() as u64),
        )?;
        self.check_cancel()?;
        self.finish(dst, dst_path)?;
        // the FP4 scales of this file's weights are written: memory stays bounded by one file
        let mut fp4 = self.fp4.lock().expect("fp4");
        for &i in &of.tensors {
            if let Some(ScaledOut::Fp4 { weight, .. }) = self.plan.tensors()[i].scaled {
                fp4.remove(&weight.0);
            }
        }
        drop(fp4);
        // Piece k is plan entry of.tensors[k].
        Ok(counts
            .into_iter()
            .map(|(k, n)| (of.tensors[k], n))
            .collect())
    }

    /// The piece that writes plan entry `p` (its scale loaded when it is dequantized).
    pub(super) fn piece(&self, p: &TensorPlan) -> Result<Piece<'_>> {
        let cat = self.cat;
        if let Some(ScaledOut::Fp4 {
            weight,
            part,
            kind,
            fused,
        }) = p.scaled
        {
            let table = self.fp4_of(weight, kind, fused)?;
            let (entry, how) = match part {
                Fp4Part::Packed => (&cat.tensors[weight], How::Fp4(table)),
                Fp4Part::Scale => (
                    &cat.tensors[p.tensor],
                    How::Fill(Arc::new(table.scale_bytes())),
                ),
                Fp4Part::Global => (
                    &cat.tensors[p.tensor],
                    How::Fill(Arc::new(table.global_bytes())),
                ),
            };
            return Ok(Piece {
                entry,
                from: p.from,
                to: p.to,
                how,
                factor: None,
            });
        }
        let how = match (p.dequant, p.scaled) {
            _ if p.ggml.is_some() => How::GgmlQ8,
            (Some(d), _) => How::Dequantize(Arc::new(d.table(cat, self.sources, p.tensor.0)?)),
            (None, Some(ScaledOut::Payload { .. })) => How::Quantize(self.scales_of(p.tensor.0)?),
            (None, Some(ScaledOut::Scale { payload })) => {
                How::Fill(Arc::new(self.scales_of(payload.0)?.bytes()))
            }
            (None, Some(ScaledOut::Fp4 { .. })) => unreachable!("returned above"),
            (None, None) => How::Cast,
        };
        Ok(Piece {
            entry: &cat.tensors[p.tensor],
            from: p.from,
            to: p.to,
            how,
            factor: p.factor,
        })
    }

    /// Computes, in parallel, the scales of the weights quantized among plan entries `entries`
    /// (a pass over each of them before the write).
    pub(super) fn precompute_scales(&self, entries: &[usize]) -> Result<()> {
        use rayon::prelude::*;
        let todo: Vec<usize> = entries
            .iter()
            .filter_map(|&i| {
                let p = &self.plan.tensors()[i];
                match p.scaled {
                    Some(ScaledOut::Payload { .. }) => Some(p.tensor.0),
                    Some(ScaledOut::Scale { payload }) => Some(payload.0),
                    Some(ScaledOut::Fp4 { .. }) | None => None,
                }
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter(|i| !self.scales.lock().expect("scales").contains_key(i))
            .collect();
        todo.par_iter()
            .try_for_each(|&i| self.scales_of(i).map(|_| ()))?;
        let fp4: Vec<_> = entries
            .iter()
            .filter_map(|&i| match self.plan.tensors()[i].scaled {
                Some(ScaledOut::Fp4 {
                    weight,
                    part: Fp4Part::Packed,
                    kind,
                    fused,
                }) => Some((weight, kind, fused)),
                _ => None,
            })
            .collect();
        fp4.par_iter()
            .try_for_each(|&(w, k, f)| self.fp4_of(w, k, f).map(|_| ()))
    }

    /// The FP4 scales of weight `weight` (once per file: its packed values, scale and global
    /// scale use the same).
    pub(super) fn fp4_of(
        &self,
        weight: TensorId,
        kind: Fp4Kind,
        fused: [Option<TensorId>; 2],
    ) -> Result<Arc<Fp4Table>> {
        if let Some(t) = self.fp4.lock().expect("fp4").get(&weight.0) {
            return Ok(t.clone());
        }
        let table = Arc::new(crate::quant::fp4::table(
            self.cat,
            self.sources,
            weight,
            kind,
            fused,
            &self.amax,
        )?);
        self.fp4
            .lock()
            .expect("fp4")
            .insert(weight.0, table.clone());
        Ok(table)
    }

    /// The scales computed from weight `payload` (once per conversion: its payload and its
    /// scale tensor use the same).
    pub(super) fn scales_of(&self, payload: usize) -> Result<Arc<ScaleTable>> {
        if let Some(t) = self.scales.lock().expect("scales").get(&payload) {
            return Ok(t.clone());
        }
        let (layout, compute) = self
            .plan
            .tensors()
            .iter()
            .find_map(|p| match p.scaled {
                Some(ScaledOut::Payload {
                    layout, compute, ..
                }) if p.tensor.0 == payload => Some((layout, compute)),
                _ => None,
            })
            .expect("a scale's payload is planned");
        let table = Arc::new(crate::quant::quantize::compute_scales(
            self.cat,
            self.sources,
            payload,
            layout,
            compute,
        )?);
        self.scales
            .lock()
            .expect("scales")
            .insert(payload, table.clone());
        Ok(table)
    }

    pub(super) fn exec(&self) -> Executor<'_> {
        Executor {
            sources: self.sources,
            opts: self.opts,
            progress: self.progress,
            nonzero: Some(&self.nonzero),
        }
    }
}
