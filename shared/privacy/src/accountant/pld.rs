//! Privacy loss distributions (PLD) of the Poisson-subsampled Gaussian mechanism, discretized
//! pessimistically and composed by FFT (Koskela, Jälkö, Honkela 2020; Google's
//! `dp_accounting.pld`, whose default `PLDAccountant` this reproduces).
//!
//! **The mechanism.** A round adds N(0, z²) to a sum of updates clipped to norm 1; a user is
//! in it with probability q. With the user the output is P = (1−q)·N(0, z²) + q·N(1, z²),
//! without it Q = N(0, z²). (ε, δ)-DP under add-or-remove neighbouring needs both hockey-stick
//! divergences, H_{e^ε}(P‖Q) ("remove": the user's data taken out) and H_{e^ε}(Q‖P) ("add"),
//! which differ when q < 1. Each direction gets its own PLD, each is composed over the rounds,
//! and ε at δ is the larger of the two: `dp_accounting`'s
//! `NeighboringRelation.ADD_OR_REMOVE_ONE`. At q = 1 the two coincide and one is kept.
//!
//! **Exact hockey-stick curves.** Both directions reduce to the unsampled Gaussian's
//! δ_G(ε) = Φ(1/(2z) − εz) − e^ε·Φ(−1/(2z) − εz) (Balle and Wang 2018) through the
//! subsampled loss map ℓ_q(ε) = ln(1 + (e^ε − 1)/q):
//! remove δ(ε) = q·δ_G(ℓ_q(ε)) for ε > ln(1−q), 1 − e^ε below;
//! add δ(ε) = (1 − (1−q)e^ε)·δ_G(−ℓ_q(−ε)) for ε < −ln(1−q), 0 above.
//!
//! **Discretization (pessimistic, connect-the-dots; Doroshenko et al. 2022).** One round's PLD
//! is put on the grid h·ℤ (h = [`DEFAULT_DISCRETIZATION`] = 1e-4 unless asked otherwise) by
//! evaluating the exact δ(ε) at every grid point between the losses of the noise's
//! e^{−50}-tails (as `dp_accounting` bounds them) and choosing the point masses whose
//! hockey-stick curve passes through those values. δ is convex in e^ε, so the chords lie
//! above it: the discrete PLD's δ(ε) is at least the true one for every ε, the mass beyond the
//! top point (δ there) sits at +∞, and the mass below the bottom point is moved up onto it.
//! Masses that rounding makes negative are raised to zero, which only adds loss.
//!
//! **Composition.** Independent rounds add their losses: the PLD of k rounds is the k-fold
//! convolution, computed as one FFT, a k-th power of the spectrum (repeated squaring) and an
//! inverse FFT, over a window chosen by Chernoff bounds so that at most 1e-15 of the mass
//! falls outside it; that 1e-15 is added to the mass at +∞ (and the circular wrap-around only
//! duplicates mass, never removes it). Rounds of different (q, z) are convolved the same way.
//!
//! **ε from δ.** The smallest ε ≥ 0 with δ(ε) = m_∞ + Σ_{ℓ>ε} p_ℓ(1 − e^{ε−ℓ}) ≤ δ, solved
//! exactly on the piecewise curve. Every step errs towards more loss, so the result is an
//! upper bound on the mechanism's ε; it agrees with `dp_accounting` at the same interval
//! (`shared/privacy/tests/pld_reference.rs`), and a finer interval can only lower it.

use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};

use super::{check, AccountantError};

/// The grid step of privacy losses, as `dp_accounting`'s `value_discretization_interval`.
pub const DEFAULT_DISCRETIZATION: f64 = 1e-4;
/// The smallest noise multiplier this accountant evaluates: one round's grid grows as 1/z²
/// (600,000 points a direction at 0.2) and its compositions with it. Its agreement with
/// `dp_accounting` is checked from 0.5 up.
pub const MIN_NOISE_MULTIPLIER: f64 = 0.2;
/// The noise mass outside one round's grid, ln: the tails of N(0, z²) beyond the points whose
/// mass is e^{-50}/2 each (`dp_accounting`'s `log_mass_truncation_bound`).
const LOG_MASS_TRUNCATION: f64 = -50.0;
/// Mass a composition may drop from its tails; added to the infinite loss.
const TAIL_MASS_TRUNCATION: f64 = 1e-15;
/// The most grid points one distribution may have (2^26 f64: 512 MiB, and as much again for
/// its spectrum).
pub const MAX_GRID_POINTS: u64 = 1 << 26;

/// Φ, the standard normal CDF.
fn normal_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// ln Φ(x), accurate where Φ(x) underflows.
fn log_normal_cdf(x: f64) -> f64 {
    super::rdp::log_erfc(-x / std::f64::consts::SQRT_2) - std::f64::consts::LN_2
}

