//! Dequantizing ggml's block types (GGUF): Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the K-quants Q2_K
//! to Q6_K and MXFP4, to f32 bit for bit as `gguf.quants.dequantize` computes them (the same
//! f32 products and sums, in the same order; no fused multiply-add).

use half::f16;

/// Whether the ggml type `id` is one this module dequantizes.
pub fn supported(id: u32) -> bool {
    matches!(id, 2 | 3 | 6 | 7 | 8 | 10..=14 | 39)
}

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Dequantizes whole blocks of ggml type `id` (`bytes` per block, `block` elements each) into
/// `out` (`block` values per block). `raw.len()` must be a multiple of `bytes` and
/// `out.len()` the matching number of values; returns `false` for a type it does not know.
pub fn dequantize(id: u32, bytes: usize, block: usize, raw: &[u8], out: &mut [f32]) -> bool {
    if !supported(id) || raw.len() % bytes != 0 || out.len() != raw.len() / bytes * block {
        return false;
    }
    for (b, o) in raw.chunks_exact(bytes).zip(out.chunks_exact_mut(block)) {
        match id {
            8 => q8_0(b, o),
            2 => q4_0(b, o),
            3 => q4_1(b, o),
            6 => q5_0(b, o),
            7 => q5_1(b, o),
            10 => q2_k(b, o),
            11 => q3_k(b, o),
            12 => q4_k(b, o),
            13 => q5_k(b, o),
            14 => q6_k(b, o),
            39 => mxfp4(b, o),
            _ => unreachable!("checked"),
        }
    }
    true
}

/// Quantizes `x` (a whole number of 32-value blocks) to Q8_0 blocks in `out`, as ggml's
/// `quantize_row_q8_0_ref` does: `d = amax / 127`, values `roundf(x / d)` (halves away from
/// zero), `d` stored as f16.
pub fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    for (b, o) in x.chunks_exact(32).zip(out.chunks_exact_mut(34)) {
        let amax = b
            .iter()
            .fold(0f32, |m, v| if m > v.abs() { m } else { v.abs() });
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        o[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        for (q, v) in o[2..].iter_mut().zip(b) {
            *q = (v * id).round() as i8 as u8;
        }
    }
}

fn q8_0(b: &[u8], o: &mut [f32]) {
    let d = h(b, 0);
    for (x, &q) in o.iter_mut().zip(&b[2..34]) {
        *x = (q as i8) as f32 * d;
    }
}

fn q4_0(b: &[u8], o: &mut [f32]) {
    let d = h(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        o[j] = d * ((qs[j] & 0x0F) as i8 - 8) as f32;
        o[j + 16] = d * ((qs[j] >> 4) as i8 - 8) as f32;
    }
}

fn q4_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (h(b, 0), h(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        o[j] = d * (qs[j] & 0x0F) as f32 + m;
        o[j + 16] = d * (qs[j] >> 4) as f32 + m;
    }
}

/// The 32 five-bit values of a Q5 block: low nibbles from `qs`, fifth bits from `qh`.
fn q5_values(qh: u32, qs: &[u8]) -> [u8; 32] {
    let mut v = [0u8; 32];
    for (j, x) in v.iter_mut().enumerate() {
        let low = if j < 16 {
            qs[j] & 0x0F
        } else {
            qs[j - 16] >> 4
        };
        *x = low | ((((qh >> j) & 1) as u8) << 4);
    }
    v
}

fn q5_0(b: &[u8], o: &mut [f32]) {
    let d = h(b, 0);
    let qh = u32::from_le_bytes(b[2..6].try_into().expect("4"));
    for (x, q) in o.iter_mut().zip(q5_values(qh, &b[6..22])) {
        *x = d * (q as i8 - 16) as f32;
    }
}

fn q5_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (h(b, 0), h(b, 2));
    let qh = u32::from_le_bytes(b[4..8].try_into().expect("4"));
    for (x, q) in o.iter_mut().zip(q5_values(qh, &b[8..24])) {
        *x = d * q as f32 + m;
    }
}

