//! The arithmetic of the privacy modes in one place (the sampling rate is `sampling`'s): the
//! over-selection, each mode's noise scale (local σ = zC, the distributed share zB/√m in grid
//! units, central z(C + 2·slack) on the sum) and what it leaves on the round's sum or mean,
//! the float-noise grid 2^k, the SecAgg grid γ, and what the release divides by. Pure
//! functions on plain numbers: callers keep their validation, messages and types.
//!
//! Each is written as one expression, in the order of its operations, so that a reviewer can
//! check the privacy claim here alone; the tests pin hand-computed values. Notation:
//! z noise multiplier, C clip norm (L2), d values in a delta, n devices assigned per round,
//! m = `min_reports`, γ grid step, B = C/γ the clip norm in grid units.

/// Range of the float-noise grid exponent k (what OpenDP's float Gaussian is given).
pub const GRID_EXPONENT_MIN: i32 = -1000;
pub const GRID_EXPONENT_MAX: i32 = 100;
/// The SecAgg sum is kept within ±2^30, half of i32, so 12 σ of summed noise still fit.
pub const SECAGG_SUM_BOUND: f64 = (1u64 << 30) as f64;
/// Fewest grid steps per clip norm a secure-aggregation config may have.
pub const MIN_GRID_UNITS: f64 = 1024.0;

/// Devices assigned per round: the cohort plus over-selection, `⌈cohort·(1 + over)⌉`.
/// Exact for every cohort ≤ u32::MAX and `over` in [0, 10] (an integer below 2^53).
pub fn assigned_per_round(cohort: u64, over_selection: f64) -> u64 {
    (cohort as f64 * (1.0 + over_selection)).ceil() as u64
}

/// Reports expected when each of `n` devices drops with probability `dropout`:
/// `⌊n·(1 − dropout)⌋` (callers clamp it into their own range).
pub fn expected_reports(n: u64, dropout: f64) -> u64 {
    (n as f64 * (1.0 - dropout)).floor() as u64
}

/// Local σ = z·scale: `scale` is C for a plain upload (delta units), or B = C/γ under
/// secure aggregation (grid units).
pub fn local_sigma(z: f64, scale: f64) -> f64 {
    z * scale
}

/// B = C/γ: the clip norm in grid units, as a device reads it from its task.
pub fn grid_units(clip_norm: f64, granularity: f64) -> f64 {
    clip_norm / granularity
}

/// Each device's discrete-Gaussian σ under distributed DP, in grid units: `z·B/√m`, so that
/// the sum of any m shares has σ = zB (the full noise). `min_reports` ≥ 1 (0 gives +∞).
pub fn distributed_noise_share(z: f64, clip_units: f64, min_reports: u64) -> f64 {
    z * clip_units / (min_reports as f64).sqrt()
}

/// σ of the distributed noise on the sum of `reports` updates, in delta units: each of them
/// carries the share z·C/√m ([`distributed_noise_share`] with scale C, m = `min_reports`),
/// and independent shares add in variance, so the sum has z·C·√(reports/m) (zC when exactly
/// m report, more when more survive).
pub fn distributed_sum_stddev(z: f64, clip_norm: f64, reports: u64, min_reports: u64) -> f64 {
    distributed_noise_share(z, clip_norm, min_reports) * (reports as f64).sqrt()
}

/// σ of local noise on the mean of `reports` updates, each with its own N(0, (zC)²): the
/// plain mean divides the sum's zC·√reports by the count, zC/√reports.
pub fn local_mean_stddev(z: f64, clip_norm: f64, reports: u64) -> f64 {
    local_sigma(z, clip_norm) / (reports as f64).sqrt()
}

/// The grid exponent k for noising a `dim`-value vector clipped to `clip_norm`: the largest
/// k whose rounding slack 2^(k−1)·√d is at most 1% of C, clamped to the allowed range.
pub fn grid_exponent(clip_norm: f64, dim: usize) -> i32 {
    let dim = dim.max(1) as f64;
    ((0.02 * clip_norm / dim.sqrt()).log2().floor() as i32)
        .clamp(GRID_EXPONENT_MIN, GRID_EXPONENT_MAX)
}

/// How far rounding to the grid 2^k can move a `dim`-value vector (L2): 2^(k−1)·√d.
pub fn grid_slack(k: i32, dim: usize) -> f64 {
    2f64.powi(k - 1) * (dim as f64).sqrt()
}

/// Local noise on a plain upload: the grid k and the norm to clip to first, C − slack, so
/// that the rounded vector still has sensitivity C.
pub fn local_noise_clip(clip_norm: f64, dim: usize) -> (i32, f64) {
    let k = grid_exponent(clip_norm, dim);
    (k, clip_norm - grid_slack(k, dim))
}

/// Central σ on the sum: z·(C + 2·slack), as rounding the sum to the grid 2^k can move a
/// neighbouring sum by twice the slack.
pub fn central_sigma(z: f64, clip_norm: f64, k: i32, dim: usize) -> f64 {
    z * (clip_norm + 2.0 * grid_slack(k, dim))
}

