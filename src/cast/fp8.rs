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
