//! The streaming executor: K workers read and cast bounded chunks of each tensor in parallel,
//! one writer puts them in order into a [`Sink`] (a file, a zip record, an upload). Memory is
//! a handful of chunk buffers whatever the model's size.

use super::*;

/// Per cast tensor (by name): whether any input value, and any output value, was non-zero.
pub(super) type Nonzero = Mutex<std::collections::HashMap<String, (bool, bool)>>;

/// Bytes per chunk buffer (input or output side).
pub(super) const CHUNK_BYTES: usize = 8 << 20;

/// Chunks in flight between stages.
pub(super) const DEPTH: usize = 3;

/// Maps in the pages of a fresh destination range with one call (MADV_POPULATE_WRITE)
/// instead of a page fault per 4 KiB as the cast first writes them: measured about half the
/// kernel time per page. Where the kernel does not know the advice (before Linux 5.14), the
/// writes fault the pages in as usual.
pub(super) fn prefault(dst: &mut [u8]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let p = dst.as_mut_ptr() as usize;
        let (start, end) = (p.div_ceil(PAGE) * PAGE, (p + dst.len()) / PAGE * PAGE);
        if end > start {
            // SAFETY: the range lies inside `dst`, which we hold exclusively and are about to
            // overwrite; populating only maps pages in (contents of already-mapped pages are
            // unchanged), so no Rust-visible memory changes.
            unsafe {
                libc::madvise(
                    start as *mut libc::c_void,
                    end - start,
                    libc::MADV_POPULATE_WRITE,
                );
            }
        }
    }
}

/// A buffer pool shared by the three stages.
pub(super) struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    pub(super) fn get(&self, len: usize) -> Vec<u8> {
        let mut b = self.0.lock().expect("pool").pop().unwrap_or_default();
        if b.len() < len {
            b.resize(len, 0);
        } else {
            b.truncate(len);
        }
        b
    }

    pub(super) fn put(&self, b: Vec<u8>) {
        let mut p = self.0.lock().expect("pool");
        if p.len() < 2 * DEPTH + 2 {
            p.push(b);
        }
    }
}

/// One stretch of an output: a tensor (or a whole storage) read from the input and cast from
/// `from` to `to` (copied when they are equal and no factor applies).
pub struct Piece<'a> {
    /// Where its bytes are.
    pub entry: &'a TensorEntry,
    /// Stored dtype.
    pub from: DType,
    /// Written dtype.
    pub to: DType,
    /// What happens to its bytes on the way.
    pub how: How,
    /// Its values (dequantized first, for a payload) multiplied by this factor in f32 before
    /// the cast (a rules file's `scale`).
    pub factor: Option<Factor>,
}

impl Piece<'_> {
    /// Whether its bytes are copied as they are.
    fn copied(&self) -> bool {
        self.from == self.to && self.factor.is_none() && matches!(self.how, How::Cast)
    }
}

/// What the executor does to a piece's bytes.
#[derive(Clone)]
pub enum How {
    /// Cast from `from` to `to` (copied when they are equal).
    Cast,
    /// A scaled FP8 payload: multiplied by its scale, then cast.
    Dequantize(Arc<ScaleTable>),
    /// A weight quantized to f8e4m3fn with its (precomputed) scale.
    Quantize(Arc<ScaleTable>),
    /// Bytes computed before the run (a scale): written as they are.
    Fill(Arc<Vec<u8>>),
    /// A GGUF tensor quantized to ggml's Q8_0 from its values as f32 (`to`).
    GgmlQ8,
    /// A weight quantized to packed FP4 (two values per output byte) with its scales.
    Fp4(Arc<crate::quant::fp4::Fp4Table>),
}

/// Where the executor's bytes go: pieces in order, each begun before its bytes (empty ones
/// too).
pub trait Sink {
    /// Piece `i` starts.
    fn begin(&mut self, i: usize) -> Result<()>;
    /// Bytes of the current piece.
    fn write(&mut self, bytes: &[u8]) -> Result<()>;
}

/// A safetensors file after its header: pieces are laid end to end. With `sync`, write-back
/// of every finished stretch starts while the next ones are cast (`sync_file_range`), so the
/// fsync at the end waits for the last stretch only instead of the whole file.
pub(super) struct FileSink<'a> {
    pub(super) file: &'a File,
    pub(super) path: &'a Path,
    pub(super) sync: bool,
    /// Bytes written so far (from the start of the file) and where write-back was last
    /// started.
    pub(super) written: u64,
    pub(super) flushed: u64,
}

/// Bytes written between two write-back kicks.
pub(super) const WRITEBACK_STEP: u64 = 32 << 20;

