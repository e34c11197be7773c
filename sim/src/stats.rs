//! The statistics of the report: a mean over users with its Student-t 95% interval.

use serde::Serialize;

/// Mean and 95% confidence half-width over users.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    pub mean: f64,
    pub ci95: f64,
    pub n: usize,
}

/// Mean of `xs` and the half-width of its 95% interval (Student t with n − 1 degrees of
/// freedom; 0 for fewer than two values).
pub fn interval(xs: &[f64]) -> Interval {
    let n = xs.len();
    if n == 0 {
        return Interval {
            mean: f64::NAN,
            ci95: f64::NAN,
            n,
        };
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return Interval { mean, ci95: 0.0, n };
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    Interval {
        mean,
        ci95: t975(n - 1) * (var / n as f64).sqrt(),
        n,
    }
}

/// The 97.5% quantile of Student's t with `df` degrees of freedom: exact table values up to
/// 30, then the Cornish-Fisher expansion around the normal quantile (error below 1e-4).
pub fn t975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => TABLE[df - 1],
        _ => {
            let z: f64 = 1.959_963_984_540_054;
            let v = df as f64;
            z + (z.powi(3) + z) / (4.0 * v)
                + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * v * v)
                + (3.0 * z.powi(7) + 19.0 * z.powi(5) + 17.0 * z.powi(3) - 15.0 * z)
                    / (384.0 * v.powi(3))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_matches_hand_computation() {
        // Mean 2.5, sample sd 1.2910, n 4, t(3) = 3.182: 3.182 * 1.2910 / 2 = 2.0540.
        let i = interval(&[1.0, 2.0, 3.0, 4.0]);
        assert!((i.mean - 2.5).abs() < 1e-12);
        assert!((i.ci95 - 2.0540).abs() < 1e-3, "{}", i.ci95);
        assert_eq!(interval(&[0.3]).ci95, 0.0);
        assert!(interval(&[]).mean.is_nan());
    }

    #[test]
    fn t_quantiles_match_tables() {
        // scipy.stats.t.ppf(0.975, df)
        for (df, want) in [
            (31, 2.0395),
            (40, 2.0211),
            (60, 2.0003),
            (120, 1.9799),
            (1000, 1.9623),
        ] {
            assert!((t975(df) - want).abs() < 2e-4, "df {df}: {}", t975(df));
        }
        assert!(t975(30) > t975(31) && t975(31) > t975(1000));
    }
}
