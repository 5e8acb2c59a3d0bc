//! Dequantization of ggml tensor data to f32.
//!
//! Block layouts (little-endian, 32 elements per block for the quantized types):
//! - `Q8_0`: f16 `d`, 32 × i8 `q`; `w = d·q`.
//! - `Q4_0`: f16 `d`, 16 bytes of nibbles; low nibbles are elements 0–15, high
//!   nibbles 16–31; `w = d·(q − 8)`.
//! - `Q4_1`: f16 `d`, f16 `m`, 16 bytes of nibbles as in `Q4_0`; `w = d·q + m`.
//! - `Q5_0`: f16 `d`, u32 `qh` (bit j is the 5th bit of element j), 16 bytes of
//!   nibbles as in `Q4_0`; `w = d·(q − 16)`.
//! - `Q5_1`: f16 `d`, f16 `m`, u32 `qh`, 16 bytes of nibbles; `w = d·q + m`.

use crate::types::GgmlType;

/// Why a buffer could not be dequantized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DequantError {
    #[error("cannot dequantize type {0}")]
    Unsupported(GgmlType),
    #[error(
        "{n_elements} elements of type {ty} take {} bytes, got {got}",
        .expected.map_or_else(|| "an impossible number of".to_string(), |e| e.to_string())
    )]
    Length {
        ty: GgmlType,
        n_elements: usize,
        expected: Option<u64>,
        got: usize,
    },
}