fn q2_k(b: &[u8], o: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (h(b, 80), h(b, 82));
    for (e, x) in o.iter_mut().enumerate() {
        let (c, s, l) = (e / 128, (e % 128) / 32, e % 32);
        let q = ((qs[c * 32 + l] >> (2 * s)) & 3) as f32;
        let sc = scales[e / 16];
        let dl = d * (sc & 0x0F) as f32;
        let ml = dmin * (sc >> 4) as f32;
        *x = dl * q - ml;
    }
}

fn q3_k(b: &[u8], o: &mut [f32]) {
    let (hmask, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = h(b, 108);
    let mut dl = [0f32; 16];
    for (k, x) in dl.iter_mut().enumerate() {
        let low = if k < 8 { sc[k] } else { sc[k - 8] >> 4 };
        let high = sc[8 + k % 4] >> (2 * (k / 4));
        let s = (low & 0x0F) | ((high & 3) << 4);
        *x = d * (s as i8 - 32) as f32;
    }
    for (e, x) in o.iter_mut().enumerate() {
        let (c, s, l) = (e / 128, (e % 128) / 32, e % 32);
        let ql = (qs[c * 32 + l] >> (2 * s)) & 3;
        let qh = ((hmask[l] >> (e / 32)) & 1) ^ 1;
        let q = (ql as i8 - (qh << 2) as i8) as f32;
        *x = dl[e / 16] * q;
    }
}

/// Q4_K/Q5_K's eight 6-bit scales and mins, packed in 12 bytes.
fn scale_min(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[4 + j] & 0x3F;
        sc[4 + j] = (s[8 + j] & 0x0F) | ((s[j] >> 2) & 0x30);
        mn[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30);
    }
    (sc, mn)
}

fn q4_k(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (h(b, 0), h(b, 2));
    let (sc, mn) = scale_min(&b[4..16]);
    let qs = &b[16..144];
    for (e, x) in o.iter_mut().enumerate() {
        let j = e / 32;
        let (c, s, l) = (j / 2, j % 2, e % 32);
        let q = ((qs[c * 32 + l] >> (4 * s)) & 0x0F) as f32;
        *x = d * sc[j] as f32 * q - dmin * mn[j] as f32;
    }
}

fn q5_k(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (h(b, 0), h(b, 2));
    let (sc, mn) = scale_min(&b[4..16]);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for (e, x) in o.iter_mut().enumerate() {
        let j = e / 32;
        let (c, s, l) = (j / 2, j % 2, e % 32);
        let ql = (qs[c * 32 + l] >> (4 * s)) & 0x0F;
        let hb = (qh[l] >> j) & 1;
        let q = (ql | (hb << 4)) as f32;
        *x = d * sc[j] as f32 * q - dmin * mn[j] as f32;
    }
}

fn q6_k(b: &[u8], o: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = h(b, 208);
    for (e, x) in o.iter_mut().enumerate() {
        let (c, s, l) = (e / 128, (e % 128) / 64, e % 64);
        let lo = (ql[c * 64 + l] >> (4 * s)) & 0x0F;
        let (s2, l2) = ((e % 128) / 32, e % 32);
        let hi = (qh[c * 32 + l2] >> (2 * s2)) & 3;
        let q = ((lo | (hi << 4)) as i8 - 32) as f32;
        let dd = d * (scales[e / 16] as i8) as f32;
        *x = dd * q;
    }
}

/// MXFP4's e2m1 values, doubled (gguf-py's `MXFP4.kvalues`; index 8 is +0, not -0).
const MXFP4_KVALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Half the E8M0 scale `2^(e - 127)`, i.e. `2^(e - 128)`, built from its bits as ggml's
/// `ggml_e8m0_to_fp32_half` (and gguf-py's `MXFP4.e8m0_to_fp32_half`) do: subnormal for
/// `e` 0 and 1; `e` 255 is `2^127`, not NaN.
fn e8m0_to_fp32_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        (e as u32 - 1) << 23
    };
    f32::from_bits(bits)
}