/// Under DP the mean divides by the target cohort, not the count (which stays hidden).
pub fn release_denominator(target_reports: u64) -> f64 {
    target_reports as f64
}

/// σ of the noise on the released mean: σ of the sum over the release denominator.
pub fn mean_noise_stddev(sum_stddev: f64, target_reports: u64) -> f64 {
    sum_stddev / release_denominator(target_reports)
}

/// The aggregator's L2 bound on a local-DP upload: C plus σ·(√d + 10) (over ten standard
/// deviations of χ_d above its mean), plus 5% for the 8-bit encoding's rounding.
pub fn local_upload_norm_bound(clip_norm: f64, z: f64, dim: usize) -> f64 {
    let d = dim as f64;
    (clip_norm + z * clip_norm * (d.sqrt() + 10.0)) * 1.05
}

/// Largest multiple of the clip norm, in grid units, that `n` devices with distributed
/// share zB/√m each can sum within ±2^30: `⌊2^30 / (n + 12·z·√(n/m))⌋` (pass z = 0 when
/// devices add no share).
pub fn secagg_grid_units(n: u64, z: f64, m: u64) -> f64 {
    let n = n as f64;
    let spread = n + 12.0 * z * (n / m as f64).sqrt();
    (SECAGG_SUM_BOUND / spread).floor()
}

/// A round's SecAgg grid: B = `units` steps per clip norm, step γ = `granularity`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecAggGrid {
    pub units: f64,
    pub granularity: f64,
}

/// The grid for `n` devices per round, share multiplier `z` and `m` = `min_reports`. The
/// caller checks `units >= MIN_GRID_UNITS`.
pub fn secagg_grid(clip_norm: f64, n: u64, z: f64, m: u64) -> SecAggGrid {
    let units = secagg_grid_units(n, z, m);
    SecAggGrid {
        units,
        granularity: clip_norm / units,
    }
}

/// The budget a planned run is given: the target (or the plan), never below the plan, a
/// hair above it (×(1 + 1e-9)) so that the last round fits despite float rounding.
pub fn planned_budget(target: Option<f64>, planned: f64) -> f64 {
    target.unwrap_or(planned).max(planned) * (1.0 + 1e-9)
}

