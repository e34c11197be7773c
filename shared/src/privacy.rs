//! What may leave a device: adapter deltas clipped to an L2 bound and encoded, as a
//! [`Privatized`] update that only this module constructs.
//!
//! The upload path of the agent accepts nothing else, so raw text, profiles and unclipped
//! adapters cannot reach the network by construction. Noise (local, distributed or central
//! DP) and secure-aggregation masking plug in here, between clipping and encoding.

use rand::Rng;

use crate::codec::{self, Encoding};
use crate::delta::AdapterTensors;

/// How the delta is protected before it leaves the device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivacySpec {
    /// L2 bound of the update as the aggregator decodes it.
    pub clip_norm: f64,
    pub encoding: Encoding,
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
}

/// An encoded update whose decoded L2 norm is at most the clip norm. Construct it with
/// [`privatize`]; its bytes are what the agent uploads.
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

    /// L2 norm of the update as the aggregator will decode it.
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

/// Clips the delta and encodes it so that the *decoded* update, which is what the aggregator
/// sums, has L2 norm at most `spec.clip_norm`: lossy encodings add rounding error, so the
/// input is shrunk a little more until the decoded norm fits.
pub fn privatize(
    mut delta: AdapterTensors,
    spec: &PrivacySpec,
    rng: &mut impl Rng,
) -> Result<Privatized, PrivacyError> {
    if !(spec.clip_norm.is_finite() && spec.clip_norm > 0.0) {
        return Err(PrivacyError::BadClipNorm(spec.clip_norm));
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
    let norm_before_clip = clip(&mut delta, spec.clip_norm);
    let limits = codec::DecodeLimits::default();
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
                let spec = PrivacySpec { clip_norm: c, encoding };
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
}
