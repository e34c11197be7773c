//! Poisson sampling: the sampling both accountants assume, and the arithmetic around it.
//!
//! Each eligible device joins a round with probability q, drawn on the device from a
//! cryptographically secure generator, independently of every other device and of every
//! earlier round; the aggregator takes every device that drew itself in. A device that is
//! offline, or checks in too late, only lowers its own chance of taking part, and the
//! subsampled Gaussian's privacy loss for a user grows with that user's own chance, so q
//! bounds it however devices are available. The aggregator cannot raise a device's chance:
//! the draw is the device's.
//!
//! The cohort is then binomial, Bin(N, q): [`cohort_cap`] sizes what the aggregator is
//! built for (the SecAgg grid) so that a larger cohort, which abandons its round, is rarer
//! than [`oversubscription_tail`] allows; [`lower_quantile`] picks a `min_reports` that a
//! round meets with a stated probability.

use rand::distr::{Bernoulli, Distribution};

/// q for an expected cohort of `expected_cohort` devices out of `population` eligible ones.
pub fn poisson_rate(expected_cohort: u64, population: u64) -> f64 {
    expected_cohort as f64 / population as f64
}

/// A device's draw for one round: true with probability `rate` (in [0, 1], else None).
/// Give it a cryptographically secure generator: the draw must be unpredictable to the
/// aggregator, or it could learn (or steer) who takes part.
pub fn draw<R: rand::CryptoRng + ?Sized>(rate: f64, rng: &mut R) -> Option<bool> {
    Some(Bernoulli::new(rate).ok()?.sample(rng))
}

/// ln P(X = i) for X ~ Bin(n, q), 0 < q < 1.
fn ln_pmf(n: u64, q: f64, i: u64) -> f64 {
    let (n_f, i_f) = (n as f64, i as f64);
    libm::lgamma(n_f + 1.0) - libm::lgamma(i_f + 1.0) - libm::lgamma(n_f - i_f + 1.0)
        + i_f * q.ln()
        + (n_f - i_f) * (-q).ln_1p()
}

/// Terms below this share of the largest one no longer change a tail sum in f64.
const NEGLIGIBLE_LN: f64 = -745.0;

/// P(X > k) for X ~ Bin(n, q): summed in log space from k + 1 upwards until the terms
/// vanish, so tails down to 1e-300 keep their relative precision.
pub fn upper_tail(n: u64, q: f64, k: u64) -> f64 {
    if k >= n || q <= 0.0 {
        return 0.0;
    }
    if q >= 1.0 {
        return 1.0;
    }
    let mode = ((n + 1) as f64 * q).floor() as u64;
    let mut sum = 0.0;
    for i in k + 1..=n {
        let ln = ln_pmf(n, q, i);
        sum += ln.exp();
        if i > mode && ln < NEGLIGIBLE_LN {
            break;
        }
    }
    sum.min(1.0)
}

/// P(X < k) for X ~ Bin(n, q), summed from k − 1 downwards in the same way.
pub fn lower_tail(n: u64, q: f64, k: u64) -> f64 {
    if k == 0 || (q >= 1.0 && k <= n) {
        return 0.0;
    }
    if k > n || q <= 0.0 {
        return 1.0;
    }
    let mode = ((n + 1) as f64 * q).floor() as u64;
    let mut sum = 0.0;
    for i in (0..k).rev() {
        let ln = ln_pmf(n, q, i);
        sum += ln.exp();
        if i < mode && ln < NEGLIGIBLE_LN {
            break;
        }
    }
    sum.min(1.0)
}

