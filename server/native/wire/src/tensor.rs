//! The protocol's tensor datatypes and the size arithmetic every check shares.

/// An Open Inference Protocol datatype (BF16 travels as its 16-bit patterns, BYTES as
/// 4-byte little-endian lengths each followed by the element).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
    Bf16,
    Bytes,
}

impl Dtype {
    pub const ALL: [Dtype; 14] = [
        Dtype::Bool,
        Dtype::Uint8,
        Dtype::Uint16,
        Dtype::Uint32,
        Dtype::Uint64,
        Dtype::Int8,
        Dtype::Int16,
        Dtype::Int32,
        Dtype::Int64,
        Dtype::Fp16,
        Dtype::Fp32,
        Dtype::Fp64,
        Dtype::Bf16,
        Dtype::Bytes,
    ];

    pub fn parse(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::Uint8 => "UINT8",
            Dtype::Uint16 => "UINT16",
            Dtype::Uint32 => "UINT32",
            Dtype::Uint64 => "UINT64",
            Dtype::Int8 => "INT8",
            Dtype::Int16 => "INT16",
            Dtype::Int32 => "INT32",
            Dtype::Int64 => "INT64",
            Dtype::Fp16 => "FP16",
            Dtype::Fp32 => "FP32",
            Dtype::Fp64 => "FP64",
            Dtype::Bf16 => "BF16",
            Dtype::Bytes => "BYTES",
        }
    }

    /// Bytes per element; None for BYTES, whose elements carry their own lengths.
    pub fn itemsize(self) -> Option<usize> {
        match self {
            Dtype::Bool | Dtype::Uint8 | Dtype::Int8 => Some(1),
            Dtype::Uint16 | Dtype::Int16 | Dtype::Fp16 | Dtype::Bf16 => Some(2),
            Dtype::Uint32 | Dtype::Int32 | Dtype::Fp32 => Some(4),
            Dtype::Uint64 | Dtype::Int64 | Dtype::Fp64 => Some(8),
            Dtype::Bytes => None,
        }
    }
}

/// Hard cap on one tensor's elements whatever its shape claims (server/codec.py's MAX_ELEMENTS).
pub const MAX_ELEMENTS: u64 = 1 << 31;

/// The element count of a shape, or None when a dimension is negative or the count passes
/// MAX_ELEMENTS (forged shapes: the Python codec words the refusal).
pub fn element_count(shape: &[i64]) -> Option<u64> {
    let mut count: u64 = 1;
    for &dim in shape {
        if dim < 0 {
            return None;
        }
        count = count.checked_mul(dim as u64)?;
        if count > MAX_ELEMENTS {
            return None;
        }
    }
    Some(count)
}

/// Whether `data` holds exactly `count` length-prefixed BYTES elements.
pub fn bytes_elements_fit(data: &[u8], count: u64) -> bool {
    if (data.len() as u64) < 4 * count {
        return false;
    }
    let mut offset = 0usize;
    for _ in 0..count {
        let Some(prefix) = data.get(offset..offset + 4) else {
            return false;
        };
        let length = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        offset += 4;
        match offset.checked_add(length) {
            Some(end) if end <= data.len() => offset = end,
            _ => return false,
        }
    }
    offset == data.len()
}

/// The elements of a BYTES tensor's wire form (already checked with `bytes_elements_fit`).
pub fn bytes_elements(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut offset = 0usize;
    std::iter::from_fn(move || {
        let prefix = data.get(offset..offset + 4)?;
        let length = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        let start = offset + 4;
        let element = data.get(start..start + length)?;
        offset = start + length;
        Some(element)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_datatype_name_round_trips() {
        for dtype in Dtype::ALL {
            assert_eq!(Dtype::parse(dtype.name()), Some(dtype));
        }
        assert_eq!(Dtype::parse("FP8"), None);
        assert_eq!(Dtype::parse("fp32"), None);
    }

    #[test]
    fn element_count_refuses_negative_and_forged_shapes() {
        assert_eq!(element_count(&[2, 3]), Some(6));
        assert_eq!(element_count(&[]), Some(1));
        assert_eq!(element_count(&[4, 0]), Some(0));
        assert_eq!(element_count(&[-1, 3]), None);
        assert_eq!(element_count(&[1 << 31, 2]), None);
        assert_eq!(element_count(&[i64::MAX, i64::MAX]), None);
    }

    #[test]
    fn bytes_elements_must_fill_the_buffer_exactly() {
        let mut data = Vec::new();
        for word in [&b"ab"[..], b"", b"xyz"] {
            data.extend_from_slice(&(word.len() as u32).to_le_bytes());
            data.extend_from_slice(word);
        }
        assert!(bytes_elements_fit(&data, 3));
        assert!(!bytes_elements_fit(&data, 2));
        assert!(!bytes_elements_fit(&data, 4));
        assert!(!bytes_elements_fit(&data[..data.len() - 1], 3));
        let words: Vec<&[u8]> = bytes_elements(&data).collect();
        assert_eq!(words, vec![&b"ab"[..], b"", b"xyz"]);
        // A length prefix past the end of the data.
        assert!(!bytes_elements_fit(&[0xff, 0xff, 0xff, 0x7f], 1));
    }
}
