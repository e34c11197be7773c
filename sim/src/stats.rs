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

/// The 97.5% quantile of Student's t with `df` degrees of freedom (infinite at 0).
pub fn t975(df: usize) -> f64 {
    use statrs::distribution::{ContinuousCDF, StudentsT};
    StudentsT::new(0.0, 1.0, df as f64).map_or(f64::INFINITY, |t| t.inverse_cdf(0.975))
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
            (1, 12.7062),
            (3, 3.1824),
            (10, 2.2281),
            (30, 2.0423),
            (31, 2.0395),
            (40, 2.0211),
            (60, 2.0003),
            (120, 1.9799),
            (1000, 1.9623),
        ] {
            assert!((t975(df) - want).abs() < 2e-4, "df {df}: {}", t975(df));
        }
        assert!(t975(30) > t975(31) && t975(31) > t975(1000));
        assert_eq!(t975(0), f64::INFINITY);
    }
}
