//! The signal-to-noise ratio (SNR) of a round's released mean: how much DP noise it carries
//! against the largest signal it can carry, planned before a deployment ([`plan`]) and
//! estimated from each round's release ([`Measured`]).
//!
//! Definitions, for d values in an update, clip norm C and the mean released over the
//! target cohort m:
//!
//! * **Signal**: the mean of the round's clipped updates, of L2 norm at most C. The expected
//!   SNR takes the best case, every update at the clip norm and all of them aligned, so the
//!   signal is C; real updates point in partly different directions, so the expected SNR is
//!   an upper bound on what a round achieves.
//! * **Noise**: the DP noise on the released mean, N(0, σ²) on each of its d values (σ from
//!   the mode's arithmetic in [`crate::mode`]). Its expected norm is taken as the root mean
//!   square σ·√d = √E‖n‖² (the mean norm E‖n‖ is below it by a factor of about 1 − 1/(4d)).
//! * **SNR** = C / (σ·√d). With distributed noise sized for m reports (or central noise),
//!   σ = zC/m and SNR = m / (z·√d): it grows with the cohort, shrinks with the square root
//!   of the trained values, and C cancels.
//!
//! Pure arithmetic on plain numbers, as [`crate::mode`]: callers validate their inputs.

use crate::accountant::{AccountantError, Method};
use crate::{mode, sampling};

/// Norm of N(0, stddev²) noise on `dim` values, as its root mean square: stddev·√d.
pub fn noise_norm(stddev: f64, dim: usize) -> f64 {
    stddev * (dim as f64).sqrt()
}

/// Expected SNR: the largest signal, C, over the expected noise norm (+∞ without noise).
pub fn expected_snr(clip_norm: f64, noise_norm: f64) -> f64 {
    clip_norm / noise_norm
}

/// The noise norm on the mean, over C, of `reports` updates carrying distributed shares sized
/// for `min_reports`, released over `target`: z·√(reports/min_reports)·√d / target. With
/// `reports = min_reports = target = m`: z·√d/m (central noise too, but for its grid slack
/// of at most 2%).
pub fn mean_noise_norm_over_clip(
    z: f64,
    dim: usize,
    reports: u64,
    min_reports: u64,
    target: u64,
) -> f64 {
    let sum = mode::distributed_sum_stddev(z, 1.0, reports, min_reports);
    noise_norm(mode::mean_noise_stddev(sum, target), dim)
}

/// What a deployment is planned for: the rounds the accountant charges and the update's size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Deployment {
    /// N: devices eligible per round.
    pub population: u64,
    /// m: the expected cohort, reports per round; q = m/N.
    pub cohort: u64,
    /// The fewest reports the distributed noise is sized for (the cohort when none drop).
    pub min_reports: u64,
    /// T: rounds over the deployment's life.
    pub rounds: u64,
    pub target_epsilon: f64,
    pub delta: f64,
    pub accountant: Method,
    /// d: values in an update (the adapter's trained parameters).
    pub dimension: usize,
}

/// The noise a [`Deployment`] needs for its (ε, δ), and what that leaves of a round's signal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// q = m/N, the Poisson sampling rate charged.
    pub sampling_rate: f64,
    /// z: the smallest noise multiplier (to 1e-4) that keeps ε within the target.
    pub noise_multiplier: f64,
    /// ε after T rounds at that z.
    pub epsilon: f64,
    /// Expected noise norm on the round's mean over C ([`mean_noise_norm_over_clip`], with
    /// every one of the m reports in).
    pub noise_norm_over_clip: f64,
    /// Expected SNR per round: 1 / `noise_norm_over_clip` (signal C, see the module docs).
    pub snr: f64,
}

/// Solves z for the target ε over T rounds at q = m/N with the deployment's accountant, and
/// the noise and SNR it leaves on the round's mean.
pub fn plan(d: &Deployment) -> Result<Plan, AccountantError> {
    let q = sampling::poisson_rate(d.cohort, d.population);
    let z = d
        .accountant
        .noise_multiplier_for(d.target_epsilon, q, d.rounds, d.delta)?;
    let epsilon = d.accountant.epsilon(z, q, d.rounds, d.delta)?;
    let noise = mean_noise_norm_over_clip(z, d.dimension, d.cohort, d.min_reports, d.cohort);
    Ok(Plan {
        sampling_rate: q,
        noise_multiplier: z,
        epsilon,
        noise_norm_over_clip: noise,
        snr: expected_snr(1.0, noise),
    })
}

