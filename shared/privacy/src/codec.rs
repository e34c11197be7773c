//! The wire codec for adapter deltas: encoding on the device (f32 or stochastic 8-bit) and
//! strict, bounded decoding of untrusted bytes on the aggregator.
//!
//! Byte format, little-endian: `MAGIC` (`FPD1`), version byte `1`, u32 tensor count, then per
//! tensor in strictly increasing name order: u16 name length and that many UTF-8 bytes
//! (1..=256), u8 rank (1..=4), rank × u32 dims (each ≥ 1), u8 encoding tag (1 = f32, 2 = q8),
//! then the values: for f32, n × f32; for q8, an f32 scale (finite, ≥ 0) and n × i8 codes
//! in -127..=127, each decoding to `code × scale`. Nothing may follow the last tensor.

use rand::Rng;

use crate::tensors::AdapterTensors;

pub const MAGIC: [u8; 4] = *b"FPD1";
pub const VERSION: u8 = 1;
/// Longest tensor name, in bytes.
pub const MAX_NAME_LEN: usize = 256;
/// Highest tensor rank.
pub const MAX_RANK: usize = 4;

const TAG_F32: u8 = 1;
const TAG_Q8: u8 = 2;
/// Slack over `sqrt(n) · scale` covering f32 rounding of `code × scale` (≤ 127 · 2⁻²⁴).
const Q8_ROUNDING_SLACK: f64 = 1e-5;

/// How tensor values travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Exact: 4 bytes a value.
    F32,
    /// One f32 scale per tensor and a stochastically rounded i8 per value.
    Q8,
}

/// What `decode` will accept before it allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    pub max_tensors: usize,
    /// Total values over all tensors.
    pub max_values: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_tensors: 4096,
            max_values: 64 << 20,
        }
    }
}

