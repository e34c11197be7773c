//! What may leave a device: adapter deltas clipped to an L2 bound, noised as the round's
//! privacy mode asks, and encoded: a [`Privatized`] update (plain upload) or a [`Quantized`]
//! vector (the input of secure aggregation), which only this module constructs.
//!
//! The upload path of the agent accepts nothing else, so raw text, profiles and unclipped
//! adapters cannot reach the network by construction.
//!
//! * `none` / `central`: clip to C and encode; the decoded update's norm is at most C.
//! * `local`: clip, then add N(0, σ²) to every value ([`crate::noise::add_gaussian`], σ = zC),
//!   then encode: each update is differentially private on its own.
//! * `distributed` (only with secure aggregation): clip, quantize to the integer grid γ with
//!   stochastic rounding (norm kept ≤ C/γ), add a discrete Gaussian share
//!   ([`crate::noise::add_discrete_gaussian`]) so that the sum of at least m reports carries
//!   the full noise, and embed in Z_{2^32}.

use rand::Rng;

use crate::codec::{self, Encoding};
use crate::mode;
use crate::noise::{self, NoiseError};
use crate::tensors::AdapterTensors;

/// Noise the device adds before encoding (local DP).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeviceNoise {
    None,
    /// N(0, stddev²) on every value, stddev in the delta's units (z·C).
    Gaussian {
        stddev: f64,
    },
}

/// How the delta is protected before it leaves the device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivacySpec {
    /// L2 bound of the update before noise, as the aggregator decodes it.
    pub clip_norm: f64,
    pub encoding: Encoding,
    pub noise: DeviceNoise,
}

/// Errors from privatizing an update.
#[derive(Debug, thiserror::Error)]
pub enum PrivacyError {
    #[error("clip norm must be positive and finite, got {0}")]
    BadClipNorm(f64),
    #[error("the delta contains NaN or infinite values")]
    NonFinite,
    #[error("the delta is empty")]
    Empty,
    #[error(
        "quantization granularity {granularity} does not fit clip norm {clip_norm} in 31 bits"
    )]
    BadGranularity { granularity: f64, clip_norm: f64 },
    /// (The cause is in the message, not the error's source: a chain printed with `{:#}`
    /// would say it twice.)
    #[error("noise: {0}")]
    Noise(NoiseError),
}

impl From<NoiseError> for PrivacyError {
    fn from(e: NoiseError) -> Self {
        PrivacyError::Noise(e)
    }
}

/// An encoded update ready to upload. Without noise its decoded L2 norm is at most the clip
/// norm. Construct it with [`privatize`]; its bytes are what the agent uploads.
#[derive(Debug, Clone)]
pub struct Privatized {
    bytes: Vec<u8>,
    norm_before_clip: f64,
    norm: f64,
}

impl Privatized {
    /// The encoded update (the codec's format).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// L2 norm of the delta before clipping.
    pub fn norm_before_clip(&self) -> f64 {
        self.norm_before_clip
    }

    /// L2 norm of the update as the aggregator will decode it (noise included).
    pub fn norm(&self) -> f64 {
        self.norm
    }
}

/// Clips `delta` in place to L2 norm `clip_norm` (scaling it down, never up) and returns
/// its norm before clipping.
pub fn clip(delta: &mut AdapterTensors, clip_norm: f64) -> f64 {
    let norm = delta.l2_norm();
    if norm > clip_norm {
        delta.scale((clip_norm / norm) as f32);
        // f32 rounding can leave the scaled norm a hair above the bound.
        let after = delta.l2_norm();
        if after > clip_norm {
            delta.scale((clip_norm / after * (1.0 - 1e-6)) as f32);
        }
    }
    norm
}

fn check_delta(delta: &AdapterTensors, clip_norm: f64) -> Result<(), PrivacyError> {
    if !(clip_norm.is_finite() && clip_norm > 0.0) {
        return Err(PrivacyError::BadClipNorm(clip_norm));
    }
    if delta.is_empty() {
        return Err(PrivacyError::Empty);
    }
    if delta
        .iter()
        .any(|(_, t)| t.data.iter().any(|v| !v.is_finite()))
    {
        return Err(PrivacyError::NonFinite);
    }
    Ok(())
}

