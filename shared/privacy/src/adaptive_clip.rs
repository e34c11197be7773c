//! Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy 2021, "Differentially Private
//! Learning with Adaptive Clipping"): the clip norm C follows a target quantile γ of the
//! devices' update norms, estimated from a noised count of the devices that clipping left
//! alone.
//!
//! Each device sends one value more with its update, the bit b = 1[‖Δ‖ ≤ C] as the
//! coordinate κ·(b − ½) (the tensor [`COUNT_TENSOR`]); the round's mean of that coordinate,
//! noised with the rest of the update, gives the share b̄ of unclipped devices, and the
//! server steps C ← C·exp(−η·(b̄ − γ)): more devices unclipped than γ wants means C is too
//! large, so it shrinks (the paper's geometric update, its eq. 4 with the sign as there).
//!
//! **Privacy.** Δ is clipped to C and |κ(b − ½)| = κ/2, so the extended vector has L2 norm
//! at most C' = √(C² + κ²/4): the whole round is one Gaussian mechanism of multiplier z at
//! sensitivity C', charged as before. Its noise zC' on the count coordinate is, in counts,
//! zC'/κ; asking for a count noise σ_b gives κ = zC'/σ_b, so C'² = C² + (zC'/(2σ_b))², that is
//! C' = C / √(1 − (z/(2σ_b))²), and the update itself sees the multiplier
//! zC'/C = (z⁻² − (2σ_b)⁻²)^(−½): the paper's noise split (its §3.1), which needs 2σ_b > z.
//! Without noise (z = 0) the count is exact and κ = C.

use crate::tensors::AdapterTensors;

/// The extra tensor of an update under adaptive clipping: one value, κ·(b − ½).
pub const COUNT_TENSOR: &str = "fedpersona.unclipped";

/// What a round's protection needs: the update's clip norm C, the count coordinate's scale
/// κ, and the extended vector's bound C' (the sensitivity the noise is sized for).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundClip {
    pub clip_norm: f64,
    pub count_scale: f64,
    pub extended_norm: f64,
}

impl RoundClip {
    /// The round's clip as a device reads it from its task: clip norm C and count scale κ,
    /// with their bound C' = √(C² + κ²/4).
    pub fn of(clip_norm: f64, count_scale: f64) -> RoundClip {
        RoundClip {
            clip_norm,
            count_scale,
            extended_norm: (clip_norm.powi(2) + count_scale.powi(2) / 4.0).sqrt(),
        }
    }
}

/// √(1 − (z/(2σ_b))²): the update's clip over the extended bound, C/C' (None when the count
/// noise σ_b cannot carry the split, 2σ_b ≤ z). `1/√1.25` without noise (κ = C).
pub fn clip_ratio(z: f64, count_stddev: f64) -> Option<f64> {
    if z == 0.0 {
        return Some(1.25f64.sqrt().recip());
    }
    let r = z / (2.0 * count_stddev);
    (r.is_finite() && r < 1.0).then(|| (1.0 - r * r).sqrt())
}

/// The round's clip for update clip norm C: κ = zC'/σ_b (κ = C without noise) and
/// C' = √(C² + κ²/4).
pub fn round_clip(clip_norm: f64, z: f64, count_stddev: f64) -> Option<RoundClip> {
    let ratio = clip_ratio(z, count_stddev)?;
    let extended_norm = clip_norm / ratio;
    let count_scale = if z == 0.0 {
        clip_norm
    } else {
        z * extended_norm / count_stddev
    };
    Some(RoundClip {
        clip_norm,
        count_scale,
        extended_norm,
    })
}

/// The update's effective noise multiplier under the split: (z⁻² − (2σ_b)⁻²)^(−½).
pub fn effective_noise_multiplier(z: f64, count_stddev: f64) -> f64 {
    (z.powi(-2) - (2.0 * count_stddev).powi(-2)).powf(-0.5)
}

/// The device's coordinate, κ·(b − ½) with b = 1[‖Δ‖ ≤ C].
pub fn count_value(norm_before_clip: f64, clip: &RoundClip) -> f32 {
    let b = if norm_before_clip <= clip.clip_norm {
        0.5
    } else {
        -0.5
    };
    (clip.count_scale * b) as f32
}