/// A round's SNR as measured on its release. The released mean is u = s + n (signal plus
/// noise, independent, the noise of mean zero), so E‖u‖² = ‖s‖² + E‖n‖²; the estimate of the
/// signal norm is √max(0, ‖u‖² − E‖n‖²), and the SNR that signal over the expected noise norm.
///
/// Post-processing of the released value and the config: it costs no privacy. It is noisy:
/// ‖n‖² has standard deviation σ²·√(2d), so SNR² is known to about ±√(2/d), and estimates
/// below (2/d)^(1/4) (0.06 for d = 156k) cannot be told from no signal at all.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// ‖u‖: the norm of the released (noised) mean update.
    pub update_norm: f64,
    /// √E‖n‖²: the expected noise norm on it.
    pub noise_norm_expected: f64,
    /// The estimated signal norm √max(0, ‖u‖² − E‖n‖²).
    pub signal_norm: f64,
    /// signal_norm / noise_norm_expected (+∞ without noise).
    pub snr: f64,
}

impl Measured {
    pub fn of(update_norm: f64, noise_norm_expected: f64) -> Measured {
        let signal_norm = (update_norm.powi(2) - noise_norm_expected.powi(2))
            .max(0.0)
            .sqrt();
        Measured {
            update_norm,
            noise_norm_expected,
            signal_norm,
            snr: signal_norm / noise_norm_expected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_norm_and_expected_snr() {
        // 0.5·√10000 = 50; C = 2 against 50: 0.04.
        assert_eq!(noise_norm(0.5, 10_000), 50.0);
        assert_eq!(expected_snr(2.0, 50.0), 0.04);
        assert_eq!(expected_snr(1.0, 0.0), f64::INFINITY);
        // z = 1, d = 10000, 10 of 10 over 10: 1·100/10 = 10 C, SNR 0.1.
        assert_eq!(mean_noise_norm_over_clip(1.0, 10_000, 10, 10, 10), 10.0);
        // Shares sized for 4, 9 report, over 9, z = 2, d = 900: 2·√(9/4)·30/9 = 3·30/9 = 10.
        assert!((mean_noise_norm_over_clip(2.0, 900, 9, 4, 9) - 10.0).abs() < 1e-12);
        // The README's private run: z = 0.637, d = 156160, m = 10:
        // 0.637·√156160/10 = 0.637·395.17085/10 = 25.1724 C, SNR 0.0397.
        let n = mean_noise_norm_over_clip(0.637, 156_160, 10, 10, 10);
        assert!((n - 25.172_383).abs() < 1e-5, "{n}");
        assert!((expected_snr(1.0, n) - 0.039_726).abs() < 1e-6);
    }

    #[test]
    fn the_estimate_subtracts_the_expected_noise_energy() {
        // ‖u‖ = 5 against noise 3: signal √(25 − 9) = 4, SNR 4/3.
        let m = Measured::of(5.0, 3.0);
        assert_eq!((m.signal_norm, m.snr), (4.0, 4.0 / 3.0));
        // Less than the noise alone: no signal.
        let m = Measured::of(2.0, 3.0);
        assert_eq!((m.signal_norm, m.snr), (0.0, 0.0));
        // No noise: the whole norm is signal.
        let m = Measured::of(1.5, 0.0);
        assert_eq!((m.signal_norm, m.snr), (1.5, f64::INFINITY));
    }

    /// The plan of the README's private simulation: N = 194, m = 10, T = 30, ε = 8 at
    /// δ = 1e-5 (z 0.637 under RDP, 0.591 under PLD, as the accountant's docs give them).
    #[test]
    fn the_plan_solves_z_and_prices_the_noise() {
        let d = Deployment {
            population: 194,
            cohort: 10,
            min_reports: 10,
            rounds: 30,
            target_epsilon: 8.0,
            delta: 1e-5,
            accountant: Method::Rdp,
            dimension: 156_160,
        };
        for (accountant, z) in [(Method::Rdp, 0.637), (Method::Pld, 0.591)] {
            let p = plan(&Deployment { accountant, ..d }).unwrap();
            assert_eq!(p.sampling_rate, 10.0 / 194.0);
            assert!((p.noise_multiplier - z).abs() < 1e-3, "{accountant}: {p:?}");
            assert!(p.epsilon <= 8.0 && p.epsilon > 7.99, "{p:?}");
            // z·√156160/10, and its inverse.
            let want = p.noise_multiplier * 156_160f64.sqrt() / 10.0;
            assert!((p.noise_norm_over_clip / want - 1.0).abs() < 1e-15);
            assert!((p.snr * p.noise_norm_over_clip - 1.0).abs() < 1e-15);
        }
        // Shares sized for 8 of the 10: √(10/8) more noise for the same z.
        let full = plan(&d).unwrap();
        let short = plan(&Deployment {
            min_reports: 8,
            ..d
        })
        .unwrap();
        assert_eq!(short.noise_multiplier, full.noise_multiplier);
        let ratio = short.noise_norm_over_clip / full.noise_norm_over_clip;
        assert!((ratio - 1.25f64.sqrt()).abs() < 1e-12);
        assert!(plan(&Deployment { delta: 0.0, ..d }).is_err());
    }
}
