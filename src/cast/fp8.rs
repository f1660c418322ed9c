//! The two 8-bit float formats torch casts to, ported bit for bit from c10
//! (`Float8_e4m3fn.h`, `Float8_e5m2.h`) and checked against torch 2.15's CPU `.to(dtype)`.
//!
//! One difference from the c10 scalar code: torch 2.15's CPU cast *saturates* f32 values beyond
//! the e4m3fn range to +-448 (inf included) instead of producing NaN. NaN stays NaN with its sign.

/// e4m3fn bits to f32 (exact).
pub fn e4m3_to_f32(b: u8) -> f32 {
    let w = (b as u32) << 24;
    let sign = w & 0x8000_0000;
    let nonsign = w & 0x7FFF_FFFF;
    let mut renorm_shift = if nonsign != 0 {
        nonsign.leading_zeros()
    } else {
        32
    };
    renorm_shift = renorm_shift.saturating_sub(4);
    let inf_nan_mask = ((nonsign.wrapping_add(0x0100_0000) as i32) >> 8) as u32 & 0x7F80_0000;
    let zero_mask = ((nonsign.wrapping_sub(1) as i32) >> 31) as u32;
    let result = sign
        | ((((nonsign << renorm_shift) >> 4)
            .wrapping_add((0x78u32.wrapping_sub(renorm_shift)) << 23)
            | inf_nan_mask)
            & !zero_mask);
    f32::from_bits(result)
}

/// AMD's e4m3fnuz / e5m2fnuz bits to f32 (exact): bias 8 / 16, no infinities, no negative zero,
/// `0x80` the only NaN (c10 `fp8_fnuz_to_fp32_value`).
pub fn fnuz_to_f32<const E: u32, const M: u32>(b: u8) -> f32 {
    if b == 0x80 {
        return f32::NAN;
    }
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((b >> M) & ((1 << E) - 1) as u8) as i32;
    let man = (b & ((1 << M) - 1) as u8) as f32;
    let bias = 1i32 << (E - 1);
    let scale = (1u32 << M) as f32;
    let v = if exp == 0 {
        man / scale * 2f32.powi(1 - bias)
    } else {
        (1.0 + man / scale) * 2f32.powi(exp - bias)
    };
    sign * v
}

/// f32 to e4m3fnuz bits, as c10 `fp8e4m3fnuz_from_fp32_value` (and torch 2.15 on CPU): round
/// to nearest even; values that round beyond 240, inf and NaN become NaN (`0x80`); no negative
/// zero.
pub fn f32_to_e4m3fnuz(f: f32) -> u8 {
    fnuz_from_f32(f, 0x87 << 23, 0x8C << 23, 0x78 << 23, 8, 20)
}

/// f32 to e5m2fnuz bits (c10 `fp8e5m2fnuz_from_fp32_value`): as [`f32_to_e4m3fnuz`], max 57344.
pub fn f32_to_e5m2fnuz(f: f32) -> u8 {
    fnuz_from_f32(f, 0x8F << 23, 0x85 << 23, 0x70 << 23, 16, 21)
}

fn fnuz_from_f32(
    f: f32,
    fnuz_max: u32,
    denorm_mask: u32,
    min_normal: u32,
    bias: u32,
    shift: u32,
) -> u8 {
    let mut f_bits = f.to_bits();
    let sign = f_bits & 0x8000_0000;
    f_bits ^= sign;
    if f_bits >= fnuz_max {
        // beyond the range, inf and NaN: the one NaN
        return 0x80;
    }
    let result: u8 = if f_bits < min_normal {
        let sum = (f32::from_bits(f_bits) + f32::from_bits(denorm_mask)).to_bits();
        let r = sum.wrapping_sub(denorm_mask) as u8;
        if r == 0 {
            return 0;
        }
        r
    } else {
        let mant_odd = (f_bits >> shift) & 1;
        f_bits = f_bits
            .wrapping_add((bias.wrapping_sub(127)) << 23)
            .wrapping_add((1 << (shift - 1)) - 1);
        f_bits = f_bits.wrapping_add(mant_odd);
        (f_bits >> shift) as u8
    };
    result | (sign >> 24) as u8
}

/// e8m0fnu bits (an exponent alone, MX scales) to f32: `2^(b - 127)`, `0xFF` NaN.
pub fn e8m0_to_f32(b: u8) -> f32 {
    match b {
        0xFF => f32::NAN,
        0 => f32::from_bits(0x0040_0000), // 2^-127, a subnormal
        _ => f32::from_bits((b as u32) << 23),
    }
}

/// f32 to e8m0fnu bits, as torch 2.15 casts on CPU: the exponent, rounded up when the
/// mantissa is at least one half (ties to even on the implied bit), the sign dropped; inf, NaN
/// and what rounds up beyond 2^127 become NaN (`0xFF`).
pub fn f32_to_e8m0(f: f32) -> u8 {
    let bits = f.to_bits();
    let mut exponent = (bits >> 23) & 0xFF;
    if exponent == 0xFF {
        return 0xFF;
    }
    let g = bits & 0x40_0000 != 0;
    let r = bits & 0x20_0000 != 0;
    let s = bits & 0x1F_FFFF != 0;
    let lsb = exponent > 0;
    if g && (r || s || lsb) {
        exponent += 1;
    }
    exponent as u8
}

