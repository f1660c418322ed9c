//! Low-bit packed weights (MXFP4, NVFP4, packed integers): how a weight's stored parts (the
//! packed payload, its scales, zero points) give its values, as pure functions over bytes.
//!
//! A packed weight is read in slabs: runs of whole output rows whose stored parts lie in a few
//! rectangular windows of the parts, so memory stays bounded by one slab whatever the tensor's
//! size. Each scheme ([`Scheme`]) names the windows of a run of rows and turns their bytes into
//! the rows' values, computed as its reference code computes them (cited per scheme), in f32
//! where that is exact; the tensor's dtype is the reference's own.

pub mod awq;
pub mod bnb;
pub mod ct;
pub mod gptq;
pub mod mxfp4;

pub use mxfp4::Mxfp4Experts;

/// E2M1 (FP4) values by code: sign bit 3, then exponent and mantissa (the OCP microscaling
/// spec; transformers' `FP4_VALUES`, compressed-tensors' `FLOAT_TO_E2M1`, ModelOpt's
/// `e2m1_values`).
pub const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Values a slab holds at most, when rows are short enough (bounds the per-thread buffers: 4M
/// values are 16 MiB of f32).
/// (Small in unit tests, so that small tensors span several slabs.)
const SLAB: u64 = if cfg!(test) { 1 << 9 } else { 1 << 22 };

/// A rectangle of one stored part: `rows` rows from `row0`, each `row_bytes` long, of which
/// bytes `byte0..byte0 + bytes` are read. A 1-D part is rows of one element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Which part (index into the weight's parts).
    pub part: usize,
    /// First row.
    pub row0: u64,
    /// Rows read.
    pub rows: u64,
    /// Bytes per row of the part.
    pub row_bytes: u64,
    /// First byte read within each row.
    pub byte0: u64,
    /// Bytes read per row.
    pub bytes: u64,
}

impl Window {
    /// Whole rows `row0..row0 + rows` of a part whose rows are `row_bytes` long.
    pub fn rows(part: usize, row0: u64, rows: u64, row_bytes: u64) -> Window {
        Window {
            part,
            row0,
            rows,
            row_bytes,
            byte0: 0,
            bytes: row_bytes,
        }
    }
}

/// One packed-weight scheme: its values seen as `rows()` output rows of `row_len()` values
/// (leading dimensions flattened), read in runs of rows.
pub trait Scheme {
    /// The shape of the values.
    fn shape(&self) -> Vec<u64>;
    /// The bytes each part must hold, in part order (checked against the stored parts before
    /// anything is read).
    fn part_bytes(&self) -> Vec<u64>;
    /// Values per output row.
    fn row_len(&self) -> u64;
    /// Output rows in all.
    fn rows(&self) -> u64;
    /// A run of rows starts at a multiple of this and, but at a segment's end, holds a
    /// multiple of it (rows that share a packed word or a block).
    fn row_unit(&self) -> u64 {
        1
    }
    /// Runs never cross a multiple of this (an expert of a 3-D tensor).
    fn segment(&self) -> u64 {
        self.rows()
    }
    /// The windows of the parts rows `row0..row0 + rows` read, in the order
    /// [`Scheme::decode`] takes them.
    fn windows(&self, row0: u64, rows: u64) -> Vec<Window>;
    /// What in the windows' bytes makes them undecodable (an index out of range), checked
    /// before [`Scheme::decode`]: the reader refuses the tensor with it.
    fn check(&self, _parts: &[Vec<u8>]) -> Result<(), String> {
        Ok(())
    }
    /// The values of rows `row0..row0 + rows` from their windows' bytes (`parts[i]` holds
    /// window `i`, its rows one after another), into `out`.
    fn decode(&self, row0: u64, rows: u64, parts: &[Vec<u8>], out: &mut [f32]);
}

/// How a packed weight's parts give its values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Packing {
    /// gpt-oss's MXFP4 MoE experts.
    Mxfp4Experts(Mxfp4Experts),
    /// compressed-tensors' and ModelOpt's packed weights (integers, NVFP4, MXFP4).
    Ct(ct::Ct),
    /// GPTQ.
    Gptq(gptq::Gptq),
    /// AWQ.
    Awq(awq::Awq),
    /// bitsandbytes.
    Bnb(bnb::Bnb),
}

macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            Packing::Mxfp4Experts($s) => $e,
            Packing::Ct($s) => $e,
            Packing::Gptq($s) => $e,
            Packing::Awq($s) => $e,
            Packing::Bnb($s) => $e,
        }
    };
}