impl FileSink<'_> {
    pub(super) fn new<'a>(file: &'a File, path: &'a Path, sync: bool, start: u64) -> FileSink<'a> {
        FileSink {
            file,
            path,
            sync,
            written: start,
            flushed: 0,
        }
    }

    /// Starts write-back of what was written since the last kick (asynchronous: returns at
    /// once; a file system without it ignores the hint).
    pub(super) fn kick(&mut self) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain system call on a file descriptor we hold open, with a range of
            // it; it only schedules write-back of dirty pages.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    self.flushed as libc::off64_t,
                    (self.written - self.flushed) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        self.flushed = self.written;
    }
}

impl Sink for FileSink<'_> {
    fn begin(&mut self, _i: usize) -> Result<()> {
        Ok(())
    }
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let mut f = self.file;
        f.write_all(bytes).map_err(|e| Error::io(self.path, e))?;
        self.written += bytes.len() as u64;
        if self.sync && self.written - self.flushed >= WRITEBACK_STEP {
            self.kick();
        }
        Ok(())
    }
}

/// A `.pt` zip: each piece is a storage record.
pub(super) struct ZipSink<'a, 'z> {
    pub(super) zip: &'a mut crate::formats::torch::write::PtZip<'z>,
    pub(super) records: &'a [crate::formats::torch::write::PtRecord],
}

impl Sink for ZipSink<'_, '_> {
    fn begin(&mut self, i: usize) -> Result<()> {
        let r = &self.records[i];
        self.zip.start(&r.name, r.bytes_out)
    }
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.zip.write(bytes)
    }
}

/// The streaming executor: K workers read and cast chunks of the pieces in parallel, one writer
/// takes them back in order into the sink. Memory is a few chunk buffers per worker, whatever
/// the model's size.
pub struct Executor<'a> {
    pub(super) sources: &'a Sources<'a>,
    pub(super) opts: &'a Options,
    pub(super) progress: &'a dyn Progress,
    /// Where casts record whether their input and output held a non-zero value.
    pub(super) nonzero: Option<&'a Nonzero>,
}