/// Adds the device's count coordinate to its (already clipped) delta.
pub fn with_count(
    mut delta: AdapterTensors,
    norm_before_clip: f64,
    clip: &RoundClip,
) -> AdapterTensors {
    delta.insert(
        COUNT_TENSOR.into(),
        vec![1],
        vec![count_value(norm_before_clip, clip)],
    );
    delta
}

/// The share of devices clipping left alone, from the released mean of the count
/// coordinate (the mean over the round's denominator, as the rest of the update):
/// mean/κ + ½, in [0, 1].
pub fn unclipped_share(count_mean: f64, count_scale: f64) -> f64 {
    (count_mean / count_scale + 0.5).clamp(0.0, 1.0)
}

/// The next round's clip norm, C·exp(−η(b̄ − γ)), kept in [lo, hi].
pub fn next_clip_norm(
    clip_norm: f64,
    unclipped: f64,
    target_quantile: f64,
    learning_rate: f64,
    (lo, hi): (f64, f64),
) -> f64 {
    (clip_norm * (-learning_rate * (unclipped - target_quantile)).exp()).clamp(lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_split_is_the_papers() {
        // z = 1, σ_b = 2.5 (a cohort of 50 at the paper's m/20): z/(2σ_b) = 0.2,
        // C/C' = √0.96 = 0.9797959, the update's multiplier 1/√(1 − 1/25) = 1.0206207.
        let c = round_clip(0.1, 1.0, 2.5).unwrap();
        assert!((c.extended_norm - 0.1 / 0.96f64.sqrt()).abs() < 1e-15);
        assert!((effective_noise_multiplier(1.0, 2.5) - 1.020_620_7).abs() < 1e-7);
        // The same number two ways: zC'/C.
        assert!((c.extended_norm / 0.1 - effective_noise_multiplier(1.0, 2.5)).abs() < 1e-12);
        // The extended vector's bound holds with equality at |κ(b − ½)| = κ/2.
        let bound = RoundClip::of(0.1, c.count_scale).extended_norm;
        assert!((bound - c.extended_norm).abs() < 1e-15);
        // The count's noise, zC'/κ, is the asked σ_b.
        assert!((c.extended_norm / c.count_scale - 2.5).abs() < 1e-12);
        // A count noise that cannot carry the split is refused.
        assert_eq!(round_clip(0.1, 1.0, 0.5), None);
        assert_eq!(clip_ratio(1.0, f64::NAN), None);
    }

    #[test]
    fn the_clip_shrinks_when_too_many_devices_are_left_alone() {
        // γ = 0.5, η = 0.2: all unclipped shrinks C by e^−0.1, none grows it by e^0.1.
        let range = (1e-3, 10.0);
        let down = next_clip_norm(1.0, 1.0, 0.5, 0.2, range);
        assert!((down - (-0.1f64).exp()).abs() < 1e-15);
        let up = next_clip_norm(1.0, 0.0, 0.5, 0.2, range);
        assert!((up - 0.1f64.exp()).abs() < 1e-15);
        assert_eq!(next_clip_norm(1.0, 0.5, 0.5, 0.2, range), 1.0);
        assert_eq!(next_clip_norm(10.0, 0.0, 0.5, 0.2, range), 10.0);
        // The coordinate and its reading.
        let c = round_clip(1.0, 0.0, 1.0).unwrap();
        assert_eq!(c.count_scale, 1.0);
        assert_eq!(count_value(0.9, &c), 0.5);
        assert_eq!(count_value(1.1, &c), -0.5);
        // Three of four unclipped: mean of κ(b − ½) over 4 is κ/4.
        assert_eq!(unclipped_share(0.25, 1.0), 0.75);
        assert_eq!(unclipped_share(7.0, 1.0), 1.0);
    }

    proptest! {
        #[test]
        fn a_clipped_delta_with_its_count_fits_the_extended_bound(
            values in proptest::collection::vec(-10f32..10.0, 1..64),
            clip in 0.01f64..5.0,
            z in 0.0f64..5.0,
            m in 20u32..2000,
        ) {
            let sigma_b = f64::from(m) / 20.0;
            prop_assume!(2.0 * sigma_b > z * 1.01);
            let c = round_clip(clip, z, sigma_b).unwrap();
            let mut t = AdapterTensors::default();
            let n = values.len();
            t.insert("w".into(), vec![n], values);
            let before = crate::protect::clip(&mut t, clip);
            let t = with_count(t, before, &c);
            prop_assert!(t.l2_norm() <= c.extended_norm * (1.0 + 1e-6));
        }
    }
}