/// Clips the delta, adds the spec's noise and encodes it. Without noise the *decoded* update,
/// which is what the aggregator sums, has L2 norm at most `spec.clip_norm`: lossy encodings
/// add rounding error, so the input is shrunk a little more until the decoded norm fits.
pub fn privatize(
    mut delta: AdapterTensors,
    spec: &PrivacySpec,
    rng: &mut impl Rng,
) -> Result<Privatized, PrivacyError> {
    check_delta(&delta, spec.clip_norm)?;
    let norm_before_clip = clip(&mut delta, spec.clip_norm);
    let limits = codec::DecodeLimits::default();
    if let DeviceNoise::Gaussian { stddev } = spec.noise {
        // Noise hides the signal's norm anyway; what must hold is the sensitivity, so the
        // grid's rounding slack comes off the clip norm first.
        let d = delta.num_values();
        let (k, noise_clip) = mode::local_noise_clip(spec.clip_norm, d);
        clip(&mut delta, noise_clip);
        let mut flat = delta.to_flat();
        noise::add_gaussian(&mut flat, stddev, k)?;
        if flat.iter().any(|v| !v.is_finite()) {
            return Err(PrivacyError::NonFinite);
        }
        delta.set_flat(&flat).expect("same layout");
        let bytes = codec::encode(&delta, spec.encoding, rng);
        let decoded = codec::decode(&bytes, &limits).expect("the codec decodes what it encodes");
        return Ok(Privatized {
            norm: decoded.l2_norm(),
            bytes,
            norm_before_clip,
        });
    }
    let mut shrink = 1e-4;
    loop {
        let bytes = codec::encode(&delta, spec.encoding, rng);
        let decoded = codec::decode(&bytes, &limits).expect("the codec decodes what it encodes");
        let norm = decoded.l2_norm();
        if norm <= spec.clip_norm {
            return Ok(Privatized {
                bytes,
                norm_before_clip,
                norm,
            });
        }
        // Stochastic rounding overshot the bound: aim below it and draw again. The margin
        // doubles each time, so this ends after a few draws.
        delta.scale((spec.clip_norm / norm * (1.0 - shrink)) as f32);
        shrink = (shrink * 2.0).min(0.5);
    }
}

/// How a delta becomes the integer vector that secure aggregation sums.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantizationSpec {
    pub clip_norm: f64,
    /// The grid step γ: a value x becomes about x/γ.
    pub granularity: f64,
    /// Standard deviation of this device's discrete Gaussian share, in grid units (0: none).
    pub noise_stddev: f64,
}

/// A clipped, stochastically rounded, noised delta in Z_{2^32} (two's complement), in
/// [`AdapterTensors::to_flat`]'s order. Construct it with [`quantize`]; it is what secure
/// aggregation masks.
#[derive(Debug, Clone)]
pub struct Quantized {
    values: Vec<u32>,
    norm_before_clip: f64,
    norm: f64,
}

impl Quantized {
    pub fn values(&self) -> &[u32] {
        &self.values
    }

    pub fn norm_before_clip(&self) -> f64 {
        self.norm_before_clip
    }

    /// L2 norm of the rounded signal (before noise), in the delta's units: at most the clip.
    pub fn norm(&self) -> f64 {
        self.norm
    }
}

/// Clips the delta to C, rounds x/γ stochastically (unbiased) to integers whose L2 norm is at
/// most C/γ — the sensitivity the accountant assumes —, adds the discrete Gaussian share and
/// embeds the result in Z_{2^32}. Overflow of the *sum* is the aggregator's check (it sizes
/// γ for the cohort); here each value is checked to fit i32.
pub fn quantize(
    mut delta: AdapterTensors,
    spec: &QuantizationSpec,
    rng: &mut impl Rng,
) -> Result<Quantized, PrivacyError> {
    check_delta(&delta, spec.clip_norm)?;
    let g = spec.granularity;
    let bound = mode::grid_units(spec.clip_norm, g);
    if !(g.is_finite() && g > 0.0 && bound < f64::from(i32::MAX) / 2.0) {
        return Err(PrivacyError::BadGranularity {
            granularity: g,
            clip_norm: spec.clip_norm,
        });
    }
    let norm_before_clip = clip(&mut delta, spec.clip_norm);
    let flat = delta.to_flat();
    let mut scale = 1.0 / g;
    let mut shrink = 1e-4;
    let (mut ints, norm) = loop {
        let ints: Vec<i32> = flat
            .iter()
            .map(|&x| {
                let v = f64::from(x) * scale;
                let floor = v.floor();
                let up = rng.random::<f64>() < v - floor;
                (floor + f64::from(u8::from(up))) as i32
            })
            .collect();
        let norm = ints
            .iter()
            .map(|&q| f64::from(q).powi(2))
            .sum::<f64>()
            .sqrt();
        if norm <= bound {
            break (ints, norm * g);
        }
        scale *= bound / norm * (1.0 - shrink);
        shrink = (shrink * 2.0).min(0.5);
    };
    noise::add_discrete_gaussian(&mut ints, spec.noise_stddev)?;
    Ok(Quantized {
        values: ints.into_iter().map(|v| v as u32).collect(),
        norm_before_clip,
        norm,
    })
}

/// How a round wants a delta protected: encoded for a plain upload, or quantized for secure
/// aggregation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Protection {
    Plain(PrivacySpec),
    Secure(QuantizationSpec),
}

/// A protected delta: the only things the agent can send.
#[derive(Debug, Clone)]
pub enum Protected {
    Plain(Privatized),
    Secure(Quantized),
}

impl Protected {
    pub fn norm_before_clip(&self) -> f64 {
        match self {
            Protected::Plain(p) => p.norm_before_clip(),
            Protected::Secure(q) => q.norm_before_clip(),
        }
    }
}