impl Executor<'_> {
    pub(super) fn check_cancel(&self) -> Result<()> {
        match &self.opts.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(Error::Interrupted),
            _ => Ok(()),
        }
    }

    /// Input bytes per chunk of a piece: whole elements, at most [`CHUNK_BYTES`] on either
    /// side.
    pub(super) fn chunk_in(p: &Piece<'_>) -> u64 {
        if p.copied() || matches!(p.how, How::Fill(_)) {
            return CHUNK_BYTES as u64;
        }
        let (isz, osz) = (p.from.bitsize() / 8, p.to.bitsize() / 8);
        if let How::Fp4(t) = &p.how {
            // gpt-oss's experts are transposed on the way: whole experts per chunk
            let expert = t.expert_values() * isz as u64;
            if expert > 0 {
                return expert * (CHUNK_BYTES as u64 / expert).max(1);
            }
        }
        let csz = match &p.how {
            How::Dequantize(s) => s.compute.bitsize() / 8,
            // scaled values are staged as f32
            _ if p.factor.is_some() => 4,
            _ => 0,
        };
        (CHUNK_BYTES / isz.max(osz).max(csz) * isz) as u64
    }

    /// Streams every piece into `sink`; returns, per piece with any, the count of values that
    /// left the target's range.
    pub fn run(&self, pieces: &[Piece<'_>], sink: &mut dyn Sink) -> Result<Vec<(usize, u64)>> {
        // Chunks in output order. Worker w reads and casts chunks w, w+K, ...; the writer takes
        // them back in order, so K workers and one writer overlap reading, casting and writing
        // without any thread waiting on a shared pool.
        let mut chunks: Vec<(usize, u64, u64)> = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            let nbytes = p.entry.nbytes;
            let step = Self::chunk_in(p);
            let mut pos = 0;
            while pos < nbytes {
                let n = step.min(nbytes - pos);
                chunks.push((i, pos, n));
                pos += n;
            }
        }
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 8);
        let pool = Pool(Mutex::new(Vec::new()));
        let stop = AtomicBool::new(false);
        let chunks = &chunks;
        std::thread::scope(|s| -> Result<Vec<(usize, u64)>> {
            let mut receivers = Vec::with_capacity(workers);
            for w in 0..workers {
                let (tx, rx) = sync_channel::<Result<(Vec<u8>, u64)>>(DEPTH);
                receivers.push(rx);
                let (pool, stop) = (&pool, &stop);
                s.spawn(move || {
                    for &(i, pos, n) in chunks.iter().skip(w).step_by(workers) {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let r = self.read_cast(pool, &pieces[i], pos, n);
                        let failed = r.is_err();
                        if tx.send(r).is_err() || failed {
                            return;
                        }
                    }
                });
            }
            let mut overflow: Vec<(usize, u64)> = Vec::new();
            let result = (|| -> Result<()> {
                let mut begun = 0;
                for (j, &(i, _, n)) in chunks.iter().enumerate() {
                    self.check_cancel()?;
                    while begun <= i {
                        sink.begin(begun)?;
                        begun += 1;
                    }
                    let (buf, count) = receivers[j % workers]
                        .recv()
                        .expect("a worker sends every chunk or an error")?;
                    sink.write(&buf)?;
                    pool.put(buf);
                    if count > 0 {
                        match overflow.last_mut() {
                            Some((last, c)) if *last == i => *c += count,
                            _ => overflow.push((i, count)),
                        }
                    }
                    self.progress.advance(n);
                }
                while begun < pieces.len() {
                    sink.begin(begun)?;
                    begun += 1;
                }
                Ok(())
            })();
            if result.is_err() {
                stop.store(true, Ordering::Relaxed);
                // Unblock workers waiting to send.
                drop(receivers);
            }
            result.map(|_| overflow)
        })
    }

    /// Reads `n` bytes at `pos` of piece `p` and casts them; returns the output bytes and the
    /// count of values that left the target's range.
    pub(super) fn read_cast(
        &self,
        pool: &Pool,
        p: &Piece<'_>,
        pos: u64,
        n: u64,
    ) -> Result<(Vec<u8>, u64)> {
        let mut out = pool.get(Self::out_len(p, n));
        let mut scratch = pool.get(0);
        let r = self.read_cast_into(p, pos, n, &mut scratch, &mut out);
        pool.put(scratch);
        r.map(|count| (out, count))
    }

    /// Output bytes of `n` input bytes of piece `p`.
    pub(super) fn out_len(p: &Piece<'_>, n: u64) -> usize {
        if matches!(p.how, How::Fill(_)) || p.copied() {
            return n as usize;
        }
        if matches!(p.how, How::GgmlQ8) {
            return (n as usize) / (p.from.bitsize() / 8) / 32 * 34;
        }
        if matches!(p.how, How::Fp4(_)) {
            return (n as usize) / (p.from.bitsize() / 8) / 2;
        }
        (n as usize) / (p.from.bitsize() / 8) * (p.to.bitsize() / 8)
    }

    /// Reads `n` bytes at `pos` of piece `p` and casts them into `out` (exactly
    /// [`Self::out_len`] bytes), through `scratch` when the bytes change; returns the count of
    /// values that left the target's range.
    pub(super) fn read_cast_into(
        &self,
        p: &Piece<'_>,
        pos: u64,
        n: u64,
        scratch: &mut Vec<u8>,
        out: &mut [u8],
    ) -> Result<u64> {
        if let How::Fill(bytes) = &p.how {
            out.copy_from_slice(&bytes[pos as usize..(pos + n) as usize]);
            return Ok(0);
        }
        if p.copied() {
            self.sources.read(p.entry, pos, out)?;
            return Ok(0);
        }
        scratch.resize(n as usize, 0);
        self.sources.read(p.entry, pos, scratch)?;
        self.cast_bytes(p, pos, scratch, out)
    }

    /// Casts input bytes of piece `p` that start `pos` bytes into it into `out`.
    pub(super) fn cast_bytes(
        &self,
        p: &Piece<'_>,
        pos: u64,
        scratch: &[u8],
        out: &mut [u8],
    ) -> Result<u64> {
        let t = p.entry;
        let isz = p.from.bitsize() / 8;
        if let How::Quantize(s) = &p.how {
            s.quantize(p.from, scratch, pos / isz as u64, out);
            return Ok(0);
        }
        if let How::Fp4(s) = &p.how {
            s.quantize(scratch, pos / isz as u64, out);
            return Ok(0);
        }
        let failed = |e: cast::CastError| {
            Error::invalid(self.sources.path_of(t), format!("tensor `{}`: {e}", t.name))
        };
        if let Some(f) = p.factor {
            let count = self.cast_scaled(p, f, pos, scratch, out).map_err(failed)?;
            if !matches!(p.how, How::GgmlQ8) {
                self.note_nonzero(p, scratch, out);
            }
            return Ok(count);
        }
        if let How::GgmlQ8 = &p.how {
            let mut vals = vec![0u8; scratch.len() / isz * 4];
            cast::cast_checked(p.from, DType::F32, scratch, &mut vals, self.opts.range())
                .map_err(failed)?;
            let f: Vec<f32> = vals
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4")))
                .collect();
            crate::formats::gguf::ggml::quantize_q8_0(&f, out);
            return Ok(0);
        }
        let count = match &p.how {
            How::Dequantize(s) => s.dequantize_to(
                p.from,
                scratch,
                pos / isz as u64,
                p.to,
                out,
                self.opts.range(),
            ),
            _ => cast::cast_checked(p.from, p.to, scratch, out, self.opts.range()),
        }
        .map_err(failed)?;
        if p.from != p.to {
            self.note_nonzero(p, scratch, out);
        }
        Ok(count)
    }

    /// Records whether the input bytes and the output bytes of piece `p` held a non-zero value
    /// (the flush-to-zero warning).
    fn note_nonzero(&self, p: &Piece<'_>, scratch: &[u8], out: &[u8]) {
        let Some(seen) = self.nonzero else {
            return;
        };
        let (i, o) = (
            cast::any_nonzero(p.from, scratch),
            cast::any_nonzero(p.to, out),
        );
        let mut seen = seen.lock().expect("nonzero");
        let e = seen.entry(p.entry.name.clone()).or_default();
        *e = (e.0 | i, e.1 | o);
    }

    /// A scaled piece's chunk: its values (a payload dequantized first, in its scale's dtype)
    /// widened to f32, multiplied by `f` in f32, then cast to `p.to` (or quantized to Q8_0) as
    /// every cast is. A finite value that the product takes beyond f32's range counts as out
    /// of the target's range (and is clamped to its largest finite value under clamp).
    fn cast_scaled(
        &self,
        p: &Piece<'_>,
        f: Factor,
        pos: u64,
        scratch: &[u8],
        out: &mut [u8],
    ) -> std::result::Result<u64, cast::CastError> {
        let isz = p.from.bitsize() / 8;
        let dequantized;
        let (dtype, bytes) = match &p.how {
            How::Dequantize(s) => {
                let mut d = vec![0u8; scratch.len() / isz * (s.compute.bitsize() / 8)];
                s.dequantize(p.from, scratch, pos / isz as u64, &mut d);
                dequantized = d;
                (s.compute, &dequantized[..])
            }
            _ => (p.from, scratch),
        };
        let range = self.opts.range();
        let clamp = p.to.max_finite().unwrap_or(f64::MAX).min(f32::MAX as f64) as f32;
        let (vals, count) = cast::map_f32(dtype, bytes, |w| f.apply(w), range, clamp);
        if let How::GgmlQ8 = &p.how {
            crate::formats::gguf::ggml::quantize_q8_0(&vals, out);
            return Ok(0);
        }
        let mut staged = vec![0u8; vals.len() * 4];
        cast::encode_f32_slice(DType::F32, &vals, &mut staged);
        Ok(count + cast::cast_checked(DType::F32, p.to, &staged, out, range)?)
    }

    /// Converts every piece straight into its own buffer (`bufs[i]` holds piece `i`'s output),
    /// chunks in parallel and in any order: no writer, no chunk copies. Returns, per piece with
    /// any, the count of values that left the target's range.
    pub fn run_into(
        &self,
        pieces: &[Piece<'_>],
        bufs: &mut [&mut [u8]],
    ) -> Result<Vec<(usize, u64)>> {
        use rayon::prelude::*;
        /// Input bytes per chunk: small enough that the scratch copy stays in cache.
        const STEP: usize = 1 << 20;
        let mut work: Vec<(usize, u64, u64, &mut [u8])> = Vec::new();
        for (i, (p, buf)) in pieces.iter().zip(bufs.iter_mut()).enumerate() {
            let isz = p.from.bitsize() / 8;
            let osz = match &p.how {
                How::Dequantize(s) => (p.to.bitsize() / 8).max(s.compute.bitsize() / 8),
                _ => p.to.bitsize() / 8,
            };
            let step = (STEP / isz.max(osz).max(1) * isz.max(1)) as u64;
            let mut rest: &mut [u8] = buf;
            let mut pos = 0;
            while pos < p.entry.nbytes {
                let n = step.min(p.entry.nbytes - pos);
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(Self::out_len(p, n));
                work.push((i, pos, n, head));
                rest = tail;
                pos += n;
            }
        }
        let counts: Vec<(usize, u64)> = work
            .into_par_iter()
            .map_init(Vec::new, |scratch, (i, pos, n, dst)| {
                self.check_cancel()?;
                prefault(dst);
                let c = self.read_cast_into(&pieces[i], pos, n, scratch, dst)?;
                self.progress.advance(n);
                Ok((i, c))
            })
            .collect::<Result<_>>()?;
        let mut per: Vec<(usize, u64)> = Vec::new();
        for (i, c) in counts {
            if c == 0 {
                continue;
            }
            match per.iter_mut().find(|x| x.0 == i) {
                Some(x) => x.1 += c,
                None => per.push((i, c)),
            }
        }
        per.sort_unstable();
        Ok(per)
    }
}
