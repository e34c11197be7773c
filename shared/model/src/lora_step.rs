//! The LoRA training step with its forward and backward passes written out over reused
//! buffers: the loss (likelihood or unlikelihood) and the adapter's gradients for one batch,
//! the same numbers as `Llama::forward` + the token cross-entropy + candle's `backward`
//! (`tests` checks that), in about 60% of its time; and [`score`], the same forward pass
//! for evaluation.
//!
//! Where candle's autograd spends the time this path does not:
//! - autograd allocates, zero-fills and adds one gradient buffer per graph node; here every
//!   activation and gradient lives in a per-worker [`Workspace`] reused from step to step;
//! - q, k and v (and gate and up) are one matrix product each, over weights concatenated once
//!   per model ([`FlatWeights`]); heads and transposes are strides, never copies;
//! - residual additions and gradient accumulation happen inside the matrix products (the
//!   product is added to its destination);
//! - causal attention computes only the blocks on or below the diagonal;
//! - frozen weights get no gradient, and the first layer no input gradient;
//! - the elementwise loops (RMSNorm, rotary, softmax, SwiGLU, cross-entropy, with a
//!   vectorizable `exp`) are compiled for AVX2 where the CPU has it.
//!
//! It runs on one thread: [`crate::train::Trainer::lora_step`] gives each core its own part of
//! the batch and workspace.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::lora::{LoraAdapter, Target};
use crate::model::{Llama, ModelError};
use crate::train::Batch;

type Result<T> = std::result::Result<T, ModelError>;

/// Rows of a block of the causal attention products: a block of query rows `r0..r1` only
/// needs keys `0..r1`.
const CAUSAL_BLOCK: usize = 32;

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn invalid(msg: String) -> ModelError {
    ModelError::Candle(candle_core::Error::Msg(msg))
}

// ---------------------------------------------------------------------------------------
// Frozen weights.

/// A model's frozen weights as row-major f32, projections fused where one product serves
/// several: q, k, v as one `[q + 2·kv, hidden]` matrix, gate and up as one `[2·inter, hidden]`.
/// Built once per model and shared by every training step on it.
pub(crate) struct FlatWeights {
    embed: Vec<f32>,
    /// `None` when tied to the embedding.
    lm_head: Option<Vec<f32>>,
    norm: Vec<f32>,
    layers: Vec<FlatLayer>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

struct FlatLayer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    qkv: Vec<f32>,
    o: Vec<f32>,
    gate_up: Vec<f32>,
    down: Vec<f32>,
}

impl std::fmt::Debug for FlatWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FlatWeights({} layers)", self.layers.len())
    }
}