/// IEEE half precision bits to f32 (exact; handles subnormals, infinities and NaN).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match exp {
        0 => {
            // Zero or subnormal: man · 2^-24, exact in f32.
            let v = man as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        31 => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// bfloat16 bits to f32 (exact).
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Dequantize `n_elements` values of type `ty` stored in `data` (which must be exactly
/// the right length) to f32.
pub fn dequantize(ty: GgmlType, data: &[u8], n_elements: usize) -> Result<Vec<f32>, DequantError> {
    if !ty.can_dequantize() {
        return Err(DequantError::Unsupported(ty));
    }
    let expected = ty.storage_size(n_elements as u64);
    if expected != Some(data.len() as u64) {
        return Err(DequantError::Length {
            ty,
            n_elements,
            expected,
            got: data.len(),
        });
    }
    let mut out = Vec::with_capacity(n_elements);
    match ty {
        GgmlType::F32 => out.extend(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F64 => out.extend(data.chunks_exact(8).map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            f64::from_le_bytes(b) as f32
        })),
        GgmlType::F16 => out.extend(data.chunks_exact(2).map(|c| f16_to_f32(le16(c, 0)))),
        GgmlType::BF16 => out.extend(data.chunks_exact(2).map(|c| bf16_to_f32(le16(c, 0)))),
        GgmlType::Q8_0 => {
            for block in data.chunks_exact(34) {
                let d = f16_to_f32(le16(block, 0));
                out.extend(block[2..].iter().map(|&q| d * f32::from(q as i8)));
            }
        }
        GgmlType::Q4_0 => {
            for block in data.chunks_exact(18) {
                let d = f16_to_f32(le16(block, 0));
                let qs = &block[2..];
                out.extend(qs.iter().map(|&b| d * (f32::from(b & 0x0f) - 8.0)));
                out.extend(qs.iter().map(|&b| d * (f32::from(b >> 4) - 8.0)));
            }
        }
        GgmlType::Q4_1 => {
            for block in data.chunks_exact(20) {
                let d = f16_to_f32(le16(block, 0));
                let m = f16_to_f32(le16(block, 2));
                let qs = &block[4..];
                out.extend(qs.iter().map(|&b| d * f32::from(b & 0x0f) + m));
                out.extend(qs.iter().map(|&b| d * f32::from(b >> 4) + m));
            }
        }
        GgmlType::Q5_0 => {
            for block in data.chunks_exact(22) {
                let d = f16_to_f32(le16(block, 0));
                let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                let qs = &block[6..];
                let q5 = |j: usize, nib: u8| -> f32 {
                    let hi = ((qh >> j) & 1) as u8;
                    f32::from(nib | (hi << 4)) - 16.0
                };
                out.extend(qs.iter().enumerate().map(|(j, &b)| d * q5(j, b & 0x0f)));
                out.extend(qs.iter().enumerate().map(|(j, &b)| d * q5(j + 16, b >> 4)));
            }
        }
        GgmlType::Q5_1 => {
            for block in data.chunks_exact(24) {
                let d = f16_to_f32(le16(block, 0));
                let m = f16_to_f32(le16(block, 2));
                let qh = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
                let qs = &block[8..];
                let q5 = |j: usize, nib: u8| -> f32 {
                    let hi = ((qh >> j) & 1) as u8;
                    f32::from(nib | (hi << 4))
                };
                out.extend(qs.iter().enumerate().map(|(j, &b)| d * q5(j, b & 0x0f) + m));
                out.extend(
                    qs.iter()
                        .enumerate()
                        .map(|(j, &b)| d * q5(j + 16, b >> 4) + m),
                );
            }
        }
        _ => return Err(DequantError::Unsupported(ty)),
    }
    debug_assert_eq!(out.len(), n_elements);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_conversions() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
        assert_eq!(bf16_to_f32(0xc0a0), -5.0);
    }

    #[test]
    fn q4_0_block() {
        // d = 0.5, nibbles: byte j = (j as low) | ((15 - j) as high)
        let mut block = vec![0x00, 0x38]; // 0.5 in f16
        for j in 0..16u8 {
            block.push(j | ((15 - j) << 4));
        }
        let v = dequantize(GgmlType::Q4_0, &block, 32).unwrap();
        for j in 0..16 {
            assert_eq!(v[j], 0.5 * (j as f32 - 8.0));
            assert_eq!(v[16 + j], 0.5 * ((15 - j) as f32 - 8.0));
        }
    }

    #[test]
    fn q5_blocks() {
        // Q5_0 with d = 1: element j = low nibble j | bit j of qh, element 16+j uses bit 16+j.
        let qh: u32 = 0b1010_0000_0000_0000_0000_0000_0000_0101;
        let mut block = vec![0x00, 0x3c];
        block.extend_from_slice(&qh.to_le_bytes());
        for j in 0..16u8 {
            block.push(j | (3 << 4));
        }
        let v = dequantize(GgmlType::Q5_0, &block, 32).unwrap();
        assert_eq!(v[0], 16.0 - 16.0);
        assert_eq!(v[1], 1.0 - 16.0);
        assert_eq!(v[2], 18.0 - 16.0);
        assert_eq!(v[16 + 13], 19.0 - 16.0);
        assert_eq!(v[16 + 15], 19.0 - 16.0);
        assert_eq!(v[30], 3.0 - 16.0);
        // Q5_1 with d = 0.5, m = -1.
        let mut block = vec![0x00, 0x38, 0x00, 0xbc];
        block.extend_from_slice(&qh.to_le_bytes());
        block.extend_from_slice(&[0xff; 16]);
        let v = dequantize(GgmlType::Q5_1, &block, 32).unwrap();
        assert_eq!(v[0], 0.5 * 31.0 - 1.0);
        assert_eq!(v[1], 0.5 * 15.0 - 1.0);
        assert_eq!(v[31], 0.5 * 31.0 - 1.0);
    }

    #[test]
    fn wrong_lengths_and_types_are_errors() {
        assert!(matches!(
            dequantize(GgmlType::Q8_0, &[0u8; 33], 32),
            Err(DequantError::Length { .. })
        ));
        assert!(matches!(
            dequantize(GgmlType::F32, &[0u8; 8], 3),
            Err(DequantError::Length { .. })
        ));
        assert!(matches!(
            dequantize(GgmlType::Q4_K, &[0u8; 144], 256),
            Err(DequantError::Unsupported(_))
        ));
    }
}