impl Packing {
    fn scheme(&self) -> &dyn Scheme {
        each!(self, s => s)
    }

    /// The shape of the values.
    pub fn shape(&self) -> Vec<u64> {
        self.scheme().shape()
    }

    /// Values in the whole tensor.
    pub fn numel(&self) -> u64 {
        self.shape().iter().product()
    }

    /// The bytes each part must hold, in part order.
    pub fn part_bytes(&self) -> Vec<u64> {
        self.scheme().part_bytes()
    }

    /// Output rows per slab: whole units, at least one.
    fn slab_rows(&self) -> u64 {
        let s = self.scheme();
        let unit = s.row_unit().max(1);
        let want = (SLAB / s.row_len().max(1)).max(1);
        ((want / unit).max(1) * unit).min(s.segment().max(1))
    }

    /// Slab `k`'s first output row and row count.
    fn slab_span(&self, k: u64) -> (u64, u64) {
        let s = self.scheme();
        let seg = s.segment().max(1);
        let per = self.slab_rows();
        let per_seg = seg.div_ceil(per);
        let (g, j) = (k / per_seg, k % per_seg);
        let first = g * seg + j * per;
        (first, per.min(seg - j * per).min(s.rows() - first))
    }

    /// Values slab `k` holds.
    pub fn slab_len(&self, k: u64) -> u64 {
        self.slab_span(k).1 * self.scheme().row_len()
    }

    /// The slab holding value `e`, and `e`'s position in it.
    pub fn locate(&self, e: u64) -> (u64, u64) {
        let s = self.scheme();
        let (row_len, seg) = (s.row_len().max(1), s.segment().max(1));
        let per = self.slab_rows();
        let (row, col) = (e / row_len, e % row_len);
        let (g, within) = (row / seg, row % seg);
        let j = within / per;
        (
            g * seg.div_ceil(per) + j,
            (within - j * per) * row_len + col,
        )
    }

    /// The windows of the parts slab `k` reads.
    pub fn windows(&self, k: u64) -> Vec<Window> {
        let (row0, rows) = self.slab_span(k);
        self.scheme().windows(row0, rows)
    }

    /// Slab `k`'s values from its windows' bytes, into `out` (`slab_len(k)` values); an error
    /// when the bytes hold what the scheme cannot decode (nothing is written to `out` then).
    pub fn decode(&self, k: u64, parts: &[Vec<u8>], out: &mut [f32]) -> Result<(), String> {
        let (row0, rows) = self.slab_span(k);
        self.scheme().check(parts)?;
        self.scheme().decode(row0, rows, parts, out);
        Ok(())
    }
}

/// Unsigned little-endian integer of `width` bytes at `at`.
#[inline]
pub fn le(b: &[u8], at: usize, width: usize) -> u64 {
    let mut v = 0u64;
    for i in (0..width).rev() {
        v = v << 8 | b[at + i] as u64;
    }
    v
}