/// δ_G(ε): the hockey-stick divergence H_{e^ε}(N(0, z²)‖N(1, z²)), for any real ε.
fn gaussian_delta(z: f64, eps: f64) -> f64 {
    let a = 0.5 / z;
    let upper = normal_cdf(a - eps * z);
    let lower = (eps + log_normal_cdf(-a - eps * z)).exp();
    (upper - lower).max(0.0)
}

/// ℓ_q(ε) = ln(1 + (e^ε − 1)/q), for ε > ln(1 − q): the unsampled loss that the subsampled
/// loss ε corresponds to.
fn unsampled_loss(q: f64, eps: f64) -> f64 {
    if eps > 1.0 {
        eps + (-(1.0 - q) * (-eps).exp()).ln_1p() - q.ln()
    } else {
        (eps.exp_m1() / q).ln_1p()
    }
}

/// ln(1 − q + q·e^l): the subsampled loss of the unsampled loss l.
fn sampled_loss(q: f64, l: f64) -> f64 {
    if l > 0.0 {
        l + (q + (1.0 - q) * (-l).exp()).ln()
    } else {
        (q * l.exp_m1()).ln_1p()
    }
}

/// δ(ε) of the "remove" pair, H_{e^ε}(P‖Q).
fn delta_remove(z: f64, q: f64, eps: f64) -> f64 {
    if q == 1.0 {
        return gaussian_delta(z, eps);
    }
    if eps <= (-q).ln_1p() {
        return -eps.exp_m1();
    }
    q * gaussian_delta(z, unsampled_loss(q, eps))
}

/// δ(ε) of the "add" pair, H_{e^ε}(Q‖P).
fn delta_add(z: f64, q: f64, eps: f64) -> f64 {
    if q == 1.0 {
        return gaussian_delta(z, eps);
    }
    let log1mq = (-q).ln_1p();
    if eps >= -log1mq {
        return 0.0;
    }
    -(eps + log1mq).exp_m1() * gaussian_delta(z, -unsampled_loss(q, -eps))
}