/// The least cohort size k with P(Bin(n, q) > k) ≤ `tail`: what to build for.
pub fn cohort_cap(n: u64, q: f64, tail: f64) -> u64 {
    // P(X > k) falls as k grows: bisect on [⌊nq⌋, n].
    let (mut lo, mut hi) = (((n as f64) * q).floor() as u64, n);
    if upper_tail(n, q, lo) <= tail {
        return lo;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if upper_tail(n, q, mid) <= tail {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// The largest k ≥ 1 with P(Bin(n, q) < k) ≤ `p`: a `min_reports` the sampled cohort
/// reaches in all but a share `p` of rounds (1 if none).
pub fn lower_quantile(n: u64, q: f64, p: f64) -> u64 {
    // P(X < k) grows with k: bisect on [1, ⌈nq⌉].
    let (mut lo, mut hi) = (1, ((n as f64) * q).ceil().max(1.0) as u64 + 1);
    if lower_tail(n, q, lo) > p {
        return 1;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if lower_tail(n, q, mid) <= p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The chance per round a cohort may exceed its cap: a round that does is abandoned
/// (nothing released), an event that adds at most (1 + e^ε)·P to δ each time it can
/// happen, so over `rounds` rounds this keeps the total below 1% of δ.
pub fn oversubscription_tail(delta: f64, epsilon: f64, rounds: u64) -> f64 {
    0.01 * delta / ((1.0 + epsilon.exp()) * rounds.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::SeedableRng;

    use super::*;

    /// The exact tail from the pmf summed term by term in f64 (small n only).
    fn naive_upper(n: u64, q: f64, k: u64) -> f64 {
        let mut c = 1.0f64; // C(n, i)
        let mut sum = 0.0;
        for i in 0..=n {
            if i > 0 {
                c = c * (n - i + 1) as f64 / i as f64;
            }
            if i > k {
                sum += c * q.powi(i as i32) * (1.0 - q).powi((n - i) as i32);
            }
        }
        sum
    }

    #[test]
    fn tails_match_hand_computed_values() {
        // Bin(4, 1/2): P(X > 2) = (4 + 1)/16; P(X < 2) = (1 + 4)/16.
        assert!((upper_tail(4, 0.5, 2) - 5.0 / 16.0).abs() < 1e-14);
        assert!((lower_tail(4, 0.5, 2) - 5.0 / 16.0).abs() < 1e-14);
        // Bin(10, 0.1): P(X > 0) = 1 − 0.9^10.
        assert!((upper_tail(10, 0.1, 0) - (1.0 - 0.9f64.powi(10))).abs() < 1e-14);
        assert_eq!(upper_tail(10, 0.1, 10), 0.0);
        assert_eq!(lower_tail(10, 0.1, 0), 0.0);
        assert_eq!(upper_tail(10, 1.0, 3), 1.0);
        assert_eq!(lower_tail(10, 1.0, 10), 0.0);
        assert_eq!(lower_tail(10, 1.0, 11), 1.0);
    }

    #[test]
    fn deep_tails_keep_their_precision() {
        // P(X > 9) for Bin(10, 0.01) is 0.01^10 exactly.
        let t = upper_tail(10, 0.01, 9);
        assert!((t / 1e-20 - 1.0).abs() < 1e-10, "{t}");
    }

    proptest! {
        #[test]
        fn tails_agree_with_the_naive_sum(n in 1u64..60, q in 0.001f64..0.999, k in 0u64..60) {
            let k = k.min(n);
            let want = naive_upper(n, q, k);
            let got = upper_tail(n, q, k);
            prop_assert!((got - want).abs() <= 1e-12 + 1e-9 * want, "{got} vs {want}");
            // The two tails and P(X = k) make one.
            let at = ln_pmf(n, q, k).exp();
            prop_assert!((lower_tail(n, q, k) + at + got - 1.0).abs() < 1e-9);
        }

        #[test]
        fn the_cap_is_the_least_size_under_the_tail(n in 1u64..2000, q in 0.001f64..0.9, e in 1i32..14) {
            let tail = 10f64.powi(-e);
            let k = cohort_cap(n, q, tail);
            prop_assert!(upper_tail(n, q, k) <= tail);
            prop_assert!(k == 0 || k as f64 <= (n as f64 * q).floor() || upper_tail(n, q, k - 1) > tail);
        }
    }

    #[test]
    fn the_simulation_cohort_is_capped_far_above_its_mean() {
        // 194 users, 10 expected per round, ε 8, δ 1e-5, 30 rounds.
        let q = poisson_rate(10, 194);
        assert_eq!(q, 10.0 / 194.0); // 0.05154639175257732
        let tail = oversubscription_tail(1e-5, 8.0, 30);
        assert!((tail - 1e-7 / ((1.0 + 8f64.exp()) * 30.0)).abs() < 1e-25);
        let cap = cohort_cap(194, q, tail);
        assert!(upper_tail(194, q, cap) <= tail && upper_tail(194, q, cap - 1) > tail);
        assert!((30..=45).contains(&cap), "{cap}");
        // A min_reports met in 95 % of rounds.
        let m = lower_quantile(194, q, 0.05);
        assert!(lower_tail(194, q, m) <= 0.05 && lower_tail(194, q, m + 1) > 0.05);
        assert!((4..=6).contains(&m), "{m}");
    }

    #[test]
    fn draws_follow_the_rate_and_refuse_a_rate_outside_0_1() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let n = 100_000;
        let hits = (0..n).filter(|_| draw(0.05, &mut rng).unwrap()).count() as f64;
        // 0.05 ± 5 standard deviations of the binomial share.
        let sd = (0.05f64 * 0.95 / n as f64).sqrt();
        assert!((hits / n as f64 - 0.05).abs() < 5.0 * sd, "{hits}");
        assert_eq!(draw(0.0, &mut rng), Some(false));
        assert_eq!(draw(1.0, &mut rng), Some(true));
        assert_eq!(draw(1.5, &mut rng), None);
        assert_eq!(draw(f64::NAN, &mut rng), None);
    }
}