/// The bytes of `windows` cut out of whole parts, as the reader reads them from the files
/// (for the schemes' tests).
#[cfg(test)]
pub(crate) fn cut(windows: &[Window], parts: &[impl AsRef<[u8]>]) -> Vec<Vec<u8>> {
    windows
        .iter()
        .map(|w| {
            let mut b = Vec::new();
            for r in w.row0..w.row0 + w.rows {
                let at = (r * w.row_bytes + w.byte0) as usize;
                b.extend_from_slice(&parts[w.part].as_ref()[at..at + w.bytes as usize]);
            }
            b
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    /// Every value of `p`, slab by slab, each slab from its windows cut out of the whole parts
    /// (what the reader does with the files).
    fn decode_all(p: &Packing, parts: &[Vec<u8>]) -> Vec<f32> {
        let mut all = Vec::new();
        let mut k = 0;
        while (all.len() as u64) < p.numel() {
            let cut = cut(&p.windows(k), parts);
            let mut out = vec![0f32; p.slab_len(k) as usize];
            p.decode(k, &cut, &mut out).expect("decodable");
            all.extend(out);
            k += 1;
        }
        assert!(k > 2, "the test needs several slabs");
        all
    }

    /// `bits`-wide values `vals` as one little-endian bit stream, in int32 words.
    fn stream(vals: &[u64], bits: u64, words: usize) -> Vec<u8> {
        let mut w = vec![0u32; words];
        for (i, v) in vals.iter().enumerate() {
            let at = i as u64 * bits;
            let (k, s) = ((at / 32) as usize, at % 32);
            w[k] |= (v << s) as u32;
            if s + bits > 32 {
                w[k + 1] |= (v >> (32 - s)) as u32;
            }
        }
        w.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn packed_integers_with_packed_zero_points_across_slabs() {
        let (out, inn, group, bits) = (70u64, 40u64, 8u64, 3u64);
        let groups = inn / group;
        let mut seed = 7u64;
        let mut next = |m: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % m
        };
        let q: Vec<u64> = (0..out * inn).map(|_| next(8)).collect();
        let z: Vec<u64> = (0..out * groups).map(|_| next(8)).collect();
        let s: Vec<f32> = (0..out * groups).map(|i| 0.25 + i as f32 / 64.0).collect();
        let row_words = (inn * bits).div_ceil(32) as usize;
        let payload: Vec<u8> = (0..out as usize)
            .flat_map(|r| {
                stream(
                    &q[r * inn as usize..(r + 1) * inn as usize],
                    bits,
                    row_words,
                )
            })
            .collect();
        // zero points: one stream per column (group), down the rows
        let zw = (out * bits).div_ceil(32) as usize;
        let cols: Vec<Vec<u8>> = (0..groups as usize)
            .map(|g| {
                let col: Vec<u64> = (0..out as usize)
                    .map(|r| z[r * groups as usize + g])
                    .collect();
                stream(&col, bits, zw)
            })
            .collect();
        let zero: Vec<u8> = (0..zw)
            .flat_map(|w| cols.iter().flat_map(move |c| c[w * 4..w * 4 + 4].to_vec()))
            .collect();
        let scale: Vec<u8> = s.iter().flat_map(|x| x.to_le_bytes()).collect();
        let ct = ct::Ct {
            kind: ct::Kind::Int {
                bits: bits as u8,
                packed: true,
            },
            out,
            inn,
            group,
            scale: DType::F32,
            zero: ct::Zero::Packed,
        };
        let p = Packing::Ct(ct);
        assert_eq!(
            p.part_bytes(),
            vec![payload.len() as u64, scale.len() as u64, zero.len() as u64]
        );
        let got = decode_all(&p, &[payload, scale, zero]);
        let half = 1i64 << (bits - 1);
        for r in 0..out as usize {
            for c in 0..inn as usize {
                let g = r * groups as usize + c / group as usize;
                let want =
                    ((q[r * inn as usize + c] as i64 - half) - (z[g] as i64 - half)) as f32 * s[g];
                assert_eq!(got[r * inn as usize + c], want, "row {r} col {c}");
            }
        }
    }

    #[test]
    fn mxfp4_experts_transposed_across_slabs() {
        let (e, r, g) = (2u64, 24u64, 3u64);
        let blocks: Vec<u8> = (0..e * r * g * 16).map(|i| (i * 37 % 256) as u8).collect();
        let scales: Vec<u8> = (0..e * r * g).map(|i| (120 + i % 15) as u8).collect();
        let p = Packing::Mxfp4Experts(Mxfp4Experts {
            experts: e,
            rows: r,
            groups: g,
            transpose: true,
        });
        let got = decode_all(&p, &[blocks.clone(), scales.clone()]);
        for x in 0..e {
            for i in 0..g * 32 {
                for row in 0..r {
                    let blk = (x * r + row) * g + i / 32;
                    let byte = blocks[(blk * 16 + i % 32 / 2) as usize];
                    let code = if i % 2 == 0 { byte & 15 } else { byte >> 4 };
                    let want = mxfp4::e8m0_scaled(E2M1[code as usize], scales[blk as usize]);
                    assert_eq!(got[((x * g * 32 + i) * r + row) as usize], want);
                }
            }
        }
    }

    #[test]
    fn slabs_cover_every_value_once() {
        for transpose in [false, true] {
            let p = Packing::Mxfp4Experts(Mxfp4Experts {
                experts: 3,
                rows: 5,
                groups: 2,
                transpose,
            });
            let mut k = 0;
            let mut total = 0;
            while total < p.numel() {
                let n = p.slab_len(k);
                assert!(n > 0);
                for i in 0..n {
                    assert_eq!(p.locate(total + i), (k, i));
                }
                total += n;
                k += 1;
            }
            assert_eq!(total, p.numel());
        }
    }
}
