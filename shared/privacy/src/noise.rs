//! Differential-privacy noise that resists floating-point attacks (Mironov 2012): every draw
//! comes from OpenDP's exact discrete Gaussian sampler (Canonne, Kamath, Steinke 2020), which
//! works on integers and rationals and never through floating-point arithmetic on the noise.
//!
//! * [`add_gaussian`] (local and central noise on real values) rounds each value to the grid
//!   2^k and adds a discrete Gaussian on that grid, which is what OpenDP's float Gaussian does.
//!   Rounding moves a vector by at most 2^(k-1)·√d in L2, so a caller who clips to C first
//!   clips to `C - mode::grid_slack(k, d)` to keep the sensitivity C; [`mode::grid_exponent`] picks a grid
//!   that costs at most 1% of C.
//! * [`add_discrete_gaussian`] (distributed noise) adds a discrete Gaussian to integers:
//!   the quantized values that secure aggregation sums.
//!
//! OpenDP draws its bits from `rand::thread_rng` (ChaCha12 seeded by the OS), a CSPRNG. The
//! work is split over all cores: each coordinate's draw is independent of the others, so the
//! split changes nothing about the distribution.

use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_gaussian;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::metrics::L2Distance;

use crate::mode;

/// Errors from sampling noise.
#[derive(Debug, thiserror::Error)]
pub enum NoiseError {
    #[error("noise standard deviation must be finite and non-negative, got {0}")]
    BadScale(f64),
    #[error("values to noise must be finite")]
    NonFinite,
    #[error("noise grid exponent {0} is out of range")]
    BadGrid(i32),
    #[error("OpenDP: {0}")]
    OpenDp(String),
}

fn opendp_error(e: opendp::error::Error) -> NoiseError {
    NoiseError::OpenDp(e.to_string())
}

fn check_scale(stddev: f64) -> Result<(), NoiseError> {
    if stddev.is_finite() && stddev >= 0.0 {
        Ok(())
    } else {
        Err(NoiseError::BadScale(stddev))
    }
}

/// Splits `values` over the cores and runs `f` on each part; the first error wins.
fn on_all_cores<T: Send>(
    values: &mut [T],
    f: impl Fn(&mut [T]) -> Result<(), NoiseError> + Sync,
) -> Result<(), NoiseError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = values.len().div_ceil(threads).max(4096);
    std::thread::scope(|s| {
        let handles: Vec<_> = values
            .chunks_mut(per)
            .map(|part| s.spawn(|| f(part)))
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("noise sampling does not panic"))
    })
}

/// A value type OpenDP's float Gaussian accepts.
pub trait NoiseFloat: Copy + Send + Sync + 'static {
    fn noised(values: &[Self], stddev: f64, k: i32) -> Result<Vec<Self>, NoiseError>;
    fn finite(self) -> bool;
}

macro_rules! noise_float {
    ($t:ty) => {
        impl NoiseFloat for $t {
            fn noised(values: &[Self], stddev: f64, k: i32) -> Result<Vec<Self>, NoiseError> {
                let domain =
                    VectorDomain::new(AtomDomain::<$t>::new_non_nan()).with_size(values.len());
                let m = make_gaussian::<_, _, ZeroConcentratedDivergence>(
                    domain,
                    L2Distance::<$t>::default(),
                    stddev,
                    Some(k),
                )
                .map_err(opendp_error)?;
                m.invoke(&values.to_vec()).map_err(opendp_error)
            }
            fn finite(self) -> bool {
                self.is_finite()
            }
        }
    };
}
noise_float!(f32);
noise_float!(f64);

/// Adds N(0, stddev²) to every value, on the grid 2^k (see the module docs).
pub fn add_gaussian<T: NoiseFloat>(
    values: &mut [T],
    stddev: f64,
    k: i32,
) -> Result<(), NoiseError> {
    check_scale(stddev)?;
    if !(mode::GRID_EXPONENT_MIN..=mode::GRID_EXPONENT_MAX).contains(&k) {
        return Err(NoiseError::BadGrid(k));
    }
    if values.iter().any(|v| !v.finite()) {
        return Err(NoiseError::NonFinite);
    }
    if stddev == 0.0 || values.is_empty() {
        return Ok(());
    }
    on_all_cores(values, |part| {
        let noised = T::noised(part, stddev, k)?;
        part.copy_from_slice(&noised);
        Ok(())
    })
}

/// Adds a discrete Gaussian N_Z(0, stddev²) to every integer. The caller has checked that
/// the results cannot overflow (OpenDP saturates at the type's bounds).
pub fn add_discrete_gaussian(values: &mut [i32], stddev: f64) -> Result<(), NoiseError> {
    check_scale(stddev)?;
    if stddev == 0.0 || values.is_empty() {
        return Ok(());
    }
    on_all_cores(values, |part| {
        let domain = VectorDomain::new(AtomDomain::<i32>::default()).with_size(part.len());
        let m = make_gaussian::<_, _, ZeroConcentratedDivergence>(
            domain,
            L2Distance::<i32>::default(),
            stddev,
            None,
        )
        .map_err(opendp_error)?;
        let noised = m.invoke(&part.to_vec()).map_err(opendp_error)?;
        part.copy_from_slice(&noised);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moments(v: &[f64]) -> (f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var.sqrt())
    }

    #[test]
    fn gaussian_noise_has_the_asked_scale() {
        let mut v = vec![0.25f32; 20_000];
        let k = mode::grid_exponent(1.0, v.len());
        add_gaussian(&mut v, 2.0, k).unwrap();
        let (mean, sd) = moments(&v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>());
        // Standard errors: 2/√20000 ≈ 0.014 for the mean, ≈ 0.01 for the sd.
        assert!((mean - 0.25).abs() < 0.07, "{mean}");
        assert!((sd - 2.0).abs() < 0.06, "{sd}");
        let g = 2f64.powi(k);
        assert!(
            v.iter()
                .all(|&x| (f64::from(x) / g - (f64::from(x) / g).round()).abs() < 1e-3),
            "noised values lie on the grid"
        );
    }

    #[test]
    fn discrete_gaussian_is_centred_integer_noise() {
        let mut v = vec![7i32; 20_000];
        add_discrete_gaussian(&mut v, 30.0).unwrap();
        let (mean, sd) = moments(&v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>());
        assert!((mean - 7.0).abs() < 1.0, "{mean}");
        assert!((sd - 30.0).abs() < 1.0, "{sd}");
    }

    #[test]
    fn bad_input_is_refused_and_untouched() {
        let mut v = vec![1.0f64, f64::NAN];
        assert!(matches!(
            add_gaussian(&mut v, 1.0, -10),
            Err(NoiseError::NonFinite)
        ));
        let mut v = vec![1.0f64];
        assert!(matches!(
            add_gaussian(&mut v, -1.0, -10),
            Err(NoiseError::BadScale(_))
        ));
        assert!(matches!(
            add_gaussian(&mut v, 1.0, 5000),
            Err(NoiseError::BadGrid(_))
        ));
        assert_eq!(v, vec![1.0]);
        let mut i = vec![3i32];
        assert!(add_discrete_gaussian(&mut i, f64::INFINITY).is_err());
        assert_eq!(i, vec![3]);
    }
}