/// Why bytes did not decode.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("bad magic: not a fedpersona delta")]
    BadMagic,
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u8),
    #[error("input truncated in {what}")]
    Truncated { what: &'static str },
    #[error("{0} trailing bytes after the last tensor")]
    TrailingBytes(usize),
    #[error("bad tensor name: {reason}")]
    BadName { reason: &'static str },
    #[error("duplicate tensor name {0:?}")]
    DuplicateName(String),
    #[error("tensor name {0:?} is out of sorted order")]
    UnsortedName(String),
    #[error("tensor {name}: {reason}")]
    BadShape { name: String, reason: &'static str },
    #[error("too many {what}: limit {limit}")]
    TooLarge { what: &'static str, limit: usize },
    #[error("tensor {name}: NaN or infinite value or scale")]
    NonFinite { name: String },
    #[error("tensor {name}: q8 code -128 is outside -127..=127")]
    BadQ8Code { name: String },
    #[error("unknown encoding tag {0}")]
    BadEncodingTag(u8),
}

/// Exact length of `encode(tensors, encoding, _)`.
pub fn encoded_len(tensors: &AdapterTensors, encoding: Encoding) -> usize {
    let per_tensor: usize = tensors
        .iter()
        .map(|(name, t)| {
            let values = match encoding {
                Encoding::F32 => 4 * t.data.len(),
                Encoding::Q8 => 4 + t.data.len(),
            };
            2 + name.len() + 1 + 4 * t.shape.len() + 1 + values
        })
        .sum();
    MAGIC.len() + 1 + 4 + per_tensor
}

/// Encodes `tensors`; `rng` drives the stochastic rounding of `Encoding::Q8`.
///
/// Non-finite values are written so that `decode` rejects them (as they are for f32, as a NaN
/// scale for q8).
///
/// # Panics
/// If the tensors break the format's invariants: a name empty or over 256 bytes, a rank
/// outside 1..=4, a dim of 0 or over `u32::MAX`, data not matching the shape, or more than
/// `u32::MAX` tensors.
pub fn encode(tensors: &AdapterTensors, encoding: Encoding, rng: &mut impl Rng) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(tensors, encoding));
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    let count = u32::try_from(tensors.len()).expect("more than u32::MAX tensors");
    out.extend_from_slice(&count.to_le_bytes());
    for (name, t) in tensors.iter() {
        assert!(
            (1..=MAX_NAME_LEN).contains(&name.len()),
            "tensor name {name:?} must be 1..=256 bytes"
        );
        assert!(
            (1..=MAX_RANK).contains(&t.shape.len()),
            "tensor {name}: rank {} outside 1..=4",
            t.shape.len()
        );
        assert_eq!(
            t.shape.iter().product::<usize>(),
            t.data.len(),
            "tensor {name}: shape and data disagree"
        );
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(t.shape.len() as u8);
        for &d in &t.shape {
            let d = u32::try_from(d)
                .ok()
                .filter(|&d| d > 0)
                .unwrap_or_else(|| panic!("tensor {name}: dim {d} outside 1..=u32::MAX"));
            out.extend_from_slice(&d.to_le_bytes());
        }
        match encoding {
            Encoding::F32 => {
                out.push(TAG_F32);
                t.data
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
            }
            Encoding::Q8 => {
                out.push(TAG_Q8);
                let scale = q8_scale(&t.data);
                out.extend_from_slice(&scale.to_le_bytes());
                let scale = f64::from(scale);
                for &x in &t.data {
                    let code = if scale > 0.0 && scale.is_finite() {
                        let v = f64::from(x) / scale;
                        let lo = v.floor();
                        let up = rng.random::<f64>() < v - lo;
                        (lo + f64::from(u8::from(up))).clamp(-127.0, 127.0) as i8
                    } else {
                        0
                    };
                    out.push(code as u8);
                }
            }
        }
    }
    debug_assert_eq!(out.len(), encoded_len(tensors, encoding));
    out
}

/// The q8 scale of one tensor: the least f32 `s` with `127 s ≥ max|x|` (so every `x / s` lies
/// in -127..=127), kept below overflow of `127 s`; 0 for an all-zero tensor, NaN if any value
/// is not finite.
fn q8_scale(data: &[f32]) -> f32 {
    let mut max = 0f32;
    for &x in data {
        if !x.is_finite() {
            return f32::NAN;
        }
        max = max.max(x.abs());
    }
    if max == 0.0 {
        return 0.0;
    }
    let mut scale = max / 127.0;
    // 127 · s is exact in f64 (24 + 7 bits), so this also lifts a scale rounded to 0.
    while f64::from(scale) * 127.0 < f64::from(max) {
        scale = scale.next_up();
    }
    while !(scale * 127.0).is_finite() {
        scale = scale.next_down();
    }
    scale
}

/// An upper bound on the L2 norm of `decode(encode(x, Q8)) - x`: `sqrt(Σ_t n_t · scale_t²)`,
/// widened by a relative 1e-5 for f32 rounding of the decoded values. NaN if `x` is not
/// finite.
pub fn q8_error_bound(tensors: &AdapterTensors) -> f64 {
    let sum: f64 = tensors
        .iter()
        .map(|(_, t)| t.data.len() as f64 * f64::from(q8_scale(&t.data)).powi(2))
        .sum();
    sum.sqrt() * (1.0 + Q8_ROUNDING_SLACK)
}

/// Bounds-checked reads from the front of a byte slice.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        let (head, rest) = self
            .rest
            .split_at_checked(n)
            .ok_or(CodecError::Truncated { what })?;
        self.rest = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], CodecError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, CodecError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
}