/// One E8M0 exponent byte, then 16 bytes of e2m1 nibbles: values `0..16` from the low nibbles,
/// `16..32` from the high ones, each `d * kvalue` (which overflows to ±inf for large `e`).
fn mxfp4(b: &[u8], o: &mut [f32]) {
    let d = e8m0_to_fp32_half(b[0]);
    let qs = &b[1..17];
    for j in 0..16 {
        o[j] = d * MXFP4_KVALUES[(qs[j] & 0x0F) as usize] as f32;
        o[j + 16] = d * MXFP4_KVALUES[(qs[j] >> 4) as usize] as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_and_q4_0_by_hand() {
        // d = 0.5, values -4..27
        let mut b = f16::from_f32(0.5).to_bits().to_le_bytes().to_vec();
        b.extend((0..32).map(|i| (i as i8 - 4) as u8));
        let mut o = [0f32; 32];
        assert!(dequantize(8, 34, 32, &b, &mut o));
        assert_eq!(o[0], -2.0);
        assert_eq!(o[31], 13.5);
        // Q4_0: nibble 0x0F low, 0x01 high in every byte: 7*d and -7*d
        let mut b = f16::from_f32(2.0).to_bits().to_le_bytes().to_vec();
        b.extend([0x1F; 16]);
        let mut o = [0f32; 32];
        assert!(dequantize(2, 18, 32, &b, &mut o));
        assert_eq!((o[0], o[16]), (14.0, -14.0));
        // a type it does not know, a partial block
        assert!(!dequantize(20, 18, 32, &b, &mut o));
        assert!(!dequantize(2, 18, 32, &b[..17], &mut o));
    }

    #[test]
    fn mxfp4_by_hand() {
        let block = |e: u8, qs: &[u8]| {
            let mut b = vec![e];
            b.extend(qs);
            b.resize(17, 0);
            let mut o = [f32::NAN; 32];
            assert!(dequantize(39, 17, 32, &b, &mut o));
            o
        };
        assert!(supported(39));
        // e = 127: d = 0.5, the plain e2m1 values; low nibbles first, then high nibbles
        let o = block(127, &[0x97, 0x0F, 0x85, 0x21]);
        assert_eq!((o[0], o[16]), (6.0, -0.5));
        assert_eq!((o[1], o[17]), (-6.0, 0.0));
        assert_eq!((o[2], o[18]), (3.0, 0.0));
        assert_eq!((o[3], o[19]), (0.5, 1.0));
        // nibbles 0 and 8 are both +0
        assert_eq!(
            (o[17].to_bits(), o[18].to_bits(), o[4].to_bits()),
            (0, 0, 0)
        );
        // e = 0: d = 2^-128 (subnormal bits 0x0020_0000); e = 1: 2^-127
        let o = block(0, &[0x31, 0x07]);
        assert_eq!(o[0].to_bits(), 0x0020_0000);
        assert_eq!(o[16], 3.0 * 2f32.powi(-64) * 2f32.powi(-64));
        // 12 * 2^-128 = 1.5 * 2^-125, a normal number; -1 * 2^-127 at e = 1
        assert_eq!(o[1], 12.0 * 2f32.powi(-64) * 2f32.powi(-64));
        assert_eq!(block(1, &[0x09])[0].to_bits(), 0x8040_0000);
        // e = 254: d = 2^126; 3 * d is finite, 4 * d = 2^128 overflows to inf
        let o = block(254, &[0x43, 0xC2]);
        assert_eq!(o[0], 1.5 * 2f32.powi(127));
        assert_eq!(o[16], f32::INFINITY);
        assert_eq!((o[1], o[17]), (2f32.powi(127), f32::NEG_INFINITY));
        // e = 255: d = 2^127, not NaN; 2 * d is inf
        let o = block(255, &[0x21]);
        assert_eq!((o[0].to_bits(), o[16]), (0x7F00_0000, f32::INFINITY));
        assert!(o.iter().all(|v| !v.is_nan()));
    }
}