/// Applies `protection` to a delta ([`privatize`] or [`quantize`]).
pub fn protect(
    delta: AdapterTensors,
    protection: &Protection,
    rng: &mut impl Rng,
) -> Result<Protected, PrivacyError> {
    Ok(match protection {
        Protection::Plain(spec) => Protected::Plain(privatize(delta, spec, rng)?),
        Protection::Secure(spec) => Protected::Secure(quantize(delta, spec, rng)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    fn tensors(values: Vec<f32>) -> AdapterTensors {
        let mut t = AdapterTensors::default();
        let n = values.len();
        t.insert("w".into(), vec![n], values);
        t
    }

    proptest! {
        #[test]
        fn clipped_norm_is_bounded(values in proptest::collection::vec(-100f32..100.0, 1..200),
                                   c in 0.01f64..10.0) {
            let mut t = tensors(values);
            let before = t.l2_norm();
            let reported = clip(&mut t, c);
            prop_assert!((reported - before).abs() <= 1e-9 * before.max(1.0));
            prop_assert!(t.l2_norm() <= c);
            if before <= c {
                prop_assert!((t.l2_norm() - before).abs() <= 1e-12);
            }
        }

        #[test]
        fn decoded_update_respects_the_bound(values in proptest::collection::vec(-1f32..1.0, 1..500),
                                             c in 0.001f64..2.0, seed in any::<u64>()) {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            for encoding in [Encoding::F32, Encoding::Q8] {
                let spec = PrivacySpec { clip_norm: c, encoding, noise: DeviceNoise::None };
                let p = privatize(tensors(values.clone()), &spec, &mut rng).unwrap();
                let decoded = codec::decode(p.bytes(), &codec::DecodeLimits::default()).unwrap();
                prop_assert!(decoded.l2_norm() <= c);
                prop_assert!((decoded.l2_norm() - p.norm()).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn bad_input_is_refused() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let spec = PrivacySpec {
            clip_norm: 1.0,
            encoding: Encoding::Q8,
            noise: DeviceNoise::None,
        };
        assert!(matches!(
            privatize(tensors(vec![1.0, f32::NAN]), &spec, &mut rng),
            Err(PrivacyError::NonFinite)
        ));
        assert!(matches!(
            privatize(AdapterTensors::default(), &spec, &mut rng),
            Err(PrivacyError::Empty)
        ));
        let bad = PrivacySpec {
            clip_norm: 0.0,
            ..spec
        };
        assert!(matches!(
            privatize(tensors(vec![1.0]), &bad, &mut rng),
            Err(PrivacyError::BadClipNorm(_))
        ));
    }
    #[test]
    fn local_noise_has_scale_sigma_and_keeps_the_layout() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let n = 10_000;
        let spec = PrivacySpec {
            clip_norm: 1.0,
            encoding: Encoding::F32,
            noise: DeviceNoise::Gaussian { stddev: 0.5 },
        };
        let p = privatize(tensors(vec![1.0; n]), &spec, &mut rng).unwrap();
        let decoded = codec::decode(p.bytes(), &codec::DecodeLimits::default()).unwrap();
        let v = &decoded.get("w").unwrap().data;
        let sd = (v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / n as f64).sqrt();
        assert!((sd - 0.5).abs() < 0.02, "{sd}");
        assert!((p.norm_before_clip() - 100.0).abs() < 1e-3);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn quantized_signal_respects_the_bound_and_is_unbiased_enough(
            values in proptest::collection::vec(-1f32..1.0, 1..300),
            c in 0.01f64..2.0, seed in any::<u64>()) {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let spec = QuantizationSpec { clip_norm: c, granularity: c / 1000.0, noise_stddev: 0.0 };
            let q = quantize(tensors(values.clone()), &spec, &mut rng).unwrap();
            prop_assert!(q.norm() <= c * (1.0 + 1e-12));
            let ints: Vec<f64> = q.values().iter().map(|&v| f64::from(v as i32)).collect();
            let norm = ints.iter().map(|x| x * x).sum::<f64>().sqrt() * spec.granularity;
            prop_assert!((norm - q.norm()).abs() < 1e-9);
            // Each value is within one grid step of the clipped input or of its shrunk copy:
            // a draw over the bound retries at a scale shrunk by 1e-4, then 2e-4, 4e-4, …,
            // so a few retries (each about as likely as not near the bound) can move a value
            // 0.1–1% inside; beyond 1% would take seven retries in a row, the last one
            // 6 steps under the bound.
            let mut clipped = tensors(values);
            clip(&mut clipped, c);
            for (x, q) in clipped.to_flat().iter().zip(&ints) {
                let exact = f64::from(*x) / spec.granularity;
                prop_assert!((exact - q).abs() <= 1.0 + 0.01 * exact.abs(), "{exact} {q}");
            }
        }
    }

    #[test]
    fn quantization_refuses_a_grid_that_overflows() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let spec = QuantizationSpec {
            clip_norm: 1.0,
            granularity: 1e-12,
            noise_stddev: 0.0,
        };
        assert!(matches!(
            quantize(tensors(vec![0.5]), &spec, &mut rng),
            Err(PrivacyError::BadGranularity { .. })
        ));
    }
}