/// Every e4m3fn and e5m2 value, by bits (decoding is one lookup).
fn tables() -> &'static ([f32; 256], [f32; 256]) {
    static T: std::sync::OnceLock<([f32; 256], [f32; 256])> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut a = [0f32; 256];
        let mut b = [0f32; 256];
        for i in 0..256 {
            a[i] = e4m3_to_f32(i as u8);
            b[i] = e5m2_to_f32(i as u8);
        }
        (a, b)
    })
}

/// Decodes e4m3fn bytes into f32 (exact), by table.
pub fn decode_e4m3(input: &[u8], out: &mut [f32]) {
    let t = &tables().0;
    for (o, b) in out.iter_mut().zip(input) {
        *o = t[*b as usize];
    }
}

/// Decodes e5m2 bytes into f32 (exact), by table.
pub fn decode_e5m2(input: &[u8], out: &mut [f32]) {
    let t = &tables().1;
    for (o, b) in out.iter_mut().zip(input) {
        *o = t[*b as usize];
    }
}

/// f32 to e4m3fn bits, as torch 2.15 does on CPU: round to nearest even, saturate to +-448.
pub fn f32_to_e4m3(f: f32) -> u8 {
    let bits = f.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    if f.is_nan() {
        return 0x7F | sign;
    }
    let mut f_bits = bits & 0x7FFF_FFFF;
    // Saturate: 448.0 is the largest finite e4m3fn value.
    const MAX_BITS: u32 = 0x43E0_0000; // 448.0f32
    if f_bits > MAX_BITS {
        f_bits = MAX_BITS;
    }
    let result: u8 = if f_bits < (121u32 << 23) {
        // Below 2^-6, the smallest normal: let the FPU round into the subnormal grid.
        let denorm_mask: u32 = 141u32 << 23;
        let sum = (f32::from_bits(f_bits) + f32::from_bits(denorm_mask)).to_bits();
        sum.wrapping_sub(denorm_mask) as u8
    } else {
        let mant_odd = (f_bits >> 20) & 1;
        f_bits = f_bits
            .wrapping_add(((7i32 - 127) as u32) << 23)
            .wrapping_add(0x7FFFF);
        f_bits = f_bits.wrapping_add(mant_odd);
        (f_bits >> 20) as u8
    };
    result | sign
}

/// e5m2 bits to f32 (exact): e5m2 is the top byte of an IEEE half.
pub fn e5m2_to_f32(b: u8) -> f32 {
    half::f16::from_bits((b as u16) << 8).to_f32()
}

/// f32 to e5m2 bits, as c10 does: round to nearest even, overflow to inf, NaN to NaN.
pub fn f32_to_e5m2(f: f32) -> u8 {
    const FP32_INF: u32 = 255 << 23;
    const FP8_MAX: u32 = 143 << 23;
    const DENORM_MASK: u32 = 134 << 23;
    let mut f_bits = f.to_bits();
    let sign = f_bits & 0x8000_0000;
    f_bits ^= sign;
    let result: u8 = if f_bits >= FP8_MAX {
        if f_bits > FP32_INF {
            0x7F
        } else {
            0x7C
        }
    } else if f_bits < (113u32 << 23) {
        let sum = (f32::from_bits(f_bits) + f32::from_bits(DENORM_MASK)).to_bits();
        sum.wrapping_sub(DENORM_MASK) as u8
    } else {
        let mant_odd = (f_bits >> 21) & 1;
        f_bits = f_bits
            .wrapping_add(((15i32 - 127) as u32) << 23)
            .wrapping_add(0xFFFFF);
        f_bits = f_bits.wrapping_add(mant_odd);
        (f_bits >> 21) as u8
    };
    result | (sign >> 24) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_known_values() {
        assert_eq!(f32_to_e4m3(1.0), 0x38);
        assert_eq!(f32_to_e4m3(448.0), 0x7E);
        assert_eq!(f32_to_e4m3(1000.0), 0x7E, "saturates like torch 2.15");
        assert_eq!(f32_to_e4m3(f32::NEG_INFINITY), 0xFE);
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7F);
        assert_eq!(f32_to_e4m3(-0.0), 0x80);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert!(e4m3_to_f32(0x7F).is_nan());
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
    }

    #[test]
    fn e4m3_round_trips_every_finite_code() {
        for b in 0..=255u8 {
            let f = e4m3_to_f32(b);
            if !f.is_nan() {
                assert_eq!(f32_to_e4m3(f), b, "code {b:#x} -> {f}");
            }
        }
    }

    #[test]
    fn e5m2_known_values() {
        assert_eq!(f32_to_e5m2(57344.0), 0x7B);
        assert_eq!(f32_to_e5m2(61440.0), 0x7C, "rounds to inf");
        assert_eq!(f32_to_e5m2(f32::NAN), 0x7F);
        assert_eq!(f32_to_e5m2(-f32::INFINITY), 0xFC);
        for b in 0..=255u8 {
            let f = e5m2_to_f32(b);
            if !f.is_nan() {
                assert_eq!(f32_to_e5m2(f), b, "code {b:#x}");
            }
        }
    }
}