/// ε left of the budget, never negative.
pub fn epsilon_remaining(budget: f64, spent: f64) -> f64 {
    (budget - spent).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling() {
        // README run: 10 assigned of 194 users, no over-selection (dropout 0).
        assert_eq!(assigned_per_round(10, 0.0), 10);
        // 2·1.3 = 2.6 → 3; 3·1.3 = 3.9000000000000004 → 4; 100·1.3 = 130.0 exactly → 130.
        assert_eq!(assigned_per_round(2, 0.3), 3);
        assert_eq!(assigned_per_round(3, 0.3), 4);
        assert_eq!(assigned_per_round(100, 0.3), 130);
        // Simulation, dropout 0.1: over = 3·0.1/0.9 = 0.33333333333333337; 10·1.333… → 14.
        assert_eq!(assigned_per_round(10, 3.0 * 0.1 / (1.0 - 0.1)), 14);
        // bench secagg: 100·(1 − 0.05) = 95.0 (5 drop); simulate: 10·0.9 = 9.0.
        assert_eq!(expected_reports(100, 0.05), 95);
        assert_eq!(expected_reports(10, 0.1), 9);
        assert_eq!(expected_reports(10, 0.0), 10);
    }

    #[test]
    fn device_noise() {
        assert_eq!(local_sigma(0.5, 1.0), 0.5);
        assert_eq!(grid_units(1.0, 0.25), 4.0);
        // z = 1, B = 9560370 (below), m = 95: 9560370 / √95 = 9560370 / 9.746794344808963.
        let s = distributed_noise_share(1.0, 9_560_370.0, 95);
        assert_eq!(s, 980_873.265_792_434_6);
        // m shares sum to σ = zB: √95 · s = 9560370 (to rounding).
        assert!(((95f64).sqrt() * s / 9_560_370.0 - 1.0).abs() < 1e-15);
        // m = 4: 2·100/√4 = 100 exactly.
        assert_eq!(distributed_noise_share(2.0, 100.0, 4), 100.0);
        assert!(distributed_noise_share(1.0, 1.0, 0).is_infinite());
    }

    #[test]
    fn noise_on_the_release() {
        // m = 4 reports of shares 2·1/√4 = 1 each: √4 · 1 = 2 = zC exactly.
        assert_eq!(distributed_sum_stddev(2.0, 1.0, 4, 4), 2.0);
        // 9 survive where 4 were planned for: 3·(2/2) = 3 = zC·√(9/4).
        assert_eq!(distributed_sum_stddev(2.0, 1.0, 9, 4), 3.0);
        // README run: z = 0.637, C = 1, 10 of 10: 0.637/√10·√10 = 0.637 (to rounding).
        assert!((distributed_sum_stddev(0.637, 1.0, 10, 10) - 0.637).abs() < 1e-15);
        // Local: 2·0.5/√4 = 0.5; 1·1/√100 = 0.1.
        assert_eq!(local_mean_stddev(2.0, 0.5, 4), 0.5);
        assert_eq!(local_mean_stddev(1.0, 1.0, 100), 0.1);
    }

    #[test]
    fn float_grid() {
        // 0.02·1/√156000 = 5.0637e-5, log2 = −14.27 → k = −15.
        // slack = 2^−16 · √156000 = 394.96835·2^−16 = 0.006026738787271575.
        assert_eq!(grid_exponent(1.0, 156_000), -15);
        assert_eq!(grid_slack(-15, 156_000), 0.006_026_738_787_271_575);
        // 0.002/√10 = 6.32e-4 (log2 −10.63) → −11; 0.1/1000 = 1e-4 (log2 −13.29) → −14.
        assert_eq!(grid_exponent(0.1, 10), -11);
        assert_eq!(grid_exponent(5.0, 1_000_000), -14);
        // dim 0 counts as 1; log2(0) = −∞ saturates, then the clamp; huge C clamps to 100.
        assert_eq!(grid_exponent(0.02, 0), grid_exponent(0.02, 1));
        assert_eq!(grid_exponent(0.0, 1), GRID_EXPONENT_MIN);
        assert_eq!(grid_exponent(1e300, 1), GRID_EXPONENT_MAX);
        for (c, d) in [(1.0, 156_000), (0.1, 10), (5.0, 1_000_000)] {
            let k = grid_exponent(c, d);
            assert!(grid_slack(k, d) <= 0.01 * c && grid_slack(k + 1, d) > 0.01 * c);
        }
        // Local: clip to 1 − 0.006026738787271575 = 0.9939732612127284.
        assert_eq!(
            local_noise_clip(1.0, 156_000),
            (-15, 0.993_973_261_212_728_4)
        );
        // Central: 1·(1 + 2·0.006026738787271575) = 1.0120534775745431.
        assert_eq!(
            central_sigma(1.0, 1.0, -15, 156_000),
            1.012_053_477_574_543_1
        );
        assert_eq!(central_sigma(0.0, 1.0, -15, 156_000), 0.0);
    }

    #[test]
    fn release_and_bounds() {
        assert_eq!(release_denominator(10), 10.0);
        // Aggregator privacy test: σ on the sum z·0.01, target 2 → z·0.01/2.
        assert_eq!(mean_noise_stddev(0.637 * 0.01, 2), 0.637 * 0.01 / 2.0);
        // (1 + 1·1·(√10000 + 10))·1.05 = 111·1.05 = 116.55000000000001.
        assert_eq!(
            local_upload_norm_bound(1.0, 1.0, 10_000),
            116.550_000_000_000_01
        );
        assert_eq!(local_upload_norm_bound(2.0, 0.0, 10_000), 2.1);
    }

    #[test]
    fn secagg_grid_sizing() {
        // bench secagg defaults: n = 100, z = 1, m = 95.
        // √(100/95) = 1.025978352085154; spread = 100 + 12·1.02598 = 112.31174022502185;
        // 2^30 / spread = 1073741824 / 112.31174 = 9560370.2858… → 9560370.
        assert_eq!(secagg_grid_units(100, 1.0, 95), 9_560_370.0);
        // No share: ⌊2^30/3⌋ = ⌊357913941.33⌋.
        assert_eq!(secagg_grid_units(3, 0.0, 3), 357_913_941.0);
        let g = secagg_grid(1.0, 100, 1.0, 95);
        assert_eq!(g.units, 9_560_370.0);
        // γ = 1/9560370.
        assert_eq!(g.granularity, 1.045_984_621_934_088_3e-7);
        // The device reads B back as C/γ: here it round-trips exactly.
        assert_eq!(grid_units(1.0, g.granularity), g.units);
        // The sum of n clipped inputs plus 12 σ of the summed shares fits 2^30.
        let sigma_sum = distributed_noise_share(1.0, g.units, 95) * 10.0; // √100 shares
        assert!(100.0 * g.units + 12.0 * sigma_sum <= SECAGG_SUM_BOUND);
    }

    #[test]
    fn budget() {
        // 8·(1 + 1e-9) = 8.000000008; the plan wins when above the target.
        assert_eq!(planned_budget(Some(8.0), 7.9992), 8.000_000_008);
        assert_eq!(planned_budget(None, 2.5), 2.500_000_002_5);
        assert_eq!(planned_budget(Some(7.0), 7.5), 7.500_000_007_500_001);
        assert_eq!(epsilon_remaining(8.0, 7.9992), 8.0 - 7.9992);
        assert_eq!(epsilon_remaining(1.0, 2.0), 0.0);
    }
}
