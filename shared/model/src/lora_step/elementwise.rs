//! The elementwise kernels: a vectorizable `exp`, reductions in eight lanes, RMSNorm forward
//! and backward, the rotary rotation, the causal softmax of a row. All `#[inline(always)]`,
//! so they are compiled for AVX2 inside the step (`with_avx2`).

/// `eˣ` to about 2 ulp, in a form the compiler vectorizes (`f32::exp` is a libm call per
/// element). Inputs below −87 give 0 (as `f32::exp` underflows), above 88 saturate.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest by the float-magic trick, which vectorizes (`round` does not).
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let k = x * LOG2E + MAGIC;
    let n = k - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    // Cephes' minimax polynomial for eʳ on [−ln2/2, ln2/2].
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    // 2ⁿ from n's bits in `k`'s mantissa: integer arithmetic only, since a float-to-int
    // cast (saturating, NaN to 0) would stop the loop from vectorizing.
    let biased = k.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127);
    e * f32::from_bits(biased << 23)
}

#[inline(always)]
pub(super) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Reductions over eight independent lanes: a plain `sum()` or `fold` is one sequential chain
/// the compiler must not reorder, so it would not vectorize.
const LANES: usize = 8;

#[inline(always)]
fn reduce(a: &[f32], init: f32, f: impl Fn(f32, f32) -> f32 + Copy) -> f32 {
    let mut acc = [init; LANES];
    let chunks = a.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (x, &v) in acc.iter_mut().zip(c) {
            *x = f(*x, v);
        }
    }
    let r = acc.into_iter().fold(init, f);
    tail.iter().fold(r, |x, &v| f(x, v))
}

#[inline(always)]
pub(super) fn sum(a: &[f32]) -> f32 {
    reduce(a, 0.0, |x, v| x + v)
}

/// The largest value (NaN-free input assumed: a NaN would already have poisoned the loss).
#[inline(always)]
pub(super) fn max(a: &[f32]) -> f32 {
    reduce(a, f32::NEG_INFINITY, |x, v| if v > x { v } else { x })
}

#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, &p), &q) in acc.iter_mut().zip(x).zip(y) {
            *s += p * q;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y = x · inv · w` row by row, with `inv = 1/√(mean(x²) + eps)` saved for the backward pass.
#[inline(always)]
pub(super) fn rms_forward(x: &[f32], w: &[f32], eps: f32, inv: &mut [f32], y: &mut [f32]) {
    let h = w.len();
    for ((xr, yr), iv) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)).zip(inv) {
        let ss = dot(xr, xr);
        *iv = 1.0 / (ss / h as f32 + eps).sqrt();
        for ((o, &a), &g) in yr.iter_mut().zip(xr).zip(w) {
            *o = a * *iv * g;
        }
    }
}

/// `dx (+)= ∂(x · inv · w)/∂x · dy`: `dxᵢ = inv·gᵢ − inv³·xᵢ·(g·x)/h` with `g = w ∘ dy`.
#[inline(always)]
pub(super) fn rms_backward(
    x: &[f32],
    w: &[f32],
    inv: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    acc: bool,
) {
    let h = w.len();
    for (((xr, dyr), dxr), &iv) in x
        .chunks_exact(h)
        .zip(dy.chunks_exact(h))
        .zip(dx.chunks_exact_mut(h))
        .zip(inv)
    {
        let c = iv * iv * iv * weighted_dot(xr, dyr, w) / h as f32;
        if acc {
            for (((o, &a), &d), &g) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
                *o += iv * g * d - c * a;
            }
        } else {
            for (((o, &a), &d), &g) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
                *o = iv * g * d - c * a;
            }
        }
    }
}

/// `Σ xᵢ·dyᵢ·wᵢ`, in lanes as [`dot`].
#[inline(always)]
fn weighted_dot(x: &[f32], dy: &[f32], w: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let n = x.len() / LANES * LANES;
    for ((a, b), c) in x[..n]
        .chunks_exact(LANES)
        .zip(dy[..n].chunks_exact(LANES))
        .zip(w[..n].chunks_exact(LANES))
    {
        for (((s, &p), &q), &r) in acc.iter_mut().zip(a).zip(b).zip(c) {
            *s += p * q * r;
        }
    }
    let tail: f32 = (n..x.len()).map(|i| x[i] * dy[i] * w[i]).sum();
    acc.iter().sum::<f32>() + tail
}

/// Rotates a head vector in place at one position (HF `rotate_half` layout); `sign` −1 applies
/// the transposed rotation (the backward pass).
#[inline(always)]
pub(super) fn rotate_in_place(x: &mut [f32], cos: &[f32], sin: &[f32], sign: f32) {
    let half = x.len() / 2;
    let (lo, hi) = x.split_at_mut(half);
    // Equal lengths up front, so the loop has no bounds checks and vectorizes.
    let (hi, cos, sin) = (&mut hi[..half], &cos[..half], &sin[..half]);
    for i in 0..half {
        let (a, b) = (lo[i], hi[i]);
        lo[i] = a * cos[i] - sign * b * sin[i];
        hi[i] = b * cos[i] + sign * a * sin[i];
    }
}

/// Causal softmax of one row of raw scores in place: the first `visible` entries, scaled;
/// the rest set to zero.
#[inline(always)]
pub(super) fn softmax_row(row: &mut [f32], visible: usize, scale: f32) {
    let (seen, rest) = row.split_at_mut(visible);
    let m = max(seen);
    seen.iter_mut().for_each(|v| *v = exp((*v - m) * scale));
    let inv = 1.0 / sum(seen);
    seen.iter_mut().for_each(|v| *v *= inv);
    rest.fill(0.0);
}

/// `Σ exp(vᵢ − m)`, in lanes.
#[inline(always)]
pub(super) fn sum_exp(row: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| exp(v - m)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += exp(v - m);
        }
    }
    acc.iter().sum::<f32>() + tail
}
