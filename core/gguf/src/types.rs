//! ggml tensor types: ids, names and storage layout.

use std::fmt;

/// A ggml tensor type id as stored in a GGUF tensor info.
///
/// Kept as the raw id so that files with types newer than this crate still open;
/// [`GgmlType::layout`] tells whether the storage size is known and
/// [`GgmlType::can_dequantize`] whether [`crate::dequantize`] handles it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q5_0: GgmlType = GgmlType(6);
    pub const Q5_1: GgmlType = GgmlType(7);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q8_1: GgmlType = GgmlType(9);
    pub const Q2_K: GgmlType = GgmlType(10);
    pub const Q3_K: GgmlType = GgmlType(11);
    pub const Q4_K: GgmlType = GgmlType(12);
    pub const Q5_K: GgmlType = GgmlType(13);
    pub const Q6_K: GgmlType = GgmlType(14);
    pub const Q8_K: GgmlType = GgmlType(15);
    pub const I8: GgmlType = GgmlType(24);
    pub const I16: GgmlType = GgmlType(25);
    pub const I32: GgmlType = GgmlType(26);
    pub const I64: GgmlType = GgmlType(27);
    pub const F64: GgmlType = GgmlType(28);
    pub const BF16: GgmlType = GgmlType(30);

    /// The ggml name of the type (`"Q4_1"`), or `"type#N"` for an unknown id.
    pub fn name(self) -> String {
        match table(self.0) {
            Some((name, _, _)) => name.to_string(),
            None => format!("type#{}", self.0),
        }
    }

    /// `(elements per block, bytes per block)`, when the type is known.
    pub fn layout(self) -> Option<(u64, u64)> {
        table(self.0).map(|(_, block, bytes)| (block, bytes))
    }

    /// Whether [`crate::dequantize`] converts this type to f32.
    pub fn can_dequantize(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::F64
                | GgmlType::Q8_0
                | GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
        )
    }

    /// Bytes taken by `n_elements` values of this type, if the type is known,
    /// `n_elements` is a whole number of blocks and nothing overflows.
    pub fn storage_size(self, n_elements: u64) -> Option<u64> {
        let (block, bytes) = self.layout()?;
        if n_elements % block != 0 {
            return None;
        }
        (n_elements / block).checked_mul(bytes)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// name, elements per block, bytes per block — from ggml's type traits.
fn table(id: u32) -> Option<(&'static str, u64, u64)> {
    Some(match id {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 36),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        16 => ("IQ2_XXS", 256, 66),
        17 => ("IQ2_XS", 256, 74),
        18 => ("IQ3_XXS", 256, 98),
        19 => ("IQ1_S", 256, 50),
        20 => ("IQ4_NL", 32, 18),
        21 => ("IQ3_S", 256, 110),
        22 => ("IQ2_S", 256, 82),
        23 => ("IQ4_XS", 256, 136),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", 256, 56),
        30 => ("BF16", 1, 2),
        34 => ("TQ1_0", 256, 54),
        35 => ("TQ2_0", 256, 66),
        39 => ("MXFP4", 32, 17),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sizes() {
        assert_eq!(GgmlType::Q4_1.name(), "Q4_1");
        assert_eq!(GgmlType(999).name(), "type#999");
        assert_eq!(GgmlType::Q8_0.storage_size(64), Some(68));
        assert_eq!(GgmlType::Q4_1.storage_size(33), None);
        assert_eq!(GgmlType::F16.storage_size(3), Some(6));
        assert_eq!(GgmlType(999).storage_size(32), None);
        assert_eq!(GgmlType::F32.storage_size(u64::MAX), None);
        assert!(GgmlType::BF16.can_dequantize());
        assert!(!GgmlType::Q4_K.can_dequantize());
    }
}