impl FlatWeights {
    fn lm_head(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed)
    }

    pub(crate) fn new(model: &Llama) -> Result<Self> {
        let parts = model.parts();
        let mut layers = Vec::with_capacity(parts.blocks.len());
        for b in parts.blocks {
            let cat = |ts: &[Target]| -> Result<Vec<f32>> {
                let mut v = Vec::new();
                for &t in ts {
                    v.extend(flat(&b.proj[t as usize])?);
                }
                Ok(v)
            };
            layers.push(FlatLayer {
                input_norm: flat(&b.input_norm)?,
                post_norm: flat(&b.post_attention_norm)?,
                qkv: cat(&[Target::Q, Target::K, Target::V])?,
                o: cat(&[Target::O])?,
                gate_up: cat(&[Target::Gate, Target::Up])?,
                down: cat(&[Target::Down])?,
            });
        }
        let tied = parts.lm_head.id() == parts.embed.id();
        Ok(FlatWeights {
            embed: flat(parts.embed)?,
            lm_head: if tied {
                None
            } else {
                Some(flat(parts.lm_head)?)
            },
            norm: flat(parts.norm)?,
            layers,
            cos: parts.rope.cos.to_vec(),
            sin: parts.rope.sin.to_vec(),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Matrix products.

/// The one unsafe call of the crate: `gemm` takes raw pointers and strides.
///
/// `dst (+)= scale · lhs · rhs` for an `m×k` by `k×n` product, each matrix given by its data
/// and (row stride, column stride); `acc` adds to `dst` instead of overwriting it.
#[allow(clippy::too_many_arguments, unsafe_code)]
fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    acc: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    let end = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        end(m, n, dst_rs, 1) < dst.len(),
        "gemm: destination too short"
    );
    if k == 0 {
        if !acc {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    assert!(end(m, k, lhs_rs, lhs_cs) < lhs.len(), "gemm: lhs too short");
    assert!(end(k, n, rhs_rs, rhs_cs) < rhs.len(), "gemm: rhs too short");
    // SAFETY: every element the product reads or writes is inside the slices (checked above),
    // and `dst` is borrowed mutably, so it cannot alias `lhs` or `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            acc,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `dst[m×n] (+)= s · a[m×k] · b[n×k]ᵀ` (row-major with leading dimensions).
#[allow(clippy::too_many_arguments)]
fn a_bt(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    ldd: usize,
    acc: bool,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    s: f32,
) {
    gemm(mnk, dst, ldd, acc, a, (lda, 1), b, (1, ldb), s);
}

/// `dst[m×n] (+)= s · a[m×k] · b[k×n]`.
#[allow(clippy::too_many_arguments)]
fn a_b(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    ldd: usize,
    acc: bool,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    s: f32,
) {
    gemm(mnk, dst, ldd, acc, a, (lda, 1), b, (ldb, 1), s);
}

/// `dst[m×n] (+)= s · a[k×m]ᵀ · b[k×n]`.
#[allow(clippy::too_many_arguments)]
fn at_b(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    ldd: usize,
    acc: bool,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    s: f32,
) {
    gemm(mnk, dst, ldd, acc, a, (1, lda), b, (ldb, 1), s);
}

// ---------------------------------------------------------------------------------------
// Elementwise kernels.

/// `eˣ` to about 2 ulp, in a form the compiler vectorizes (`f32::exp` is a libm call per
/// element). Inputs below −87 give 0 (as `f32::exp` underflows), above 88 saturate.
#[inline(always)]
fn exp(x: f32) -> f32 {
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
fn sigmoid(x: f32) -> f32 {
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
fn sum(a: &[f32]) -> f32 {
    reduce(a, 0.0, |x, v| x + v)
}

/// The largest value (NaN-free input assumed: a NaN would already have poisoned the loss).
#[inline(always)]
fn max(a: &[f32]) -> f32 {
    reduce(a, f32::NEG_INFINITY, |x, v| if v > x { v } else { x })
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
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
fn rms_forward(x: &[f32], w: &[f32], eps: f32, inv: &mut [f32], y: &mut [f32]) {
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
fn rms_backward(x: &[f32], w: &[f32], inv: &[f32], dy: &[f32], dx: &mut [f32], acc: bool) {
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
fn rotate_in_place(x: &mut [f32], cos: &[f32], sin: &[f32], sign: f32) {
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
fn softmax_row(row: &mut [f32], visible: usize, scale: f32) {
    let (seen, rest) = row.split_at_mut(visible);
    let m = max(seen);
    seen.iter_mut().for_each(|v| *v = exp((*v - m) * scale));
    let inv = 1.0 / sum(seen);
    seen.iter_mut().for_each(|v| *v *= inv);
    rest.fill(0.0);
}

// ---------------------------------------------------------------------------------------
// The adapter, as plain numbers for one step.

struct LoraPairData {
    a: Vec<f32>,
    b: Vec<f32>,
}

struct LoraData {
    scale: f32,
    rank: usize,
    train_a: bool,
    /// `[layer][target]`.
    pairs: Vec<[Option<LoraPairData>; Target::COUNT]>,
    /// Adapted targets in the adapter config's order (the order of its trainable vars).
    targets: Vec<Target>,
}

impl LoraData {
    fn new(adapter: &LoraAdapter, layers: usize) -> Result<Self> {
        let cfg = adapter.config();
        let mut pairs = Vec::with_capacity(layers);
        for l in 0..layers {
            let mut slot: [Option<LoraPairData>; Target::COUNT] = Default::default();
            for t in Target::ALL {
                if let Some(p) = adapter.pair(l, t) {
                    slot[t as usize] = Some(LoraPairData {
                        a: flat(&p.a)?,
                        b: flat(&p.b)?,
                    });
                }
            }
            pairs.push(slot);
        }
        Ok(LoraData {
            scale: adapter.scale() as f32,
            rank: cfg.rank,
            train_a: !cfg.freeze_a,
            pairs,
            targets: cfg.targets.clone(),
        })
    }

    /// No adapter: the base model.
    fn none(layers: usize) -> Self {
        LoraData {
            scale: 0.0,
            rank: 0,
            train_a: false,
            pairs: (0..layers).map(|_| Default::default()).collect(),
            targets: Vec::new(),
        }
    }

    fn pair(&self, l: usize, t: Target) -> Option<&LoraPairData> {
        self.pairs[l][t as usize].as_ref()
    }
}

// ---------------------------------------------------------------------------------------
// Shapes.

#[derive(Debug, Clone, Copy, PartialEq)]
struct Dims {
    /// Sequences, positions, rows (`b·t`).
    b: usize,
    t: usize,
    n: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Widths of q, of k (= of v), and of the fused q|k|v row.
    q: usize,
    kv: usize,
    qkv: usize,
    inter: usize,
    vocab: usize,
    rank: usize,
    eps: f32,
}

impl Dims {
    /// Column offset and width of a projection's output in its fused row.
    fn slot(&self, t: Target) -> (usize, usize) {
        match t {
            Target::Q => (0, self.q),
            Target::K => (self.q, self.kv),
            Target::V => (self.q + self.kv, self.kv),
            Target::Gate => (0, self.inter),
            Target::Up => (self.inter, self.inter),
            Target::O | Target::Down => (0, self.hidden),
        }
    }

    /// Width of a projection's input.
    fn input(&self, t: Target) -> usize {
        match t {
            Target::O => self.q,
            Target::Down => self.inter,
            _ => self.hidden,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Buffers.

/// Saved activations of one decoder layer.
#[derive(Debug, Default)]
struct LayerBuffers {
    /// RMSNorm inverse scales and outputs before attention and before the MLP.
    inv1: Vec<f32>,
    h1: Vec<f32>,
    inv2: Vec<f32>,
    h2: Vec<f32>,
    /// q|k|v after rotary embeddings, `[n, q + 2·kv]`.
    qkv: Vec<f32>,
    /// Attention probabilities `[b, heads, t, t]` (one head's when scoring).
    probs: Vec<f32>,
    /// Attention output (the o projection's input), `[n, q]`.
    att: Vec<f32>,
    /// The residual stream after attention.
    mid: Vec<f32>,
    /// gate|up, `[n, 2·inter]`, and SiLU(gate)·up, `[n, inter]`.
    gate_up: Vec<f32>,
    act: Vec<f32>,
    /// `x·Aᵀ` of each adapted projection, `[n, rank]`.
    xa: [Vec<f32>; Target::COUNT],
}

/// One worker's buffers, reused from step to step (they grow to the largest batch seen).
#[derive(Debug, Default)]
pub struct Workspace {
    /// What the buffers are sized for: shapes, layers, and whether for training.
    key: Option<(Dims, usize, bool)>,
    layers: Vec<LayerBuffers>,
    /// The residual stream entering each layer, and leaving the last.
    stream: Vec<Vec<f32>>,
    inv_final: Vec<f32>,
    h_final: Vec<f32>,
    /// Logits, then their gradient.
    logits: Vec<f32>,
    /// Gradients: of the residual stream, of a normalized input, of q|k|v, of the attention
    /// output, of gate|up and of SiLU(gate)·up; one head's score gradients; `x·Aᵀ`'s.
    dx: Vec<f32>,
    dh: Vec<f32>,
    dqkv: Vec<f32>,
    datt: Vec<f32>,
    dgate_up: Vec<f32>,
    dact: Vec<f32>,
    dscores: Vec<f32>,
    dxa: Vec<f32>,
    tokens: Vec<u32>,
    targets: Vec<u32>,
    weights: Vec<f32>,
}

fn size(v: &mut Vec<f32>, n: usize) {
    if v.len() != n {
        v.resize(n, 0.0);
    }
}

impl Workspace {
    fn prepare(&mut self, d: Dims, layers: usize, training: bool) {
        let key = (d, layers, training);
        if self.key == Some(key) {
            return;
        }
        let n = d.n;
        let (slots, streams) = if training {
            (layers, layers + 1)
        } else {
            (1, 2)
        };
        self.layers.resize_with(slots, Default::default);
        for lb in &mut self.layers {
            size(&mut lb.inv1, n);
            size(&mut lb.h1, n * d.hidden);
            size(&mut lb.inv2, n);
            size(&mut lb.h2, n * d.hidden);
            size(&mut lb.qkv, n * d.qkv);
            // Scoring needs one head's probabilities at a time.
            let heads = if training { d.b * d.heads } else { 1 };
            size(&mut lb.probs, heads * d.t * d.t);
            size(&mut lb.att, n * d.q);
            size(&mut lb.mid, n * d.hidden);
            size(&mut lb.gate_up, n * 2 * d.inter);
            size(&mut lb.act, n * d.inter);
            for xa in &mut lb.xa {
                size(xa, n * d.rank);
            }
        }
        self.stream.resize_with(streams, Vec::new);
        for s in &mut self.stream {
            size(s, n * d.hidden);
        }
        size(&mut self.inv_final, n);
        size(&mut self.h_final, n * d.hidden);
        size(&mut self.logits, n * d.vocab);
        self.key = Some(key);
        if !training {
            return;
        }
        size(&mut self.dx, n * d.hidden);
        size(&mut self.dh, n * d.hidden);
        size(&mut self.dqkv, n * d.qkv);
        size(&mut self.datt, n * d.q);
        size(&mut self.dgate_up, n * 2 * d.inter);
        size(&mut self.dact, n * d.inter);
        size(&mut self.dscores, d.t * d.t);
        size(&mut self.dxa, n * d.rank);
    }
}

// ---------------------------------------------------------------------------------------
// LoRA pieces of a projection.

/// `y[:, off..off + out] += s · (x·Aᵀ)·Bᵀ`, saving `x·Aᵀ` in `xa`.
#[allow(clippy::too_many_arguments)]
fn lora_forward(
    p: &LoraPairData,
    s: f32,
    (n, din, dout, rank): (usize, usize, usize, usize),
    x: &[f32],
    xa: &mut [f32],
    y: &mut [f32],
    ldy: usize,
) {
    a_bt((n, rank, din), xa, rank, false, x, din, &p.a, din, 1.0);
    a_bt((n, dout, rank), y, ldy, true, xa, rank, &p.b, rank, s);
}

/// The gradients of A and B from the output gradient `dy` (`[n, out]` at stride `ldy`), and
/// with `dx` the input gradient's low-rank part added to it.
#[allow(clippy::too_many_arguments)]
fn lora_backward(
    p: &LoraPairData,
    s: f32,
    (n, din, dout, rank): (usize, usize, usize, usize),
    x: &[f32],
    xa: &[f32],
    dy: &[f32],
    ldy: usize,
    dxa: &mut [f32],
    grad_a: Option<&mut [f32]>,
    grad_b: &mut [f32],
    dx: Option<&mut [f32]>,
) {
    at_b((dout, rank, n), grad_b, rank, false, dy, ldy, xa, rank, s);
    a_b((n, rank, dout), dxa, rank, false, dy, ldy, &p.b, rank, s);
    if let Some(ga) = grad_a {
        at_b((rank, din, n), ga, din, false, dxa, rank, x, din, 1.0);
    }
    if let Some(dx) = dx {
        a_b((n, din, rank), dx, din, true, dxa, rank, &p.a, din, 1.0);
    }
}

// ---------------------------------------------------------------------------------------
// The step.

/// The gradients of an adapter's trainable tensors, in the order of
/// [`LoraAdapter::trainable_vars`].
#[derive(Debug)]
pub struct Gradients {
    pub loss: f64,
    pub grads: Vec<Vec<f32>>,
}

/// Index of each (layer, target, A|B) gradient in [`Gradients::grads`].
struct GradIndex {
    a: Vec<[Option<usize>; Target::COUNT]>,
    b: Vec<[Option<usize>; Target::COUNT]>,
    /// Gradients in all.
    count: usize,
}

impl GradIndex {
    fn new(lora: &LoraData, layers: usize) -> Self {
        let mut a = vec![[None; Target::COUNT]; layers];
        let mut b = vec![[None; Target::COUNT]; layers];
        let mut i = 0;
        for l in 0..layers {
            for &t in &lora.targets {
                if lora.train_a {
                    a[l][t as usize] = Some(i);
                    i += 1;
                }
                b[l][t as usize] = Some(i);
                i += 1;
            }
        }
        GradIndex { a, b, count: i }
    }
}

/// Splits the gradient list into the A and B gradients of one projection.
fn grad_pair<'g>(
    grads: &'g mut [Vec<f32>],
    idx: &GradIndex,
    l: usize,
    t: Target,
) -> (Option<&'g mut [f32]>, &'g mut [f32]) {
    let b = idx.b[l][t as usize].expect("every adapted projection has a B gradient");
    match idx.a[l][t as usize] {
        // A comes right before its B.
        Some(a) => {
            let (lo, hi) = grads.split_at_mut(b);
            (Some(&mut lo[a][..]), &mut hi[0][..])
        }
        None => (None, &mut grads[b][..]),
    }
}

/// What a batch's loss asks of the model at its target tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// `−log p(target)`: text the model should produce.
    Likelihood,
    /// `−log(1 − p(target))` (Welleck et al. 2020): text it should not produce, e.g. a
    /// suggestion the user rejected. As [`crate::train::unlikelihood_part`], `1 − p` is kept
    /// 1e-5 off zero.
    Unlikelihood,
}

/// A batch, its objective, and the factor on its weighted sum: the part's loss is
/// `scale · Σ weight · loss(token)`.
#[derive(Debug, Clone, Copy)]
pub struct Part<'a> {
    pub batch: &'a Batch,
    pub objective: Objective,
    pub scale: f64,
}

/// A part's loss and its gradients with respect to the adapter's trainable tensors: for a
/// [`Objective::Likelihood`] part with `scale = 1 / total_weight`, the same numbers as
/// [`crate::train::loss_part`] followed by `backward`.
pub fn loss_and_gradients(
    model: &Llama,
    adapter: &LoraAdapter,
    part: Part<'_>,
    ws: &mut Workspace,
) -> Result<Gradients> {
    let Part {
        batch,
        objective,
        scale,
    } = part;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(invalid(format!("loss scale {scale} is not positive")));
    }
    let (fw, lora, d) = setup(model, Some(adapter), batch, ws, true)?;
    let fw = &*fw;
    let idx = GradIndex::new(&lora, fw.layers.len());
    let vars = adapter.trainable_vars();
    if idx.count != vars.len() {
        return Err(ModelError::AdapterMismatch(format!(
            "the adapter has {} trainable tensors, its config {} (a frozen copy cannot train)",
            vars.len(),
            idx.count
        )));
    }
    let mut grads: Vec<Vec<f32>> = vars.iter().map(|v| vec![0f32; v.elem_count()]).collect();
    let loss = with_avx2(
        #[inline(always)]
        || {
            forward(fw, &lora, d, ws, true);
            let loss = token_loss(d, ws, (objective, scale));
            if loss.is_finite() {
                backward(fw, &lora, d, ws, &idx, &mut grads);
            }
            loss
        },
    );
    if !loss.is_finite() {
        return Err(invalid(format!("loss is {loss}; refusing to update")));
    }
    Ok(Gradients { loss, grads })
}

/// How the model scores one position: the target's NLL (nats) and whether it is the argmax.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenScore {
    pub nll: f32,
    pub correct: bool,
}

/// Scores every position of a batch (`[b·t]`, row-major) from the forward pass alone, on the
/// same kernels as training; one layer's buffers serve every layer. The same numbers as
/// `Llama::forward` and the token cross-entropy (tested).
pub fn score(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    batch: &Batch,
    ws: &mut Workspace,
) -> Result<Vec<TokenScore>> {
    let (fw, lora, d) = setup(model, adapter, batch, ws, false)?;
    let fw = &*fw;
    Ok(with_avx2(
        #[inline(always)]
        || {
            forward(fw, &lora, d, ws, false);
            score_rows(d, ws)
        },
    ))
}

/// Checks the batch against the model and adapter, and sizes the buffers: for the backward
/// pass (`training`: every layer's activations kept) or for scoring.
fn setup(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    batch: &Batch,
    ws: &mut Workspace,
    training: bool,
) -> Result<(Arc<FlatWeights>, LoraData, Dims)> {
    let cfg = model.config();
    let layers = cfg.num_hidden_layers;
    let lora = match adapter {
        Some(a) => {
            a.check_fits(cfg)?;
            LoraData::new(a, layers)?
        }
        None => LoraData::none(layers),
    };
    let fw = model.flat_weights()?;
    let (b, t) = batch.inputs.dims2()?;
    if b == 0 || t == 0 {
        return Err(invalid(format!("empty batch of shape [{b}, {t}]")));
    }
    for (what, dims) in [
        ("targets", batch.targets.dims()),
        ("weights", batch.weights.dims()),
    ] {
        if dims != [b, t] {
            return Err(invalid(format!(
                "batch {what} have shape {dims:?}, the inputs [{b}, {t}]"
            )));
        }
    }
    if t > cfg.max_position_embeddings {
        return Err(ModelError::TooLong {
            needed: t,
            max: cfg.max_position_embeddings,
        });
    }
    let d = Dims {
        b,
        t,
        n: b * t,
        hidden: cfg.hidden_size,
        heads: cfg.num_attention_heads,
        kv_heads: cfg.num_key_value_heads,
        head_dim: cfg.head_dim,
        q: cfg.num_attention_heads * cfg.head_dim,
        kv: cfg.num_key_value_heads * cfg.head_dim,
        qkv: (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim,
        inter: cfg.intermediate_size,
        vocab: cfg.vocab_size,
        rank: lora.rank,
        eps: cfg.rms_norm_eps as f32,
    };
    ws.tokens = batch.inputs.flatten_all()?.to_vec1::<u32>()?;
    ws.targets = batch.targets.flatten_all()?.to_vec1::<u32>()?;
    ws.weights = flat(&batch.weights)?;
    if let Some(&id) = ws
        .tokens
        .iter()
        .chain(&ws.targets)
        .find(|&&id| id as usize >= d.vocab)
    {
        return Err(ModelError::TokenOutOfRange { id, vocab: d.vocab });
    }
    ws.prepare(d, layers, training);
    Ok((fw, lora, d))
}

/// Runs `f` compiled for AVX2 where the CPU has it, so that the elementwise loops inlined
/// into it run eight lanes wide instead of SSE2's four (the matrix products choose their
/// kernels at run time either way).
#[inline(always)]
fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the CPU has AVX2 (checked just above).
        #[allow(unsafe_code)]
        return unsafe { avx2(f) };
    }
    f()
}

/// The stream buffer a layer reads and the one it writes.
fn stream_pair(v: &mut [Vec<f32>], read: usize, write: usize) -> (&[f32], &mut [f32]) {
    if read < write {
        let (a, b) = v.split_at_mut(write);
        (&a[read], &mut b[0])
    } else {
        let (a, b) = v.split_at_mut(read);
        (&b[0], &mut a[write])
    }
}

#[inline(always)]
/// The forward pass to the logits. `training` keeps every layer's activations for the
/// backward pass; otherwise one layer's buffers and two stream buffers serve every layer.
fn forward(fw: &FlatWeights, lora: &LoraData, d: Dims, ws: &mut Workspace, training: bool) {
    let (n, h) = (d.n, d.hidden);
    for (row, &tok) in ws.stream[0].chunks_exact_mut(h).zip(&ws.tokens) {
        let tok = tok as usize;
        row.copy_from_slice(&fw.embed[tok * h..(tok + 1) * h]);
    }
    let slot = |l: usize| {
        if training {
            (l, l, l + 1)
        } else {
            (0, l % 2, (l + 1) % 2)
        }
    };
    for (l, w) in fw.layers.iter().enumerate() {
        let (buffers, read, write) = slot(l);
        let lb = &mut ws.layers[buffers];
        let (x, next) = stream_pair(&mut ws.stream, read, write);
        let lora_dims = |t: Target| (n, d.input(t), d.slot(t).1, d.rank);

        // Attention.
        rms_forward(x, &w.input_norm, d.eps, &mut lb.inv1, &mut lb.h1);
        a_bt(
            (n, d.qkv, h),
            &mut lb.qkv,
            d.qkv,
            false,
            &lb.h1,
            h,
            &w.qkv,
            h,
            1.0,
        );
        for t in [Target::Q, Target::K, Target::V] {
            if let Some(p) = lora.pair(l, t) {
                let off = d.slot(t).0;
                let (xa, y) = (&mut lb.xa[t as usize], &mut lb.qkv[off..]);
                lora_forward(p, lora.scale, lora_dims(t), &lb.h1, xa, y, d.qkv);
            }
        }
        rope(&mut lb.qkv, fw, d, 1.0);
        attention_forward(d, &lb.qkv, &mut lb.probs, &mut lb.att);
        lb.mid.copy_from_slice(x);
        a_bt(
            (n, h, d.q),
            &mut lb.mid,
            h,
            true,
            &lb.att,
            d.q,
            &w.o,
            d.q,
            1.0,
        );
        if let Some(p) = lora.pair(l, Target::O) {
            let xa = &mut lb.xa[Target::O as usize];
            lora_forward(
                p,
                lora.scale,
                lora_dims(Target::O),
                &lb.att,
                xa,
                &mut lb.mid,
                h,
            );
        }

        // MLP.
        rms_forward(&lb.mid, &w.post_norm, d.eps, &mut lb.inv2, &mut lb.h2);
        let gu = 2 * d.inter;
        a_bt(
            (n, gu, h),
            &mut lb.gate_up,
            gu,
            false,
            &lb.h2,
            h,
            &w.gate_up,
            h,
            1.0,
        );
        for t in [Target::Gate, Target::Up] {
            if let Some(p) = lora.pair(l, t) {
                let off = d.slot(t).0;
                let (xa, y) = (&mut lb.xa[t as usize], &mut lb.gate_up[off..]);
                lora_forward(p, lora.scale, lora_dims(t), &lb.h2, xa, y, gu);
            }
        }
        for (row, out) in lb
            .gate_up
            .chunks_exact(gu)
            .zip(lb.act.chunks_exact_mut(d.inter))
        {
            let (g, u) = row.split_at(d.inter);
            for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                *o = g * sigmoid(g) * u;
            }
        }
        next.copy_from_slice(&lb.mid);
        a_bt(
            (n, h, d.inter),
            next,
            h,
            true,
            &lb.act,
            d.inter,
            &w.down,
            d.inter,
            1.0,
        );
        if let Some(p) = lora.pair(l, Target::Down) {
            let xa = &mut lb.xa[Target::Down as usize];
            lora_forward(p, lora.scale, lora_dims(Target::Down), &lb.act, xa, next, h);
        }
    }
    let last = &ws.stream[slot(fw.layers.len()).1];
    rms_forward(last, &fw.norm, d.eps, &mut ws.inv_final, &mut ws.h_final);
    a_bt(
        (n, d.vocab, h),
        &mut ws.logits,
        d.vocab,
        false,
        &ws.h_final,
        h,
        fw.lm_head(),
        h,
        1.0,
    );
}

/// Rotary embeddings on the q and k parts of every row (`sign` −1: the backward pass).
#[inline(always)]
fn rope(qkv: &mut [f32], fw: &FlatWeights, d: Dims, sign: f32) {
    let hd = d.head_dim;
    let half = hd / 2;
    for (r, row) in qkv.chunks_exact_mut(d.qkv).enumerate() {
        let p = (r % d.t) * hd;
        let (cos, sin) = (&fw.cos[p..p + half], &fw.sin[p..p + half]);
        for head in row[..d.q + d.kv].chunks_exact_mut(hd) {
            rotate_in_place(head, cos, sin, sign);
        }
    }
}

/// The row blocks `r0..r1` of causal products over `t` positions.
fn causal_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(CAUSAL_BLOCK)
        .map(move |r0| (r0, (r0 + CAUSAL_BLOCK).min(t)))
}

#[inline(always)]
fn attention_forward(d: Dims, qkv: &[f32], probs: &mut [f32], att: &mut [f32]) {
    let (t, hd, w) = (d.t, d.head_dim, d.qkv);
    let rep = d.heads / d.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    for bi in 0..d.b {
        let rows = bi * t * w;
        for hh in 0..d.heads {
            let kvh = hh / rep;
            let q = &qkv[rows + hh * hd..];
            let k = &qkv[rows + d.q + kvh * hd..];
            let v = &qkv[rows + d.q + d.kv + kvh * hd..];
            // One slot per head when training (kept for the backward pass), else one slot.
            let slots = probs.len() / (t * t);
            let p = &mut probs[(bi * d.heads + hh) % slots * t * t..][..t * t];
            for (r0, r1) in causal_blocks(t) {
                a_bt(
                    (r1 - r0, r1, hd),
                    &mut p[r0 * t..],
                    t,
                    false,
                    &q[r0 * w..],
                    w,
                    k,
                    w,
                    1.0,
                );
            }
            for (i, row) in p.chunks_exact_mut(t).enumerate() {
                softmax_row(row, i + 1, scale);
            }
            let o = &mut att[bi * t * d.q + hh * hd..];
            for (r0, r1) in causal_blocks(t) {
                a_b(
                    (r1 - r0, hd, r1),
                    &mut o[r0 * d.q..],
                    d.q,
                    false,
                    &p[r0 * t..],
                    t,
                    v,
                    w,
                    1.0,
                );
            }
        }
    }
}

/// The part's loss over its target tokens, leaving its gradient with respect to the logits
/// in `ws.logits`.
#[inline(always)]
fn token_loss(d: Dims, ws: &mut Workspace, (objective, scale): (Objective, f64)) -> f64 {
    let mut loss = 0f64;
    for ((row, &target), &w) in ws
        .logits
        .chunks_exact_mut(d.vocab)
        .zip(&ws.targets)
        .zip(&ws.weights)
    {
        if w == 0.0 {
            row.fill(0.0);
            continue;
        }
        let c = (f64::from(w) * scale) as f32;
        let m = max(row);
        let z_target = row[target as usize];
        row.iter_mut().for_each(|v| *v = exp(*v - m));
        let total = sum(row);
        let t = target as usize;
        match objective {
            Objective::Likelihood => {
                // ∂/∂z = c · (softmax − onehot).
                loss += f64::from(c) * (f64::from(total.ln()) + f64::from(m - z_target));
                let k = c / total;
                row.iter_mut().for_each(|v| *v *= k);
                row[t] -= c;
            }
            Objective::Unlikelihood => {
                // With q = 1 + 1e-5 − p: ∂(−log q)/∂z = −(c·p/q) · (softmax − onehot).
                let p = row[t] / total;
                let q = 1.0 + 1e-5 - p;
                loss -= f64::from(c) * f64::from(q.ln());
                let k = c * p / q;
                let f = -k / total;
                row.iter_mut().for_each(|v| *v *= f);
                row[t] += k;
            }
        }
    }
    loss
}

/// Each position's target NLL and whether the target is the argmax (the first maximum, as
/// candle's `argmax`).
#[inline(always)]
fn score_rows(d: Dims, ws: &Workspace) -> Vec<TokenScore> {
    ws.logits
        .chunks_exact(d.vocab)
        .zip(&ws.targets)
        .map(|(row, &target)| {
            let m = max(row);
            let first_max = row.iter().position(|&v| v == m).unwrap_or(0);
            let total: f32 = sum_exp(row, m);
            TokenScore {
                nll: total.ln() + m - row[target as usize],
                correct: first_max == target as usize,
            }
        })
        .collect()
}

/// `Σ exp(vᵢ − m)`, in lanes.
#[inline(always)]
fn sum_exp(row: &[f32], m: f32) -> f32 {
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

#[inline(always)]
fn backward(
    fw: &FlatWeights,
    lora: &LoraData,
    d: Dims,
    ws: &mut Workspace,
    idx: &GradIndex,
    grads: &mut [Vec<f32>],
) {
    let (n, h) = (d.n, d.hidden);
    let s = lora.scale;
    let layers = fw.layers.len();
    a_b(
        (n, h, d.vocab),
        &mut ws.dh,
        h,
        false,
        &ws.logits,
        d.vocab,
        fw.lm_head(),
        h,
        1.0,
    );
    rms_backward(
        &ws.stream[layers],
        &fw.norm,
        &ws.inv_final,
        &ws.dh,
        &mut ws.dx,
        false,
    );

    for l in (0..layers).rev() {
        let w = &fw.layers[l];
        let lb = &ws.layers[l];
        let lora_dims = |t: Target| (n, d.input(t), d.slot(t).1, d.rank);

        // MLP: dx is the gradient of the layer's output.
        let gu = 2 * d.inter;
        a_b(
            (n, d.inter, h),
            &mut ws.dact,
            d.inter,
            false,
            &ws.dx,
            h,
            &w.down,
            d.inter,
            1.0,
        );
        if let Some(p) = lora.pair(l, Target::Down) {
            let (ga, gb) = grad_pair(grads, idx, l, Target::Down);
            let xa = &lb.xa[Target::Down as usize];
            let dims = lora_dims(Target::Down);
            let dx = Some(&mut ws.dact[..]);
            lora_backward(p, s, dims, &lb.act, xa, &ws.dx, h, &mut ws.dxa, ga, gb, dx);
        }
        for ((row, dg), da) in lb
            .gate_up
            .chunks_exact(gu)
            .zip(ws.dgate_up.chunks_exact_mut(gu))
            .zip(ws.dact.chunks_exact(d.inter))
        {
            let (g, u) = row.split_at(d.inter);
            let (dg, du) = dg.split_at_mut(d.inter);
            // Equal-length slices and an index: the form the compiler vectorizes.
            let k = d.inter;
            let (g, u, da, du) = (&g[..k], &u[..k], &da[..k], &mut du[..k]);
            for i in 0..k {
                let sg = sigmoid(g[i]);
                du[i] = da[i] * g[i] * sg;
                dg[i] = da[i] * u[i] * sg * (1.0 + g[i] * (1.0 - sg));
            }
        }
        a_b(
            (n, h, gu),
            &mut ws.dh,
            h,
            false,
            &ws.dgate_up,
            gu,
            &w.gate_up,
            h,
            1.0,
        );
        for t in [Target::Gate, Target::Up] {
            if let Some(p) = lora.pair(l, t) {
                let (ga, gb) = grad_pair(grads, idx, l, t);
                let dy = &ws.dgate_up[d.slot(t).0..];
                let xa = &lb.xa[t as usize];
                let dx = Some(&mut ws.dh[..]);
                lora_backward(
                    p,
                    s,
                    lora_dims(t),
                    &lb.h2,
                    xa,
                    dy,
                    gu,
                    &mut ws.dxa,
                    ga,
                    gb,
                    dx,
                );
            }
        }
        rms_backward(&lb.mid, &w.post_norm, &lb.inv2, &ws.dh, &mut ws.dx, true);

        // Attention: dx is now the gradient of the stream after attention.
        a_b(
            (n, d.q, h),
            &mut ws.datt,
            d.q,
            false,
            &ws.dx,
            h,
            &w.o,
            d.q,
            1.0,
        );
        if let Some(p) = lora.pair(l, Target::O) {
            let (ga, gb) = grad_pair(grads, idx, l, Target::O);
            let xa = &lb.xa[Target::O as usize];
            let dx = Some(&mut ws.datt[..]);
            let dims = lora_dims(Target::O);
            lora_backward(p, s, dims, &lb.att, xa, &ws.dx, h, &mut ws.dxa, ga, gb, dx);
        }
        // Below the first layer nothing trains: only the adapted projections need their
        // output gradients there.
        let needs = |t: Target| l > 0 || lora.pair(l, t).is_some();
        attention_backward(
            d,
            lb,
            &ws.datt,
            &mut ws.dscores,
            &mut ws.dqkv,
            [needs(Target::Q), needs(Target::K), needs(Target::V)],
        );
        rope(&mut ws.dqkv, fw, d, -1.0);
        if l > 0 {
            a_b(
                (n, h, d.qkv),
                &mut ws.dh,
                h,
                false,
                &ws.dqkv,
                d.qkv,
                &w.qkv,
                h,
                1.0,
            );
        }
        for t in [Target::Q, Target::K, Target::V] {
            if let Some(p) = lora.pair(l, t) {
                let (ga, gb) = grad_pair(grads, idx, l, t);
                let dy = &ws.dqkv[d.slot(t).0..];
                let xa = &lb.xa[t as usize];
                let dx = (l > 0).then_some(&mut ws.dh[..]);
                let dims = lora_dims(t);
                lora_backward(p, s, dims, &lb.h1, xa, dy, d.qkv, &mut ws.dxa, ga, gb, dx);
            }
        }
        if l > 0 {
            let (x, inv) = (&ws.stream[l], &lb.inv1);
            rms_backward(x, &w.input_norm, inv, &ws.dh, &mut ws.dx, true);
        }
    }
}

/// The gradients of q, k and v (those `need`ed) from the attention output's gradient.
#[inline(always)]
fn attention_backward(
    d: Dims,
    lb: &LayerBuffers,
    datt: &[f32],
    ds: &mut [f32],
    dqkv: &mut [f32],
    [need_q, need_k, need_v]: [bool; 3],
) {
    let (t, hd, w) = (d.t, d.head_dim, d.qkv);
    let rep = d.heads / d.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    for bi in 0..d.b {
        let rows = bi * t * w;
        for hh in 0..d.heads {
            let kvh = hh / rep;
            // The first head of a group overwrites its k and v gradients; the others add.
            let acc = hh % rep != 0;
            let q = &lb.qkv[rows + hh * hd..];
            let k = &lb.qkv[rows + d.q + kvh * hd..];
            let v = &lb.qkv[rows + d.q + d.kv + kvh * hd..];
            let p = &lb.probs[(bi * d.heads + hh) * t * t..][..t * t];
            let dout = &datt[bi * t * d.q + hh * hd..];
            if need_v {
                // dV = Pᵀ·dO: key rows c0..c1 see query rows c0..t.
                let dv = &mut dqkv[rows + d.q + d.kv + kvh * hd..];
                for (c0, c1) in causal_blocks(t) {
                    let (dst, pa) = (&mut dv[c0 * w..], &p[c0 * t + c0..]);
                    at_b(
                        (c1 - c0, hd, t - c0),
                        dst,
                        w,
                        acc,
                        pa,
                        t,
                        &dout[c0 * d.q..],
                        d.q,
                        1.0,
                    );
                }
            }
            if !(need_q || need_k) {
                continue;
            }
            // dP = dO·Vᵀ, then dS = scale · P ∘ (dP − rowsum(P ∘ dP)).
            for (r0, r1) in causal_blocks(t) {
                a_bt(
                    (r1 - r0, r1, hd),
                    &mut ds[r0 * t..],
                    t,
                    false,
                    &dout[r0 * d.q..],
                    d.q,
                    v,
                    w,
                    1.0,
                );
            }
            for (i, (dr, pr)) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)).enumerate() {
                let (seen, rest) = dr.split_at_mut(i + 1);
                let dot = dot(seen, &pr[..i + 1]);
                for (g, &pv) in seen.iter_mut().zip(pr) {
                    *g = scale * pv * (*g - dot);
                }
                rest.fill(0.0);
            }
            if need_q {
                let dq = &mut dqkv[rows + hh * hd..];
                for (r0, r1) in causal_blocks(t) {
                    a_b(
                        (r1 - r0, hd, r1),
                        &mut dq[r0 * w..],
                        w,
                        false,
                        &ds[r0 * t..],
                        t,
                        k,
                        w,
                        1.0,
                    );
                }
            }
            if need_k {
                let dk = &mut dqkv[rows + d.q + kvh * hd..];
                for (c0, c1) in causal_blocks(t) {
                    let (dst, sa) = (&mut dk[c0 * w..], &ds[c0 * t + c0..]);
                    at_b(
                        (c1 - c0, hd, t - c0),
                        dst,
                        w,
                        acc,
                        sa,
                        t,
                        &q[c0 * w..],
                        w,
                        1.0,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::config::LlamaConfig;
    use crate::lora::LoraConfig;
    use crate::train::{self, TrainConfig, Trainer, Window};
    use fedpersona_privacy::AdapterTensors;

    /// Grouped-query attention, a head width that differs from hidden / heads, three layers,
    /// and sequences longer than one causal block and not a multiple of it.
    fn model() -> Llama {
        let cfg = LlamaConfig::from_json(
            r#"{"vocab_size":64,"hidden_size":32,"intermediate_size":48,"num_hidden_layers":3,
                "num_attention_heads":4,"num_key_value_heads":2,"head_dim":12,
                "max_position_embeddings":64,"tie_word_embeddings":true}"#,
        )
        .unwrap();
        let tensors = Llama::random_tensors(&cfg, 7)
            .into_iter()
            .map(|(n, s, d)| (n, Tensor::from_vec(d, s, &Device::Cpu).unwrap()))
            .collect();
        Llama::from_tensors(cfg, tensors, &Device::Cpu).unwrap()
    }

    /// An adapter with random A and B (B = 0 would hide A's gradient).
    fn adapter(model: &Llama, config: LoraConfig) -> LoraAdapter {
        let fresh = LoraAdapter::new(model.config(), config.clone(), &Device::Cpu).unwrap();
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let mut tensors = AdapterTensors::default();
        for (name, t) in fresh.to_tensors().unwrap().iter() {
            let data = t.data.iter().map(|_| rng.random_range(-0.2..0.2)).collect();
            tensors.insert(name.clone(), t.shape.clone(), data);
        }
        LoraAdapter::from_tensors(model.config(), config, &tensors, &Device::Cpu).unwrap()
    }

    /// Windows of different lengths (so the batch is padded) and weights.
    fn windows(seed: u64) -> Vec<Window> {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        [(46, 1.0), (30, 2.5), (41, 0.5)]
            .into_iter()
            .map(|(len, weight)| Window {
                tokens: (0..len).map(|_| rng.random_range(0..64u32)).collect(),
                targets: 5..len,
                weight,
            })
            .collect()
    }

    fn assert_close(what: &str, ours: &[f32], plain: &[f32]) {
        let scale = plain.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let diff = ours
            .iter()
            .zip(plain)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 2e-4 * scale,
            "{what}: max difference {diff} against max magnitude {scale}"
        );
    }

    /// The loss and every trainable gradient equal the autograd path's (the fused kernels
    /// of `kernels`, themselves checked against plain candle ops).
    fn matches_autograd(config: LoraConfig) {
        let model = model();
        let adapter = adapter(&model, config);
        let ws = windows(11);
        let refs: Vec<&Window> = ws.iter().collect();
        let batch = Batch::new(&refs, &Device::Cpu).unwrap();
        let total = 1.7;

        let mut workspace = Workspace::default();
        // The second likelihood run reuses the buffers the first left behind.
        for objective in [
            Objective::Likelihood,
            Objective::Likelihood,
            Objective::Unlikelihood,
        ] {
            let part = Part {
                batch: &batch,
                objective,
                scale: 1.0 / total,
            };
            let ours = loss_and_gradients(&model, &adapter, part, &mut workspace).unwrap();
            let plain = match objective {
                Objective::Likelihood => train::loss_part(&model, Some(&adapter), &batch, total),
                Objective::Unlikelihood => {
                    train::unlikelihood_part(&model, Some(&adapter), &batch, total)
                }
            }
            .unwrap();
            let plain_loss = f64::from(plain.to_scalar::<f32>().unwrap());
            assert!(
                (ours.loss - plain_loss).abs() <= 1e-5 * plain_loss.abs(),
                "loss {} against {plain_loss}",
                ours.loss
            );
            let grads = plain.backward().unwrap();
            assert_eq!(ours.grads.len(), adapter.trainable_vars().len());
            for (i, (g, var)) in ours.grads.iter().zip(adapter.trainable_vars()).enumerate() {
                let want = grads.get(var).unwrap().flatten_all().unwrap();
                assert_close(&format!("gradient #{i}"), g, &want.to_vec1().unwrap());
            }
        }
    }

    #[test]
    fn every_target_matches_autograd() {
        matches_autograd(LoraConfig {
            rank: 3,
            alpha: 5.0,
            targets: Target::ALL.to_vec(),
            ..LoraConfig::default()
        });
    }

    #[test]
    fn ffa_lora_on_q_and_v_matches_autograd() {
        matches_autograd(LoraConfig {
            rank: 4,
            freeze_a: true,
            ..LoraConfig::default()
        });
    }

    #[test]
    fn a_data_parallel_step_matches_the_autograd_step() {
        let model = model();
        let config = LoraConfig {
            targets: vec![Target::K, Target::O, Target::Down],
            ..LoraConfig::default()
        };
        let ours = adapter(&model, config.clone());
        let plain = adapter(&model, config);
        let ws = windows(5);
        let refs: Vec<&Window> = ws.iter().collect();
        let parts = train::split_batches(&refs, 2, &Device::Cpu).unwrap();
        assert_eq!(parts.len(), 2);
        let opt = TrainConfig {
            lr: 1e-2,
            ..TrainConfig::default()
        };
        let mut t1 = Trainer::new(ours.trainable_vars().to_vec(), opt).unwrap();
        let mut t2 = Trainer::new(plain.trainable_vars().to_vec(), opt).unwrap();
        for _ in 0..3 {
            let a = t1.lora_step(&model, &ours, &parts, None).unwrap();
            let b = t2
                .step_parallel(&parts, |p, total| {
                    train::loss_part(&model, Some(&plain), p, total)
                })
                .unwrap();
            assert!(
                (a.loss - b.loss).abs() < 1e-5 * b.loss,
                "{} vs {}",
                a.loss,
                b.loss
            );
            assert!((a.grad_norm - b.grad_norm).abs() < 1e-3 * b.grad_norm);
        }
        for (x, y) in ours.trainable_vars().iter().zip(plain.trainable_vars()) {
            let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            assert_close("updated adapter", &x, &y);
        }
    }

    #[test]
    fn a_step_with_negatives_matches_the_autograd_step() {
        let model = model();
        let ours = adapter(&model, LoraConfig::default());
        let plain = adapter(&model, LoraConfig::default());
        let (pos, neg) = (windows(5), windows(9));
        let pos: Vec<&Window> = pos.iter().collect();
        let neg: Vec<&Window> = neg.iter().collect();
        let parts = train::split_batches(&pos, 2, &Device::Cpu).unwrap();
        let whole = Batch::new(&pos, &Device::Cpu).unwrap();
        let neg = Batch::new(&neg, &Device::Cpu).unwrap();
        let sum = |b: &Batch| f64::from(b.weights.sum_all().unwrap().to_scalar::<f32>().unwrap());
        let opt = TrainConfig::default();
        let mut t1 = Trainer::new(ours.trainable_vars().to_vec(), opt).unwrap();
        let mut t2 = Trainer::new(plain.trainable_vars().to_vec(), opt).unwrap();
        for _ in 0..2 {
            let a = t1
                .lora_step(&model, &ours, &parts, Some((&neg, 0.3)))
                .unwrap();
            let l = train::loss_part(&model, Some(&plain), &whole, sum(&whole)).unwrap();
            let ul = train::unlikelihood_part(&model, Some(&plain), &neg, sum(&neg)).unwrap();
            let b = t2.step(&(l + (ul * 0.3).unwrap()).unwrap()).unwrap();
            assert!(
                (a.loss - b.loss).abs() < 1e-5 * b.loss,
                "{} vs {}",
                a.loss,
                b.loss
            );
            assert!((a.grad_norm - b.grad_norm).abs() < 1e-3 * b.grad_norm);
        }
    }

    /// Scoring (one layer's buffers reused) gives the autograd forward's NLL and argmax, with
    /// and without an adapter, and a workspace used for training then scores correctly.
    #[test]
    fn scoring_matches_the_candle_forward() {
        let model = model();
        let lora = adapter(
            &model,
            LoraConfig {
                targets: Target::ALL.to_vec(),
                ..LoraConfig::default()
            },
        );
        let ws = windows(21);
        let refs: Vec<&Window> = ws.iter().collect();
        let batch = Batch::new(&refs, &Device::Cpu).unwrap();
        let mut workspace = Workspace::default();
        let part = Part {
            batch: &batch,
            objective: Objective::Likelihood,
            scale: 1.0,
        };
        loss_and_gradients(&model, &lora, part, &mut workspace).unwrap();
        for a in [None, Some(&lora)] {
            let ours = score(&model, a, &batch, &mut workspace).unwrap();
            let logits = model.forward(&batch.inputs, a, None).unwrap();
            let (b, t, v) = logits.dims3().unwrap();
            let flat = logits.reshape((b * t, v)).unwrap();
            let nll: Vec<f32> =
                crate::kernels::cross_entropy(&flat, &batch.targets.flatten_all().unwrap())
                    .unwrap()
                    .to_vec1()
                    .unwrap();
            let pred: Vec<u32> = flat.argmax(1).unwrap().to_vec1().unwrap();
            let targets: Vec<u32> = batch.targets.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(ours.len(), b * t);
            for (i, s) in ours.iter().enumerate() {
                assert!(
                    (s.nll - nll[i]).abs() < 1e-4,
                    "position {i}: {} vs {}",
                    s.nll,
                    nll[i]
                );
                assert_eq!(s.correct, pred[i] == targets[i], "position {i}");
            }
        }
    }

    /// Weights that are `Var`s (pretraining) change under the optimizer: scoring must see
    /// their current values, not a copy cached at the first call.
    #[test]
    fn scoring_follows_weights_that_train() {
        let cfg = model().config().clone();
        let mut vars = Vec::new();
        let tensors = Llama::random_tensors(&cfg, 7)
            .into_iter()
            .map(|(n, s, d)| {
                let v =
                    candle_core::Var::from_tensor(&Tensor::from_vec(d, s, &Device::Cpu).unwrap())
                        .unwrap();
                let t = v.as_tensor().clone();
                vars.push((n.clone(), v));
                (n, t)
            })
            .collect();
        let model = Llama::from_tensors(cfg, tensors, &Device::Cpu).unwrap();
        let ws = windows(2);
        let refs: Vec<&Window> = ws.iter().collect();
        let batch = Batch::new(&refs, &Device::Cpu).unwrap();
        let mut workspace = Workspace::default();
        let before = score(&model, None, &batch, &mut workspace).unwrap();
        let (_, norm) = vars.iter().find(|(n, _)| n == "model.norm.weight").unwrap();
        norm.set(&(norm.as_tensor() * 3.0).unwrap()).unwrap();
        let after = score(&model, None, &batch, &mut workspace).unwrap();
        let logits = model.forward(&batch.inputs, None, None).unwrap();
        let (b, t, v) = logits.dims3().unwrap();
        let targets = batch.targets.flatten_all().unwrap();
        let nll: Vec<f32> =
            crate::kernels::cross_entropy(&logits.reshape((b * t, v)).unwrap(), &targets)
                .unwrap()
                .to_vec1()
                .unwrap();
        assert!((before[0].nll - after[0].nll).abs() > 1e-3);
        for (s, want) in after.iter().zip(&nll) {
            assert!((s.nll - want).abs() < 1e-4, "{} vs {want}", s.nll);
        }
    }

    #[test]
    fn bad_adapters_and_batches_are_refused_without_panicking() {
        let model = model();
        let lora = adapter(&model, LoraConfig::default());
        let ws = windows(1);
        let refs: Vec<&Window> = ws.iter().collect();
        let batch = Batch::new(&refs, &Device::Cpu).unwrap();
        // A frozen copy has no trainable tensors.
        let mut t = Trainer::new(Vec::new(), TrainConfig::default()).unwrap();
        let err = t
            .lora_step(&model, &lora.frozen(), std::slice::from_ref(&batch), None)
            .unwrap_err();
        assert!(err.to_string().contains("frozen copy"), "{err}");
        // Targets of another shape than the inputs.
        let bad = Batch {
            targets: batch.targets.narrow(1, 0, 3).unwrap(),
            ..batch.clone()
        };
        let part = Part {
            batch: &bad,
            objective: Objective::Likelihood,
            scale: 1.0,
        };
        let err = loss_and_gradients(&model, &lora, part, &mut Workspace::default()).unwrap_err();
        assert!(
            err.to_string().contains("batch targets have shape"),
            "{err}"
        );
        // A target listed twice.
        let twice = LoraConfig {
            targets: vec![Target::Q, Target::V, Target::Q],
            ..LoraConfig::default()
        };
        let err = twice.validate().unwrap_err();
        assert!(err.to_string().contains("q_proj is listed twice"), "{err}");
    }

    #[test]
    fn a_trainer_refuses_another_adapter() {
        let model = model();
        let a = adapter(&model, LoraConfig::default());
        let b = adapter(&model, LoraConfig::default());
        let ws = windows(1);
        let refs: Vec<&Window> = ws.iter().collect();
        let parts = train::split_batches(&refs, 1, &Device::Cpu).unwrap();
        let mut t = Trainer::new(a.trainable_vars().to_vec(), TrainConfig::default()).unwrap();
        let err = t.lora_step(&model, &b, &parts, None).unwrap_err();
        assert!(err.to_string().contains("another adapter"), "{err}");
    }

    #[test]
    fn out_of_vocabulary_tokens_are_refused() {
        let model = model();
        let a = adapter(&model, LoraConfig::default());
        let w = Window {
            tokens: vec![1, 2, 99, 3],
            targets: 1..4,
            weight: 1.0,
        };
        let batch = Batch::new(&[&w], &Device::Cpu).unwrap();
        let part = Part {
            batch: &batch,
            objective: Objective::Likelihood,
            scale: 1.0,
        };
        let err = loss_and_gradients(&model, &a, part, &mut Workspace::default()).unwrap_err();
        assert!(
            matches!(err, ModelError::TokenOutOfRange { id: 99, .. }),
            "{err}"
        );
    }

    #[test]
    fn fast_exp_is_within_a_few_ulp() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, libm) = (exp(x), x.exp());
            assert!(
                (ours - libm).abs() <= 4.0 * f32::EPSILON * libm,
                "exp({x}) = {ours}, libm {libm}"
            );
            x += 0.0137;
        }
        assert_eq!(exp(-1000.0), (-87f32).exp());
        assert!(exp(1000.0).is_finite());
    }
}