/// Decodes and validates `bytes`, refusing anything over `limits` before allocating for it.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<AdapterTensors, CodecError> {
    let mut r = Reader { rest: bytes };
    if r.array::<4>("magic")? != MAGIC {
        return Err(CodecError::BadMagic);
    }
    match r.u8("version")? {
        VERSION => {}
        v => return Err(CodecError::UnsupportedVersion(v)),
    }
    let count = r.u32("tensor count")? as usize;
    if count > limits.max_tensors {
        return Err(CodecError::TooLarge {
            what: "tensors",
            limit: limits.max_tensors,
        });
    }
    let mut values_left = limits.max_values;
    let mut out = AdapterTensors::default();
    let mut prev: Option<String> = None;
    for _ in 0..count {
        let name_len = u16::from_le_bytes(r.array("name length")?) as usize;
        if name_len == 0 || name_len > MAX_NAME_LEN {
            return Err(CodecError::BadName {
                reason: "length outside 1..=256 bytes",
            });
        }
        let name = std::str::from_utf8(r.take(name_len, "name")?)
            .map_err(|_| CodecError::BadName {
                reason: "not UTF-8",
            })?
            .to_owned();
        if let Some(p) = &prev {
            if name == *p {
                return Err(CodecError::DuplicateName(name));
            }
            if name < *p {
                return Err(CodecError::UnsortedName(name));
            }
        }
        let rank = r.u8("rank")? as usize;
        if !(1..=MAX_RANK).contains(&rank) {
            return Err(CodecError::BadShape {
                name,
                reason: "rank outside 1..=4",
            });
        }
        let mut shape = Vec::with_capacity(rank);
        for _ in 0..rank {
            shape.push(r.u32("dims")? as usize);
        }
        if shape.contains(&0) {
            return Err(CodecError::BadShape {
                name,
                reason: "zero dim",
            });
        }
        let n = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= values_left)
            .ok_or(CodecError::TooLarge {
                what: "values",
                limit: limits.max_values,
            })?;
        values_left -= n;
        let data = match r.u8("encoding tag")? {
            TAG_F32 => {
                let what = "f32 values";
                let raw = r.take(
                    n.checked_mul(4).ok_or(CodecError::Truncated { what })?,
                    what,
                )?;
                let data: Vec<f32> = raw
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                if data.iter().any(|x| !x.is_finite()) {
                    return Err(CodecError::NonFinite { name });
                }
                data
            }
            TAG_Q8 => {
                let scale = f32::from_le_bytes(r.array("q8 scale")?);
                // NaN and ±inf fail the first test; 127 · scale must not overflow either.
                if !(scale * 127.0).is_finite() || scale < 0.0 {
                    return Err(CodecError::NonFinite { name });
                }
                let codes = r.take(n, "q8 codes")?;
                if codes.contains(&0x80) {
                    return Err(CodecError::BadQ8Code { name });
                }
                codes.iter().map(|&c| f32::from(c as i8) * scale).collect()
            }
            tag => return Err(CodecError::BadEncodingTag(tag)),
        };
        out.insert(name.clone(), shape, data);
        prev = Some(name);
    }
    if !r.rest.is_empty() {
        return Err(CodecError::TrailingBytes(r.rest.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn build(specs: Vec<(Vec<usize>, Vec<f32>)>) -> AdapterTensors {
        let mut t = AdapterTensors::default();
        for (i, (shape, data)) in specs.into_iter().enumerate() {
            t.insert(format!("layers.{i}.lora_A"), shape, data);
        }
        t
    }

    fn sample() -> AdapterTensors {
        build(vec![
            (vec![2, 3], vec![0.5, -1.25, 3.0, 0.0, 7.5, -0.001]),
            (vec![4], vec![1.0, 2.0, -3.0, 4.0]),
        ])
    }

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(7)
    }

    fn finite() -> impl Strategy<Value = f32> + Clone {
        use proptest::num::f32::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
        POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO
    }

    fn tensors(
        values: impl Strategy<Value = f32> + Clone,
    ) -> impl Strategy<Value = AdapterTensors> {
        prop::collection::vec(prop::collection::vec(1usize..=4, 1..=3), 0..=3)
            .prop_flat_map(move |shapes| {
                shapes
                    .into_iter()
                    .map(|s| {
                        let n: usize = s.iter().product();
                        (Just(s), prop::collection::vec(values.clone(), n))
                    })
                    .collect::<Vec<_>>()
            })
            .prop_map(build)
    }

    /// Writes a header and `tensors` as (name bytes, dims, tag, payload) without validation.
    /// A raw tensor record: name bytes, dims, encoding tag, payload.
    type Raw<'a> = (&'a [u8], &'a [u32], u8, Vec<u8>);

    fn craft(count: u32, tensors: &[Raw]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.push(VERSION);
        b.extend_from_slice(&count.to_le_bytes());
        for (name, dims, tag, payload) in tensors {
            b.extend_from_slice(&(name.len() as u16).to_le_bytes());
            b.extend_from_slice(name);
            b.push(dims.len() as u8);
            dims.iter()
                .for_each(|d| b.extend_from_slice(&d.to_le_bytes()));
            b.push(*tag);
            b.extend_from_slice(payload);
        }
        b
    }

    fn f32s(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn q8(scale: f32, codes: &[i8]) -> Vec<u8> {
        let mut b = scale.to_le_bytes().to_vec();
        b.extend(codes.iter().map(|&c| c as u8));
        b
    }

    fn dec(bytes: &[u8]) -> Result<AdapterTensors, CodecError> {
        decode(bytes, &DecodeLimits::default())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn f32_round_trip_is_exact(t in tensors(finite())) {
            let back = dec(&encode(&t, Encoding::F32, &mut rng())).unwrap();
            prop_assert_eq!(back.len(), t.len());
            for ((n, a), (m, b)) in t.iter().zip(back.iter()) {
                prop_assert_eq!(n, m);
                prop_assert_eq!(&a.shape, &b.shape);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                prop_assert_eq!(bits(&a.data), bits(&b.data));
            }
        }

        #[test]
        fn q8_round_trip_within_one_step(t in tensors(finite()), seed in any::<u64>()) {
            let bytes = encode(&t, Encoding::Q8, &mut ChaCha8Rng::seed_from_u64(seed));
            let back = dec(&bytes).unwrap();
            let mut err2 = 0.0f64;
            for ((n, a), (m, b)) in t.iter().zip(back.iter()) {
                prop_assert_eq!(n, m);
                prop_assert_eq!(&a.shape, &b.shape);
                let step = f64::from(q8_scale(&a.data)) * (1.0 + Q8_ROUNDING_SLACK);
                for (&x, &y) in a.data.iter().zip(&b.data) {
                    let e = f64::from(y) - f64::from(x);
                    prop_assert!(e.abs() <= step, "{n}: {x} -> {y}, step {step}");
                    err2 += e * e;
                }
            }
            prop_assert!(err2.sqrt() <= q8_error_bound(&t));
        }

        #[test]
        fn random_bytes_never_panic(
            prefix in any::<bool>(),
            body in prop::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut bytes = if prefix { craft(1, &[]) } else { Vec::new() };
            bytes.extend(body);
            let _ = dec(&bytes);
        }

        #[test]
        fn corrupted_encodings_never_panic(
            q8 in any::<bool>(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let e = if q8 { Encoding::Q8 } else { Encoding::F32 };
            let mut bytes = encode(&sample(), e, &mut rng());
            for (i, v) in edits {
                let i = i.index(bytes.len());
                bytes[i] = v;
            }
            let _ = dec(&bytes);
        }
    }

    #[test]
    fn q8_is_unbiased() {
        let x = [0.3f32, -0.77, 1.0, 0.01, -0.5, 0.0, 0.123, -0.999];
        let t = build(vec![(vec![x.len()], x.to_vec())]);
        let trials = 2000;
        let mut sum = [0.0f64; 8];
        let mut r = rng();
        for _ in 0..trials {
            let back = dec(&encode(&t, Encoding::Q8, &mut r)).unwrap();
            let data = &back.iter().next().unwrap().1.data;
            sum.iter_mut()
                .zip(data)
                .for_each(|(s, &v)| *s += f64::from(v));
        }
        // Each code is Bernoulli on one step, so its standard deviation is at most step / 2.
        let se = f64::from(q8_scale(&x)) * 0.5 / f64::from(trials).sqrt();
        for (s, &xi) in sum.iter().zip(&x) {
            let mean = s / f64::from(trials);
            assert!(
                (mean - f64::from(xi)).abs() <= 4.0 * se + 1e-7,
                "{xi}: mean {mean}"
            );
        }
    }

    #[test]
    fn q8_zero_tensor_and_bound() {
        let t = build(vec![(vec![3], vec![0.0; 3])]);
        let back = dec(&encode(&t, Encoding::Q8, &mut rng())).unwrap();
        assert_eq!(back, t);
        assert_eq!(q8_error_bound(&t), 0.0);
    }

    #[test]
    fn q8_extreme_scales_stay_in_range() {
        for max in [
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::from_bits(190),
            f32::from_bits(1),
        ] {
            let s = q8_scale(&[max, -max / 3.0]);
            assert!(s > 0.0 && (s * 127.0).is_finite(), "{max}: {s}");
            assert!(f64::from(s) * 127.0 >= f64::from(max) || max == f32::MAX);
        }
    }

    #[test]
    fn encoded_len_matches() {
        for t in [sample(), AdapterTensors::default()] {
            for e in [Encoding::F32, Encoding::Q8] {
                assert_eq!(encoded_len(&t, e), encode(&t, e, &mut rng()).len(), "{e:?}");
            }
        }
    }

    #[test]
    fn rejects_bad_magic_and_version() {
        let mut b = encode(&sample(), Encoding::F32, &mut rng());
        b[4] = 2;
        assert!(matches!(dec(&b), Err(CodecError::UnsupportedVersion(2))));
        b[0] ^= 1;
        assert!(matches!(dec(&b), Err(CodecError::BadMagic)));
    }

    #[test]
    fn rejects_every_truncation() {
        for e in [Encoding::F32, Encoding::Q8] {
            let b = encode(&sample(), e, &mut rng());
            assert!(dec(&b).is_ok());
            for len in 0..b.len() {
                let r = dec(&b[..len]);
                assert!(
                    matches!(r, Err(CodecError::Truncated { .. })),
                    "{e:?} {len}: {r:?}"
                );
            }
        }
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut b = encode(&sample(), Encoding::Q8, &mut rng());
        b.push(0);
        assert!(matches!(dec(&b), Err(CodecError::TrailingBytes(1))));
    }

    #[test]
    fn rejects_duplicate_and_unsorted_names() {
        let t = |name: &'static [u8]| (name, &[1u32][..], TAG_F32, f32s(&[1.0]));
        let r = dec(&craft(2, &[t(b"a"), t(b"a")]));
        assert!(matches!(r, Err(CodecError::DuplicateName(n)) if n == "a"));
        let r = dec(&craft(2, &[t(b"b"), t(b"a")]));
        assert!(matches!(r, Err(CodecError::UnsortedName(n)) if n == "a"));
    }

    #[test]
    fn rejects_bad_names() {
        let long = [b'x'; MAX_NAME_LEN + 1];
        for name in [&[0xff, 0xfe][..], b"", &long] {
            let r = dec(&craft(1, &[(name, &[1], TAG_F32, f32s(&[1.0]))]));
            assert!(matches!(r, Err(CodecError::BadName { .. })), "{r:?}");
        }
        let ok = [b'x'; MAX_NAME_LEN];
        assert!(dec(&craft(1, &[(&ok, &[1], TAG_F32, f32s(&[1.0]))])).is_ok());
    }

    #[test]
    fn rejects_non_finite_values_and_scales() {
        let r = dec(&craft(1, &[(b"a", &[2], TAG_F32, f32s(&[1.0, f32::NAN]))]));
        assert!(matches!(r, Err(CodecError::NonFinite { .. })), "{r:?}");
        for scale in [f32::NAN, f32::INFINITY, -1.0, f32::MAX] {
            let r = dec(&craft(1, &[(b"a", &[2], TAG_Q8, q8(scale, &[1, 2]))]));
            assert!(
                matches!(r, Err(CodecError::NonFinite { .. })),
                "{scale}: {r:?}"
            );
        }
        let mut t = sample();
        t.insert("z".into(), vec![1], vec![f32::INFINITY]);
        for e in [Encoding::F32, Encoding::Q8] {
            let r = dec(&encode(&t, e, &mut rng()));
            assert!(matches!(r, Err(CodecError::NonFinite { name }) if name == "z"));
        }
    }

    #[test]
    fn rejects_q8_code_minus_128() {
        let r = dec(&craft(1, &[(b"a", &[2], TAG_Q8, q8(1.0, &[1, -128]))]));
        assert!(matches!(r, Err(CodecError::BadQ8Code { .. })), "{r:?}");
    }

    #[test]
    fn rejects_unknown_tags() {
        for tag in [0, 3, 255] {
            let r = dec(&craft(1, &[(b"a", &[1], tag, f32s(&[1.0]))]));
            assert!(matches!(r, Err(CodecError::BadEncodingTag(t)) if t == tag));
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        for dims in [&[2, 0][..], &[], &[1, 1, 1, 1, 1]] {
            let r = dec(&craft(1, &[(b"a", dims, TAG_F32, f32s(&[1.0]))]));
            assert!(
                matches!(r, Err(CodecError::BadShape { .. })),
                "{dims:?}: {r:?}"
            );
        }
    }

    #[test]
    fn rejects_oversized_claims_before_allocating() {
        let big = |dims: &'static [u32]| craft(1, &[(b"a", dims, TAG_F32, vec![0; 10])]);
        // Over the value limit, and overflowing usize: refused on the header alone.
        for dims in [&[65536, 65536, 65536][..], &[u32::MAX; 4]] {
            let r = dec(&big(dims));
            assert!(
                matches!(r, Err(CodecError::TooLarge { what: "values", .. })),
                "{r:?}"
            );
        }
        // Within the limit but far beyond the input: truncated, nothing allocated.
        let r = dec(&big(&[1_000_000, 60]));
        assert!(matches!(r, Err(CodecError::Truncated { .. })), "{r:?}");
        let r = dec(&craft(u32::MAX, &[]));
        assert!(
            matches!(
                r,
                Err(CodecError::TooLarge {
                    what: "tensors",
                    ..
                })
            ),
            "{r:?}"
        );
        // The value limit counts over all tensors.
        let limits = DecodeLimits {
            max_tensors: 2,
            max_values: 9,
        };
        let b = encode(&sample(), Encoding::F32, &mut rng());
        assert!(matches!(
            decode(&b, &limits),
            Err(CodecError::TooLarge { .. })
        ));
        let limits = DecodeLimits {
            max_values: 10,
            ..limits
        };
        assert_eq!(decode(&b, &limits).unwrap(), sample());
    }
}