/// y with Φ(−y) = e^{LOG_MASS_TRUNCATION}/2 (about 9.97), by bisection.
fn tail_point() -> f64 {
    let target = LOG_MASS_TRUNCATION - std::f64::consts::LN_2;
    let (mut lo, mut hi) = (0.0f64, 40.0f64);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if log_normal_cdf(-mid) > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

/// A discrete privacy loss distribution: `probs[i]` is the mass at loss (offset + i)·h, and
/// `infinity` the mass at +∞ (outcomes whose loss is unbounded or beyond the grid).
#[derive(Debug, Clone, PartialEq)]
struct Pmf {
    offset: i64,
    probs: Vec<f64>,
    infinity: f64,
}

fn too_large(points: f64) -> AccountantError {
    AccountantError::TooLarge(points.min(u64::MAX as f64) as u64)
}

impl Pmf {
    /// The point mass at loss 0: no privacy loss.
    fn identity() -> Pmf {
        Pmf {
            offset: 0,
            probs: vec![1.0],
            infinity: 0.0,
        }
    }

    /// Pessimistic connect-the-dots on the grid points lo..=hi (units of h) of the exact
    /// hockey-stick curve `delta`.
    fn connect_dots(
        h: f64,
        lo: i64,
        hi: i64,
        delta: impl Fn(f64) -> f64,
    ) -> Result<Pmf, AccountantError> {
        let n = (hi - lo + 1) as f64;
        if n > MAX_GRID_POINTS as f64 {
            return Err(too_large(n));
        }
        let mut d: Vec<f64> = (lo..=hi)
            .map(|i| delta(i as f64 * h).clamp(0.0, 1.0))
            .collect();
        // δ is non-increasing in ε; keep rounding from breaking that.
        for k in 1..d.len() {
            d[k] = d[k].min(d[k - 1]);
        }
        let n = d.len();
        let infinity = d[n - 1];
        if n == 1 {
            return Ok(Pmf {
                offset: lo,
                probs: vec![1.0 - d[0]],
                infinity,
            });
        }
        // The masses whose curve δ̂(t), piecewise linear in t = e^ε, passes through every
        // (e^{ε_i}, δ_i): mass at ε_i = e^{ε_i}·(slope change of δ̂ at e^{ε_i}); the first
        // point also takes everything below it (1 − δ_0 of the slope-0 extension).
        let (em1, e) = (h.exp_m1(), h.exp());
        let mut probs = vec![0.0; n];
        probs[0] = 1.0 - d[0] + (d[1] - d[0]) / em1;
        for k in 1..n - 1 {
            probs[k] = ((d[k + 1] - d[k]) - (d[k] - d[k - 1]) * e) / em1;
        }
        probs[n - 1] = (d[n - 1] - d[n - 2]) / (-h).exp_m1();
        for p in &mut probs {
            *p = p.max(0.0);
        }
        Ok(Pmf {
            offset: lo,
            probs,
            infinity,
        }
        .trimmed())
    }

    /// Without zero masses at either end.
    fn trimmed(mut self) -> Pmf {
        let first = self.probs.iter().position(|&p| p > 0.0);
        let Some(first) = first else {
            return Pmf {
                offset: 0,
                probs: vec![0.0],
                infinity: self.infinity,
            };
        };
        let last = self.probs.iter().rposition(|&p| p > 0.0).unwrap_or(first);
        self.probs.truncate(last + 1);
        self.probs.drain(..first);
        self.offset += first as i64;
        self
    }

    /// δ(ε) = m_∞ + Σ_{ℓ>ε} p_ℓ·(1 − e^{ε−ℓ}).
    fn delta(&self, h: f64, eps: f64) -> f64 {
        let mut d = self.infinity;
        for (i, &p) in self.probs.iter().enumerate() {
            let l = (self.offset + i as i64) as f64 * h;
            if l > eps {
                d += p * -(eps - l).exp_m1();
            }
        }
        d
    }

    /// The smallest ε ≥ 0 with δ(ε) ≤ `delta` (+∞ if the mass at +∞ alone exceeds it).
    ///
    /// Scanning the grid downwards, U is the mass above the current interval (with m_∞) and
    /// v = Σ_{ℓ_j ≥ ℓ_last} p_j·e^{ℓ_last − ℓ_j} its e^{−ℓ}-weighted mass, scaled to the lowest
    /// loss taken so far, so that neither overflows; on [ℓ_next, ℓ_last) the curve is
    /// δ(ε) = U − e^{ε − ℓ_last}·v.
    fn epsilon(&self, h: f64, delta: f64) -> f64 {
        if self.infinity > delta {
            return f64::INFINITY;
        }
        let (mut upper, mut v) = (self.infinity, 0.0f64);
        let mut last: Option<f64> = None;
        for (i, &p) in self.probs.iter().enumerate().rev() {
            let l = (self.offset + i as i64) as f64 * h;
            let at = l.max(0.0);
            if let Some(top) = last {
                // δ at the lower end of [at, top).
                if upper - (at - top).exp() * v >= delta {
                    return (top + ((upper - delta) / v).ln()).max(at);
                }
                if at == 0.0 && l <= 0.0 {
                    return 0.0;
                }
            } else if l <= 0.0 {
                return 0.0;
            }
            if p > 0.0 || last.is_some() {
                v = match last {
                    Some(top) => v * (l - top).exp() + p,
                    None => p,
                };
                upper += p;
                last = Some(l);
            }
        }
        match last {
            Some(top) if upper - (-top).exp() * v > delta => {
                (top + ((upper - delta) / v).ln()).max(0.0)
            }
            _ => 0.0,
        }
    }

    /// Chernoff bounds on the index of the `times`-fold sum: (lo, hi) with at most `tail`/2 of
    /// the mass strictly below lo and at most `tail`/2 strictly above hi. Indices count from
    /// this distribution's offset, in 0..=(len − 1)·times.
    fn sum_bounds(&self, times: u64, tail: f64) -> (f64, f64) {
        let len = self.probs.len();
        let n = times as f64;
        let top = (len - 1) as f64 * n;
        if len == 1 {
            return (0.0, 0.0);
        }
        let c = (2.0 / tail).ln();
        // ln Σ p_i e^{λ i}, by Horner's rule from the side that keeps every term ≤ 1.
        let log_mgf = |lambda: f64| -> f64 {
            let r = (-lambda.abs()).exp();
            if lambda > 0.0 {
                horner(&self.probs, r, false).ln() + lambda * (len - 1) as f64
            } else {
                horner(&self.probs, r, true).ln()
            }
        };
        // The bound at λ, (n·M(λ) + ln(2/τ))/λ, is quasi-convex in λ on each side: a coarse
        // log-spaced scan, then golden-section search around the best point.
        let bound = |lambda: f64| (n * log_mgf(lambda) + c) / lambda;
        let search = |sign: f64| -> f64 {
            let better = |a: f64, b: f64| if sign > 0.0 { a < b } else { a > b };
            let at = |u: f64| {
                let b = bound(sign * u.exp());
                if b.is_finite() {
                    b
                } else if sign > 0.0 {
                    f64::INFINITY
                } else {
                    f64::NEG_INFINITY
                }
            };
            // λ from 1e-12 to 10 per grid step.
            let (u0, u1) = ((1e-12f64).ln(), 10f64.ln());
            let steps = 20;
            let du = (u1 - u0) / steps as f64;
            let mut best = (u0, at(u0));
            for k in 1..=steps {
                let u = u0 + du * k as f64;
                let b = at(u);
                if better(b, best.1) {
                    best = (u, b);
                }
            }
            let (mut a, mut b) = (best.0 - du, best.0 + du);
            let g = (5f64.sqrt() - 1.0) / 2.0;
            let mut x1 = b - g * (b - a);
            let mut x2 = a + g * (b - a);
            let (mut f1, mut f2) = (at(x1), at(x2));
            for _ in 0..24 {
                if better(f1, f2) {
                    b = x2;
                    x2 = x1;
                    f2 = f1;
                    x1 = b - g * (b - a);
                    f1 = at(x1);
                } else {
                    a = x1;
                    x1 = x2;
                    f1 = f2;
                    x2 = a + g * (b - a);
                    f2 = at(x2);
                }
            }
            let mut out = best.1;
            for f in [f1, f2] {
                if better(f, out) {
                    out = f;
                }
            }
            out
        };
        let hi = search(1.0).ceil().clamp(0.0, top);
        let lo = search(-1.0).floor().clamp(0.0, hi);
        (lo, hi)
    }

    /// The `times`-fold composition (`times` ≥ 1).
    fn self_compose(&self, times: u64, fft: &mut Fft) -> Result<Pmf, AccountantError> {
        if times == 1 {
            return Ok(self.clone());
        }
        let len = self.probs.len();
        let infinity = -((times as f64) * (-self.infinity).ln_1p()).exp_m1();
        let (lo, hi) = self.sum_bounds(times, TAIL_MASS_TRUNCATION);
        let window = hi - lo + 1.0;
        let size = window.max(len as f64);
        if size > MAX_GRID_POINTS as f64 {
            return Err(too_large(size));
        }
        // The window's start must be an exact integer, and the losses on i64.
        let offset = (self.offset as f64).mul_add(times as f64, lo);
        if lo > 2f64.powi(52) || offset.abs() > 2f64.powi(52) {
            return Err(too_large(lo));
        }
        let (lo, window) = (lo as u64, window as usize);
        let size = fast_len(size as usize);
        let mut spectrum = fft.forward(&self.probs, size);
        for c in &mut spectrum {
            *c = power(*c, times);
        }
        let out = fft.inverse(spectrum, size);
        // Index j of the window is the sum's index lo + j, at (lo + j) mod size of the
        // circular result.
        let start = (lo % size as u64) as usize;
        let probs = (0..window)
            .map(|j| out[(start + j) % size].max(0.0))
            .collect();
        Ok(Pmf {
            offset: self.offset * times as i64 + lo as i64,
            probs,
            infinity: (infinity + TAIL_MASS_TRUNCATION).min(1.0),
        }
        .trimmed())
    }

    /// The composition with `other` (linear convolution), its tails truncated by at most
    /// 1e-15: the lower tail moved up onto the first point kept, the upper one to +∞.
    fn compose(&self, other: &Pmf, fft: &mut Fft) -> Result<Pmf, AccountantError> {
        let n = self.probs.len() + other.probs.len() - 1;
        if n as u64 > MAX_GRID_POINTS {
            return Err(too_large(n as f64));
        }
        let size = fast_len(n);
        let a = fft.forward(&self.probs, size);
        let b = fft.forward(&other.probs, size);
        let product = a.iter().zip(&b).map(|(x, y)| x * y).collect();
        let mut probs: Vec<f64> = fft.inverse(product, size);
        probs.truncate(n);
        for p in &mut probs {
            *p = p.max(0.0);
        }
        let half = TAIL_MASS_TRUNCATION / 2.0;
        let (mut left, mut cut) = (0, 0.0);
        while left + 1 < probs.len() && cut + probs[left] <= half {
            cut += probs[left];
            left += 1;
        }
        let (mut right, mut up) = (probs.len(), 0.0);
        while right > left + 1 && up + probs[right - 1] <= half {
            up += probs[right - 1];
            right -= 1;
        }
        probs.truncate(right);
        probs.drain(..left);
        probs[0] += cut;
        let infinity = self.infinity + other.infinity - self.infinity * other.infinity + up;
        Ok(Pmf {
            offset: self.offset + other.offset + left as i64,
            probs,
            infinity: infinity.min(1.0),
        }
        .trimmed())
    }
}

/// Σ_i p_i·r^(n−1−i) (or Σ_i p_i·r^i when `reverse`), r ≤ 1, with four independent
/// accumulators over the whole chunks and the few values left over added with their power.
fn horner(p: &[f64], r: f64, reverse: bool) -> f64 {
    let r4 = r.powi(4);
    let chunks = (p.len() / 4) as i32;
    let mut acc = [0.0f64; 4];
    let mut step = |c: &[f64]| {
        for j in 0..4 {
            acc[j] = acc[j].mul_add(r4, c[j]);
        }
    };
    if reverse {
        // Lane j: Σ_m p_{4m+j}·r^{4m}; then the values past the last chunk, at r^{4M+k}.
        let (whole, rest) = p.split_at(4 * chunks as usize);
        whole.chunks_exact(4).rev().for_each(&mut step);
        let rest: f64 = rest.iter().rev().fold(0.0, |s, &x| s.mul_add(r, x));
        (0..4).map(|j| acc[j] * r.powi(j as i32)).sum::<f64>() + rest * r4.powi(chunks)
    } else {
        // The values before the first chunk, at r^{4M + rest − 1 − i}; lane j:
        // Σ_m p_{rest+4m+j}·r^{4(M−1−m)}, short of r^{3−j}.
        let (head, whole) = p.split_at(p.len() % 4);
        whole.chunks_exact(4).for_each(&mut step);
        let head: f64 = head.iter().fold(0.0, |s, &x| s.mul_add(r, x));
        (0..4).map(|j| acc[j] * r.powi(3 - j as i32)).sum::<f64>() + head * r4.powi(chunks)
    }
}

/// c^n by repeated squaring.
fn power(mut c: Complex<f64>, mut n: u64) -> Complex<f64> {
    let mut acc = Complex::new(1.0, 0.0);
    while n > 0 {
        if n & 1 == 1 {
            acc *= c;
        }
        n >>= 1;
        if n > 0 {
            c = c * c;
        }
    }
    acc
}

/// The smallest even 2^a·3^b·5^c·7^d ≥ n: an FFT size rustfft handles fast.
fn fast_len(n: usize) -> usize {
    let mut m = n.max(2);
    loop {
        if m.is_multiple_of(2) {
            let mut r = m;
            for p in [2, 3, 5, 7] {
                while r.is_multiple_of(p) {
                    r /= p;
                }
            }
            if r == 1 {
                return m;
            }
        }
        m += 1;
    }
}

/// Real FFTs of any size, planned once per size.
struct Fft {
    planner: RealFftPlanner<f64>,
}

impl Fft {
    fn new() -> Fft {
        Fft {
            planner: RealFftPlanner::new(),
        }
    }

    fn plans(&mut self, size: usize) -> (Arc<dyn RealToComplex<f64>>, Arc<dyn ComplexToReal<f64>>) {
        (
            self.planner.plan_fft_forward(size),
            self.planner.plan_fft_inverse(size),
        )
    }

    /// The spectrum of `values` zero-padded to `size` (≥ their length).
    fn forward(&mut self, values: &[f64], size: usize) -> Vec<Complex<f64>> {
        let (r2c, _) = self.plans(size);
        let mut input = r2c.make_input_vec();
        input[..values.len()].copy_from_slice(values);
        let mut out = r2c.make_output_vec();
        r2c.process(&mut input, &mut out)
            .expect("buffers sized by the plan");
        out
    }

    /// The real signal of length `size` with this spectrum, normalized.
    fn inverse(&mut self, mut spectrum: Vec<Complex<f64>>, size: usize) -> Vec<f64> {
        let (_, c2r) = self.plans(size);
        // A real signal's spectrum is real at 0 and (for even sizes) at size/2.
        spectrum[0].im = 0.0;
        if size.is_multiple_of(2) {
            let last = spectrum.len() - 1;
            spectrum[last].im = 0.0;
        }
        let mut out = c2r.make_output_vec();
        c2r.process(&mut spectrum, &mut out)
            .expect("buffers sized by the plan, real ends");
        let scale = 1.0 / size as f64;
        for x in &mut out {
            *x *= scale;
        }
        out
    }
}

/// `a()` and `b()`, the second on another thread (the two directions of a PLD are independent).
fn both<A: Send, B: Send>(a: impl FnOnce() -> A + Send, b: impl FnOnce() -> B + Send) -> (A, B) {
    std::thread::scope(|s| {
        let b = s.spawn(b);
        let a = a();
        (a, b.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
    })
}

/// A PLD under add-or-remove neighbouring, on the grid h·ℤ: the "remove" direction and, when
/// it differs, the "add" one.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivacyLoss {
    h: f64,
    remove: Pmf,
    /// None where it equals `remove` (q = 1, or no loss at all).
    add: Option<Pmf>,
}

impl PrivacyLoss {
    /// No privacy loss: the PLD of zero rounds.
    pub fn identity(h: f64) -> PrivacyLoss {
        PrivacyLoss {
            h,
            remove: Pmf::identity(),
            add: None,
        }
    }

    /// One round of the Gaussian mechanism with noise multiplier `z` (sensitivity 1) under
    /// Poisson sampling at rate `q`, discretized on the grid `h`·ℤ.
    pub fn subsampled_gaussian(z: f64, q: f64, h: f64) -> Result<PrivacyLoss, AccountantError> {
        check(q, z)?;
        if !(h.is_finite() && h > 0.0) {
            return Err(AccountantError::Discretization(h));
        }
        if q == 0.0 {
            return Ok(PrivacyLoss::identity(h));
        }
        if z == 0.0 {
            // No noise: the user's presence is certain to show (all mass at +∞).
            let certain = Pmf {
                offset: 0,
                probs: vec![0.0],
                infinity: 1.0,
            };
            return Ok(PrivacyLoss {
                h,
                remove: certain,
                add: None,
            });
        }
        if z < MIN_NOISE_MULTIPLIER {
            return Err(AccountantError::PldNoise(z));
        }
        // The unsampled loss at the e^{-50} tails, ±(y/z + 1/(2z²)).
        let max_loss = tail_point() / z + 0.5 / (z * z);
        let (top, bottom) = (sampled_loss(q, max_loss), sampled_loss(q, -max_loss));
        let grid = |lo: f64, hi: f64| ((lo / h).floor(), (hi / h).ceil());
        let (lo, hi) = grid(bottom, top);
        if hi - lo + 1.0 > MAX_GRID_POINTS as f64 {
            return Err(too_large(hi - lo + 1.0));
        }
        let remove = || Pmf::connect_dots(h, lo as i64, hi as i64, |e| delta_remove(z, q, e));
        if q == 1.0 {
            return Ok(PrivacyLoss {
                h,
                remove: remove()?,
                add: None,
            });
        }
        let (add_lo, add_hi) = grid(-top, -bottom);
        let add = || Pmf::connect_dots(h, add_lo as i64, add_hi as i64, |e| delta_add(z, q, e));
        let (remove, add) = both(remove, add);
        Ok(PrivacyLoss {
            h,
            remove: remove?,
            add: Some(add?),
        })
    }

    /// The grid step of the losses.
    pub fn discretization(&self) -> f64 {
        self.h
    }

    /// `times` independent runs of this mechanism (0 gives the identity).
    pub fn self_compose(&self, times: u64) -> Result<PrivacyLoss, AccountantError> {
        if times == 0 {
            return Ok(PrivacyLoss::identity(self.h));
        }
        let remove = || self.remove.self_compose(times, &mut Fft::new());
        let Some(add) = &self.add else {
            return Ok(PrivacyLoss {
                h: self.h,
                remove: remove()?,
                add: None,
            });
        };
        let (remove, add) = both(remove, || add.self_compose(times, &mut Fft::new()));
        Ok(PrivacyLoss {
            h: self.h,
            remove: remove?,
            add: Some(add?),
        })
    }

    /// This mechanism followed by `other` (on the same grid).
    pub fn compose(&self, other: &PrivacyLoss) -> Result<PrivacyLoss, AccountantError> {
        if self.h != other.h {
            return Err(AccountantError::Discretization(other.h));
        }
        let mut fft = Fft::new();
        let remove = self.remove.compose(&other.remove, &mut fft)?;
        let add = match (&self.add, &other.add) {
            (None, None) => None,
            (a, b) => {
                let a = a.as_ref().unwrap_or(&self.remove);
                let b = b.as_ref().unwrap_or(&other.remove);
                Some(a.compose(b, &mut fft)?)
            }
        };
        Ok(PrivacyLoss {
            h: self.h,
            remove,
            add,
        })
    }

    /// δ at `eps`: the larger hockey-stick divergence of the two directions.
    pub fn delta(&self, eps: f64) -> f64 {
        let remove = self.remove.delta(self.h, eps);
        match &self.add {
            Some(add) => remove.max(add.delta(self.h, eps)),
            None => remove,
        }
    }

    /// The smallest ε ≥ 0 whose δ is at most `delta` (+∞ where none is).
    pub fn epsilon(&self, delta: f64) -> Result<f64, AccountantError> {
        if !(delta > 0.0 && delta < 1.0) {
            return Err(AccountantError::Delta(delta));
        }
        let remove = self.remove.epsilon(self.h, delta);
        Ok(match &self.add {
            Some(add) => remove.max(add.epsilon(self.h, delta)),
            None => remove,
        })
    }
}

/// ε after `rounds` rounds with noise multiplier `z` and Poisson sampling rate `q`, on the
/// grid `h`.
pub fn epsilon_with(
    z: f64,
    q: f64,
    rounds: u64,
    delta: f64,
    h: f64,
) -> Result<f64, AccountantError> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(AccountantError::Delta(delta));
    }
    PrivacyLoss::subsampled_gaussian(z, q, h)?
        .self_compose(rounds)?
        .epsilon(delta)
}

/// ε after `rounds` rounds with noise multiplier `z` and Poisson sampling rate `q` (grid 1e-4).
pub fn epsilon(z: f64, q: f64, rounds: u64, delta: f64) -> Result<f64, AccountantError> {
    epsilon_with(z, q, rounds, delta, DEFAULT_DISCRETIZATION)
}

/// The smallest noise multiplier (to 1e-4, rounded up; at least [`MIN_NOISE_MULTIPLIER`])
/// whose ε after `rounds` rounds stays within `target`. The search starts from the RDP
/// accountant's answer, which the PLD bound is rarely above.
pub fn noise_multiplier_for(
    target: f64,
    q: f64,
    rounds: u64,
    delta: f64,
) -> Result<f64, AccountantError> {
    if !(target.is_finite() && target > 0.0) {
        return Err(AccountantError::TargetEpsilon(target));
    }
    check(q, 1.0)?;
    if !(delta > 0.0 && delta < 1.0) {
        return Err(AccountantError::Delta(delta));
    }
    const MAX_Z: f64 = 1e4;
    let fits =
        |z: f64| -> Result<bool, AccountantError> { Ok(epsilon(z, q, rounds, delta)? <= target) };
    let mut hi = match super::rdp::noise_multiplier_for(target, q, rounds, delta) {
        Err(AccountantError::Unreachable(_)) => MAX_Z,
        z => z?.max(MIN_NOISE_MULTIPLIER),
    };
    while !fits(hi)? {
        hi *= 2.0;
        if hi > MAX_Z {
            return Err(AccountantError::Unreachable(MAX_Z));
        }
    }
    let mut lo = hi;
    loop {
        if lo <= MIN_NOISE_MULTIPLIER {
            return Ok(MIN_NOISE_MULTIPLIER);
        }
        lo = (lo / 2.0).max(MIN_NOISE_MULTIPLIER);
        if fits(lo)? {
            hi = lo;
        } else {
            break;
        }
    }
    super::bisect(lo, hi, fits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unsampled_curve_is_the_gaussian_one() {
        // δ_G at z = 1, ε = 1: Φ(−0.5) − e·Φ(−1.5) = 0.3085375387 − 2.718281828·0.0668072013.
        let want = 0.308_537_538_725_986_9 - std::f64::consts::E * 0.066_807_201_268_858_06;
        assert!((gaussian_delta(1.0, 1.0) - want).abs() < 1e-15);
        assert_eq!(delta_remove(1.0, 1.0, 1.0), delta_add(1.0, 1.0, 1.0));
        // Subsampling lemma: the remove curve is q·δ_G at the unsampled loss.
        let (q, e) = (0.1, 0.5);
        let l = (1.0 + f64::exp_m1(e) / q).ln();
        assert!((delta_remove(2.0, q, e) - q * gaussian_delta(2.0, l)).abs() < 1e-16);
        let below = (-q).ln_1p() - 1e-3;
        assert_eq!(delta_remove(2.0, q, below), -below.exp_m1());
        assert_eq!(delta_add(2.0, q, 0.2), 0.0); // −ln(0.9) = 0.105
                                                 // The two maps invert each other.
        for l in [-3.0, -0.1, 0.0, 0.7, 5.0, 40.0] {
            assert!(
                (unsampled_loss(0.01, sampled_loss(0.01, l)) - l).abs() < 1e-9 * (1.0 + l.abs())
            );
        }
    }

    /// The curves against direct numerical integration of ∫(p − e^ε q)_+.
    #[test]
    fn both_directions_match_numerical_integration() {
        let (z, q): (f64, f64) = (0.8, 0.2);
        let pdf = |x: f64, m: f64| {
            (-(x - m) * (x - m) / (2.0 * z * z)).exp() / (z * (2.0 * std::f64::consts::PI).sqrt())
        };
        let integrate = |f: &dyn Fn(f64) -> f64| {
            let (a, b, n) = (-12.0, 13.0, 200_000);
            let dx = (b - a) / n as f64;
            (0..n).map(|i| f(a + (i as f64 + 0.5) * dx)).sum::<f64>() * dx
        };
        for eps in [-0.5f64, 0.0, 0.1, 0.5, 1.5] {
            let p = |x: f64| (1.0 - q) * pdf(x, 0.0) + q * pdf(x, 1.0);
            let remove = integrate(&|x| (p(x) - eps.exp() * pdf(x, 0.0)).max(0.0));
            let add = integrate(&|x| (pdf(x, 0.0) - eps.exp() * p(x)).max(0.0));
            assert!(
                (delta_remove(z, q, eps) - remove).abs() < 1e-9,
                "remove at {eps}"
            );
            assert!((delta_add(z, q, eps) - add).abs() < 1e-9, "add at {eps}");
        }
    }

    #[test]
    fn the_discrete_curve_is_above_the_exact_one() {
        let (z, q, h) = (1.0, 0.05, 1e-3);
        let pld = PrivacyLoss::subsampled_gaussian(z, q, h).unwrap();
        let add = pld.add.as_ref().unwrap();
        for k in 0..200 {
            let eps = -1.0 + k as f64 * 0.0137;
            let (r, a) = (pld.remove.delta(h, eps), add.delta(h, eps));
            // Above, up to the rounding of summing a few thousand masses.
            assert!(r >= delta_remove(z, q, eps) - 1e-13, "remove at {eps}");
            assert!(a >= delta_add(z, q, eps) - 1e-13, "add at {eps}");
            // ... and close to it on this grid.
            assert!(r - delta_remove(z, q, eps) < 1e-5, "remove at {eps}");
        }
        // Total mass one (up to the clipped rounding).
        let mass = pld.remove.probs.iter().sum::<f64>() + pld.remove.infinity;
        assert!((mass - 1.0).abs() < 1e-9, "{mass}");
    }

    #[test]
    fn epsilon_inverts_delta() {
        let pld = PrivacyLoss::subsampled_gaussian(1.0, 0.1, 1e-4)
            .unwrap()
            .self_compose(20)
            .unwrap();
        for delta in [1e-10, 1e-7, 1e-5, 1e-2] {
            let eps = pld.epsilon(delta).unwrap();
            let back = pld.delta(eps);
            assert!(
                (back - delta).abs() < 1e-9 * delta,
                "{delta}: ε {eps}, δ(ε) {back}"
            );
            assert!(pld.delta(eps * 0.999) > delta);
        }
        assert_eq!(pld.epsilon(0.9).unwrap(), 0.0);
        assert!(pld.epsilon(0.0).is_err());
    }

    #[test]
    fn self_composition_is_repeated_composition() {
        let one = PrivacyLoss::subsampled_gaussian(1.5, 0.2, 1e-3).unwrap();
        let by_power = one.self_compose(4).unwrap();
        let two = one.compose(&one).unwrap();
        let by_steps = two.compose(&two).unwrap();
        for delta in [1e-8, 1e-5] {
            let (a, b) = (
                by_power.epsilon(delta).unwrap(),
                by_steps.epsilon(delta).unwrap(),
            );
            assert!((a - b).abs() < 1e-9 * a, "{a} vs {b}");
        }
        assert_eq!(one.self_compose(1).unwrap(), one);
        assert_eq!(one.self_compose(0).unwrap().epsilon(1e-5).unwrap(), 0.0);
    }

    /// At q = 1 the composition of T rounds at z is one round at z/√T, exactly: the
    /// discretized composition may only be above the exact curve, and only a little.
    #[test]
    fn unsampled_composition_matches_the_closed_form() {
        for (z, t) in [(1.0, 1u64), (2.0, 10), (5.0, 100)] {
            let pld = PrivacyLoss::subsampled_gaussian(z, 1.0, 1e-4)
                .unwrap()
                .self_compose(t)
                .unwrap();
            let zt = z / (t as f64).sqrt();
            for eps in [0.5, 1.0, 2.0] {
                let exact = gaussian_delta(zt, eps);
                let ours = pld.delta(eps);
                assert!(
                    ours >= exact * (1.0 - 1e-9) && ours <= exact * 1.01 + 1e-15,
                    "z={z} T={t} ε={eps}: {ours} vs {exact}"
                );
            }
        }
    }

    #[test]
    fn no_noise_no_sampling_and_bad_input() {
        assert_eq!(epsilon(1.0, 0.0, 10, 1e-5).unwrap(), 0.0);
        assert_eq!(epsilon(0.0, 0.1, 10, 1e-5).unwrap(), f64::INFINITY);
        assert!(matches!(
            epsilon(0.1, 0.1, 1, 1e-5),
            Err(AccountantError::PldNoise(_))
        ));
        assert!(epsilon(1.0, 1.5, 10, 1e-5).is_err());
        assert!(epsilon(1.0, 0.1, 10, 0.0).is_err());
        assert!(epsilon_with(1.0, 0.1, 10, 1e-5, 0.0).is_err());
        assert!(matches!(
            epsilon(0.5, 0.5, u64::MAX / 2, 1e-5),
            Err(AccountantError::TooLarge(_))
        ));
        assert_eq!(fast_len(1), 2);
        assert_eq!(fast_len(11), 12);
        assert_eq!(fast_len(1025), 1050);
        assert_eq!(power(Complex::new(0.0, 1.0), 6), Complex::new(-1.0, 0.0));
        // Four-lane Horner: 1 + 2r + 3r² + … and its mirror, for lengths around the lanes.
        for n in 1..=9usize {
            let p: Vec<f64> = (1..=n).map(|i| i as f64).collect();
            let r: f64 = 0.7;
            let fwd: f64 = (0..n).map(|i| p[i] * r.powi((n - 1 - i) as i32)).sum();
            let rev: f64 = (0..n).map(|i| p[i] * r.powi(i as i32)).sum();
            assert!((horner(&p, r, false) - fwd).abs() < 1e-12 * fwd, "{n}");
            assert!((horner(&p, r, true) - rev).abs() < 1e-12 * rev, "{n}");
        }
    }

    #[test]
    fn the_noise_solver_inverts_epsilon() {
        let (q, t, d) = (0.01, 100, 1e-5);
        let z = noise_multiplier_for(1.0, q, t, d).unwrap();
        assert!(epsilon(z, q, t, d).unwrap() <= 1.0);
        assert!(epsilon(z - 2e-4, q, t, d).unwrap() > 1.0);
        assert!(noise_multiplier_for(0.0, q, t, d).is_err());
        // No noise reaches a target that even 10^4 misses (RDP gives up first).
        assert!(matches!(
            noise_multiplier_for(1e-9, 0.5, 1000, d),
            Err(AccountantError::Unreachable(_))
        ));
        // Zero rounds cost nothing: the smallest noise this accountant evaluates.
        assert_eq!(
            noise_multiplier_for(1.0, q, 0, d).unwrap(),
            MIN_NOISE_MULTIPLIER
        );
    }
}
