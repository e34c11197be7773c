//! Fused CPU kernels with hand-written backward passes for the training path: a linear layer
//! through a frozen weight (no weight gradient), RMSNorm, rotary embeddings, causal softmax,
//! SwiGLU and the token cross-entropy. Each replaces a chain of candle ops that would
//! allocate and traverse memory once per op; the tests below check values and gradients
//! against that plain chain.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Storage,
    Tensor,
};

fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// Runs `f` on a tensor's contiguous f32 values without copying when already contiguous.
fn read<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(c) => f(slice(c, l, op)?),
        _ => bail!("{op}: only the CPU is supported"),
    }
}

fn tensor(v: Vec<f32>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), &Device::Cpu)
}

// ---------------------------------------------------------------------------------------
// Linear through a frozen weight.

struct FrozenLinear {
    /// `[out, in]`.
    w: Tensor,
    /// `w.t()`: a view with the transposed layout.
    wt: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        let n = self.w.dim(0)?;
        let (ws, wl) = self.wt.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else {
            bail!("frozen-linear: only the CPU is supported")
        };
        let out = s.matmul(ws, (1, m, n, k), l, wl)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// `x @ w.T` for `x: [rows, in]`, `w: [out, in]`. When no gradient can reach `w`, the backward
/// pass computes only the input gradient (candle's matmul would also compute `w`'s, which
/// LoRA training throws away: a third of the step's matmul work).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.track_op() || !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return x.matmul(&w.t()?);
    }
    let x = x.contiguous()?;
    x.apply_op1(FrozenLinear {
        w: w.clone(),
        wt: w.t()?,
    })
}

// ---------------------------------------------------------------------------------------
// A LoRA-adapted linear layer in one node.

struct LoraLinear {
    /// Frozen `[out, in]` and its transposed view.
    w: Tensor,
    wt: Tensor,
    scale: f32,
}

fn storage_matmul(a: &CpuStorage, al: &Layout, b: &CpuStorage, bl: &Layout) -> Result<CpuStorage> {
    let (m, k) = al.shape().dims2()?;
    let (k2, n) = bl.shape().dims2()?;
    if k != k2 {
        bail!("lora-linear: inner dimensions {k} and {k2} differ");
    }
    a.matmul(b, (1, m, n, k), al, bl)
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, _) = lx.shape().dims2()?;
        let n = self.w.dim(0)?;
        let (ws, wl) = self.wt.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else {
            bail!("lora-linear: only the CPU is supported")
        };
        let main = storage_matmul(sx, lx, ws, wl)?;
        let xa = storage_matmul(sx, lx, sa, &la.transpose(0, 1)?)?;
        let r = la.shape().dims2()?.0;
        let low = storage_matmul(&xa, &Layout::contiguous((m, r)), sb, &lb.transpose(0, 1)?)?;
        let (CpuStorage::F32(mut y), CpuStorage::F32(low)) = (main, low) else {
            bail!("lora-linear: only f32 is supported")
        };
        y.iter_mut()
            .zip(&low)
            .for_each(|(y, l)| *y += self.scale * l);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The first layer's input needs no gradient: skip its (full-size) matmul.
        let wanted = (x.track_op(), a.track_op(), b.track_op());
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let s = self.scale as f64;
        // dy·B: [rows, rank]
        let gb = grad.matmul(&b)?;
        let dx = wanted
            .0
            .then(|| grad.matmul(&self.w)? + (gb.matmul(&a)? * s)?)
            .transpose()?;
        let da = wanted.1.then(|| gb.t()?.matmul(&x)? * s).transpose()?;
        let db = wanted
            .2
            .then(|| grad.t()?.matmul(&x.matmul(&a.t()?)?)? * s)
            .transpose()?;
        Ok((dx, da, db))
    }
}

/// `x @ w.T + scale · (x @ a.T) @ b.T` for `x: [rows, in]`, a frozen `w: [out, in]`,
/// `a: [rank, in]`, `b: [out, rank]`: one graph node instead of five (two matmuls, the
/// scaling, the sum and the frozen matmul), so the backward pass accumulates one gradient.
pub fn lora_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    if w.track_op() || !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        let low = x.matmul(&a.t()?)?.matmul(&(b * scale)?.t()?)?;
        return x.matmul(&w.t()?)? + low;
    }
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        LoraLinear {
            w: w.clone(),
            wt: w.t()?,
            scale: scale as f32,
        },
    )
}

// ---------------------------------------------------------------------------------------
// RMSNorm.

struct RmsNorm {
    eps: f32,
}

fn rms_inv(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "rms-norm")?;
        let w = slice(s2, l2, "rms-norm")?;
        let h = w.len();
        let mut out = vec![0f32; x.len()];
        for (row, o) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
            let inv = rms_inv(row, self.eps);
            for ((o, &v), &g) in o.iter_mut().zip(row).zip(w) {
                *o = v * inv * g;
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let want_w = w.track_op();
        let (dx, dw) = read(x, "rms-norm", |x| {
            read(w, "rms-norm", |w| {
                read(grad, "rms-norm", |dy| {
                    let h = w.len();
                    let mut dx = vec![0f32; x.len()];
                    let mut dw = vec![0f32; if want_w { h } else { 0 }];
                    for ((row, dyr), dxr) in x
                        .chunks_exact(h)
                        .zip(dy.chunks_exact(h))
                        .zip(dx.chunks_exact_mut(h))
                    {
                        let inv = rms_inv(row, self.eps);
                        // g = dy·w; dx = inv·(g − x·inv²·mean(g·x))
                        let mut dot = 0f32;
                        for i in 0..h {
                            dot += dyr[i] * w[i] * row[i];
                        }
                        let c = inv * inv * dot / h as f32;
                        for i in 0..h {
                            dxr[i] = inv * (dyr[i] * w[i] - row[i] * c);
                        }
                        if want_w {
                            for i in 0..h {
                                dw[i] += dyr[i] * row[i] * inv;
                            }
                        }
                    }
                    Ok((dx, dw))
                })
            })
        })?;
        let dx = tensor(dx, x.shape())?;
        let dw = if want_w {
            Some(tensor(dw, w.shape())?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

/// `x / sqrt(mean(x²) + eps) · w` over the last dimension.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

// ---------------------------------------------------------------------------------------
// Splitting heads (with rotary embeddings) and merging them back.

/// Rotates one head vector at position `p` (HF rotate_half layout), or applies the transpose
/// of that rotation when `sign` is −1 (the backward pass).
fn rotate(x: &[f32], out: &mut [f32], cos: &[f32], sin: &[f32], sign: f32) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        out[i] = a * cos[i] - sign * b * sin[i];
        out[i + half] = b * cos[i] + sign * a * sin[i];
    }
}

/// `[B, T, H·D]` → `[B, H, T, D]`, rotating each head at positions `start..start + T` when
/// tables are given. One pass instead of reshape + transpose + copy + rotate, each of which
/// would also accumulate its own gradient.
struct SplitHeads {
    heads: usize,
    rope: Option<(RopeTables, usize)>,
}

/// Moves rows between the two layouts: `to_heads` picks the direction; `sign` as in `rotate`.
#[allow(clippy::too_many_arguments)]
fn shuffle(
    src: &[f32],
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    to_heads: bool,
    rope: Option<&(RopeTables, usize)>,
    sign: f32,
) -> Vec<f32> {
    let mut out = vec![0f32; src.len()];
    for bi in 0..b {
        for ti in 0..t {
            for hi in 0..h {
                let merged = ((bi * t + ti) * h + hi) * d;
                let split = ((bi * h + hi) * t + ti) * d;
                let (from, to) = if to_heads {
                    (merged, split)
                } else {
                    (split, merged)
                };
                let x = &src[from..from + d];
                let o = &mut out[to..to + d];
                match rope {
                    Some((tables, start)) => {
                        let p = (start + ti) * d;
                        rotate(
                            x,
                            o,
                            &tables.cos[p..p + d / 2],
                            &tables.sin[p..p + d / 2],
                            sign,
                        );
                    }
                    None => o.copy_from_slice(x),
                }
            }
        }
    }
    out
}

impl CustomOp1 for SplitHeads {
    fn name(&self) -> &'static str {
        "split-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, hd) = l.shape().dims3()?;
        let (h, d) = (self.heads, hd / self.heads);
        let x = slice(s, l, "split-heads")?;
        let out = shuffle(x, b, t, h, d, true, self.rope.as_ref(), 1.0);
        Ok((CpuStorage::F32(out), Shape::from((b, h, t, d))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (b, t, hd) = x.dims3()?;
        let (h, d) = (self.heads, hd / self.heads);
        let dx = read(grad, "split-heads", |g| {
            Ok(shuffle(g, b, t, h, d, false, self.rope.as_ref(), -1.0))
        })?;
        Ok(Some(tensor(dx, x.shape())?))
    }
}

/// `[B, T, H·D]` → `[B, H, T, D]`, with rotary embeddings at positions `start..` if given.
pub fn split_heads(x: &Tensor, heads: usize, rope: Option<(&RopeTables, usize)>) -> Result<Tensor> {
    let (_, t, hd) = x.dims3()?;
    if heads == 0 || hd % heads != 0 {
        bail!("split-heads: {hd} features do not split into {heads} heads");
    }
    if let Some((tables, start)) = rope {
        if hd / heads != tables.head_dim || start + t > tables.positions() {
            bail!("split-heads: {t} positions from {start} with head_dim {} do not fit the rope tables", hd / heads);
        }
    }
    x.contiguous()?.apply_op1(SplitHeads {
        heads,
        rope: rope.map(|(r, s)| (r.clone(), s)),
    })
}

/// `[B, H, T, D]` → `[B, T, H·D]`.
struct MergeHeads;

impl CustomOp1 for MergeHeads {
    fn name(&self) -> &'static str {
        "merge-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, t, d) = l.shape().dims4()?;
        let x = slice(s, l, "merge-heads")?;
        Ok((
            CpuStorage::F32(shuffle(x, b, t, h, d, false, None, 1.0)),
            Shape::from((b, t, h * d)),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (b, h, t, d) = x.dims4()?;
        let dx = read(grad, "merge-heads", |g| {
            Ok(shuffle(g, b, t, h, d, true, None, 1.0))
        })?;
        Ok(Some(tensor(dx, x.shape())?))
    }
}

/// `[B, H, T, D]` → `[B, T, H·D]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MergeHeads)
}

/// Rotary tables shared by every call: `[positions, head_dim]`, `cat(freqs, freqs)` layout.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub(crate) cos: Arc<Vec<f32>>,
    pub(crate) sin: Arc<Vec<f32>>,
    head_dim: usize,
}

impl RopeTables {
    pub fn new(cos: Vec<f32>, sin: Vec<f32>, head_dim: usize) -> Self {
        RopeTables {
            cos: Arc::new(cos),
            sin: Arc::new(sin),
            head_dim,
        }
    }

    pub fn positions(&self) -> usize {
        self.cos.len() / self.head_dim
    }
}

// ---------------------------------------------------------------------------------------
// Causal softmax of attention scores.

/// Row-wise causal softmax of `[.., T, S]` scores: row `r` sees keys `0..=start + r % T`.
fn causal_softmax_rows(x: &[f32], t: usize, s: usize, start: usize, scale: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (r, (xr, or)) in x.chunks_exact(s).zip(out.chunks_exact_mut(s)).enumerate() {
        let visible = (start + r % t + 1).min(s);
        let xr = &xr[..visible];
        let max = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max) * scale;
        let mut sum = 0f32;
        for (o, &v) in or.iter_mut().zip(xr) {
            *o = (v * scale - max).exp();
            sum += *o;
        }
        let inv = 1.0 / sum;
        or[..visible].iter_mut().for_each(|o| *o *= inv);
    }
    out
}

/// The gradient of the scores from the probabilities `y` and their gradient `dy`.
fn causal_softmax_rows_bwd(
    y: &[f32],
    dy: &[f32],
    t: usize,
    s: usize,
    start: usize,
    scale: f32,
) -> Vec<f32> {
    let mut dx = vec![0f32; y.len()];
    for (r, ((yr, dyr), dxr)) in y
        .chunks_exact(s)
        .zip(dy.chunks_exact(s))
        .zip(dx.chunks_exact_mut(s))
        .enumerate()
    {
        let visible = (start + r % t + 1).min(s);
        let dot: f32 = yr[..visible]
            .iter()
            .zip(&dyr[..visible])
            .map(|(a, b)| a * b)
            .sum();
        for j in 0..visible {
            dxr[j] = scale * yr[j] * (dyr[j] - dot);
        }
    }
    dx
}

// ---------------------------------------------------------------------------------------
// Causal attention in one node.

struct Attention {
    scale: f32,
    start: usize,
    /// The probabilities of the forward pass, for the backward pass.
    probs: std::sync::Mutex<Option<Vec<f32>>>,
}

fn f32_vec(s: CpuStorage) -> Result<Vec<f32>> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => bail!("attention: only f32 is supported"),
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, t, d) = lq.shape().dims4()?;
        let s = lk.shape().dims4()?.2;
        let scores = f32_vec(sq.matmul(sk, (b * h, t, s, d), lq, &lk.transpose(2, 3)?)?)?;
        let probs = causal_softmax_rows(&scores, t, s, self.start, self.scale);
        let p = CpuStorage::F32(probs);
        let out = p.matmul(sv, (b * h, t, d, s), &Layout::contiguous((b, h, t, s)), lv)?;
        let CpuStorage::F32(probs) = p else {
            unreachable!("built above")
        };
        *self
            .probs
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: poisoned".into()))? = Some(probs);
        Ok((out, lq.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, t, _) = q.dims4()?;
        let s = k.dim(2)?;
        let probs = self
            .probs
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: poisoned".into()))?
            .take();
        let Some(probs) = probs else {
            bail!("attention: backward before forward")
        };
        let wanted = (q.track_op(), k.track_op(), v.track_op());
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let dp = grad.matmul(&v.t()?)?;
        let ds = read(&dp, "attention", |dp| {
            Ok(causal_softmax_rows_bwd(
                &probs, dp, t, s, self.start, self.scale,
            ))
        })?;
        let ds = Tensor::from_vec(ds, (b, h, t, s), &Device::Cpu)?;
        let p = Tensor::from_vec(probs, (b, h, t, s), &Device::Cpu)?;
        let dq = wanted.0.then(|| ds.matmul(&k)).transpose()?;
        let dk = wanted.1.then(|| ds.t()?.matmul(&q)).transpose()?;
        let dv = wanted.2.then(|| p.t()?.matmul(grad)).transpose()?;
        Ok((dq, dk, dv))
    }
}

/// `softmax(scale · q kᵀ, causal) v` for `q: [B, H, T, D]`, `k, v: [B, H, S, D]` with
/// `S = start + T`: one graph node instead of a transpose, two matmuls and the softmax, so
/// the `[B, H, T, S]` scores and probabilities accumulate no gradients of their own.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, start: usize) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let s = k.dim(2)?;
    if k.dims() != [b, h, s, d] || v.dims() != [b, h, s, d] || start + t != s {
        bail!(
            "attention: q {:?}, k {:?}, v {:?} from position {start} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention {
            scale: scale as f32,
            start,
            probs: std::sync::Mutex::new(None),
        },
    )
}

// ---------------------------------------------------------------------------------------
// SwiGLU.

struct SwiGlu;

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// Gradients of `silu(g) · u` with respect to `g` and `u`, given the output's gradient.
fn swiglu_bwd(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0f32; g.len()];
    let mut du = vec![0f32; g.len()];
    for i in 0..g.len() {
        let s = sigmoid(g[i]);
        du[i] = dy[i] * g[i] * s;
        dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
    }
    (dg, du)
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = slice(s1, l1, "swiglu")?;
        let u = slice(s2, l2, "swiglu")?;
        if g.len() != u.len() {
            bail!("swiglu: gate and up differ in size");
        }
        let out = g.iter().zip(u).map(|(&g, &u)| g * sigmoid(g) * u).collect();
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = read(g, "swiglu", |g| {
            read(u, "swiglu", |u| {
                read(grad, "swiglu", |dy| Ok(swiglu_bwd(g, u, dy)))
            })
        })?;
        Ok((Some(tensor(dg, g.shape())?), Some(tensor(du, u.shape())?)))
    }
}

/// `silu(gate) · up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

// ---------------------------------------------------------------------------------------
// The SwiGLU MLP through frozen weights, in one node.

struct FrozenMlp {
    /// `[inter, hidden]`, `[inter, hidden]`, `[hidden, inter]`, and the transposed views.
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    gate_t: Tensor,
    up_t: Tensor,
    down_t: Tensor,
    /// The forward pass's gate and up activations, for the backward pass (the graph holds
    /// this op, so they live exactly as long as the activations of an unfused MLP would).
    saved: std::sync::Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

fn matmul_with(x: &CpuStorage, xl: &Layout, w_t: &Tensor) -> Result<Vec<f32>> {
    let (ws, wl) = w_t.storage_and_layout();
    let Storage::Cpu(ws) = &*ws else {
        bail!("frozen-mlp: only the CPU is supported")
    };
    match storage_matmul(x, xl, ws, wl)? {
        CpuStorage::F32(v) => Ok(v),
        _ => bail!("frozen-mlp: only f32 is supported"),
    }
}

impl CustomOp1 for FrozenMlp {
    fn name(&self) -> &'static str {
        "frozen-mlp"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, h) = l.shape().dims2()?;
        let inter = self.gate.dim(0)?;
        let g = matmul_with(s, l, &self.gate_t)?;
        let u = matmul_with(s, l, &self.up_t)?;
        let act: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| g * sigmoid(g) * u)
            .collect();
        let y = matmul_with(
            &CpuStorage::F32(act),
            &Layout::contiguous((m, inter)),
            &self.down_t,
        )?;
        *self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("frozen-mlp: poisoned".into()))? = Some((g, u));
        Ok((CpuStorage::F32(y), Shape::from((m, h))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (m, _) = x.dims2()?;
        let inter = self.gate.dim(0)?;
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("frozen-mlp: poisoned".into()))?;
        let Some((g, u)) = saved.as_ref() else {
            bail!("frozen-mlp: backward before forward")
        };
        let ds = grad.matmul(&self.down)?;
        let (dg, du) = read(&ds, "frozen-mlp", |ds| Ok(swiglu_bwd(g, u, ds)))?;
        let dg = Tensor::from_vec(dg, (m, inter), &Device::Cpu)?;
        let du = Tensor::from_vec(du, (m, inter), &Device::Cpu)?;
        Ok(Some((dg.matmul(&self.gate)? + du.matmul(&self.up)?)?))
    }
}

/// `down(silu(gate(x)) · up(x))` for `x: [rows, hidden]` through frozen weights, as one graph
/// node: the three `[rows, intermediate]` activations accumulate no gradients of their own.
/// Falls back to the separate ops when a gradient can reach a weight.
pub fn frozen_mlp(x: &Tensor, gate: &Tensor, up: &Tensor, down: &Tensor) -> Result<Tensor> {
    if gate.track_op()
        || up.track_op()
        || down.track_op()
        || !x.device().is_cpu()
        || x.dtype() != candle_core::DType::F32
    {
        return linear(&swiglu(&linear(x, gate)?, &linear(x, up)?)?, down);
    }
    x.contiguous()?.apply_op1(FrozenMlp {
        gate: gate.clone(),
        up: up.clone(),
        down: down.clone(),
        gate_t: gate.t()?,
        up_t: up.t()?,
        down_t: down.t()?,
        saved: std::sync::Mutex::new(None),
    })
}

// ---------------------------------------------------------------------------------------
// Token cross-entropy.

struct CrossEntropy {
    targets: Vec<u32>,
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l.shape().dims2()?;
        let x = slice(s, l, "cross-entropy")?;
        let mut out = vec![0f32; n];
        for ((row, o), &t) in x.chunks_exact(v).zip(out.iter_mut()).zip(&self.targets) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = row.iter().map(|&z| (z - max).exp()).sum::<f32>().ln() + max;
            *o = lse - row[t as usize];
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, v) = x.dims2()?;
        let dx = read(x, "cross-entropy", |x| {
            read(grad, "cross-entropy", |g| {
                let mut dx = vec![0f32; x.len()];
                for (((row, d), &t), &g) in x
                    .chunks_exact(v)
                    .zip(dx.chunks_exact_mut(v))
                    .zip(&self.targets)
                    .zip(g)
                {
                    if g == 0.0 {
                        continue;
                    }
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for (d, &z) in d.iter_mut().zip(row) {
                        *d = (z - max).exp();
                        sum += *d;
                    }
                    let f = g / sum;
                    d.iter_mut().for_each(|d| *d *= f);
                    d[t as usize] -= g;
                }
                Ok(dx)
            })
        })?;
        Ok(Some(tensor(dx, x.shape())?))
    }
}

/// Negative log-likelihood of each target under `logits: [N, V]`, shape `[N]`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    let targets = targets.flatten_all()?.to_vec1::<u32>()?;
    if targets.len() != n {
        bail!("cross-entropy: {n} rows but {} targets", targets.len());
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
        bail!("cross-entropy: target {t} outside the vocabulary ({v})");
    }
    logits.contiguous()?.apply_op1(CrossEntropy { targets })
}

#[cfg(test)]
mod tests {
    //! Each fused kernel against the plain chain of differentiable candle ops it replaces:
    //! values and gradients.

    use candle_core::{Var, D};

    use super::*;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i as f64 * 0.7311 + seed as f64 * 1.37).sin() * 1.5) as f32)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        let d = d.to_scalar::<f32>().unwrap();
        assert!(d < tol, "max difference {d}");
    }

    /// Checks `fused` against `plain` on values, and on gradients of a weighted sum.
    fn check(
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Tensor,
        plain: impl Fn(&[Tensor]) -> Tensor,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let a = fused(&ts);
        let b = plain(&ts);
        close(&a, &b, 1e-4);
        let w = rand(a.dims(), 99);
        let ga = (&a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for v in &vars {
            close(
                ga.get(v).expect("fused gradient"),
                gb.get(v).expect("plain gradient"),
                1e-3,
            );
        }
    }

    #[test]
    fn rms_norm_matches_plain() {
        check(
            &[rand(&[2, 3, 16], 1), rand(&[16], 2)],
            |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            |t| {
                let inv = (t[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5)
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .recip()
                    .unwrap();
                t[0].broadcast_mul(&inv)
                    .unwrap()
                    .broadcast_mul(&t[1])
                    .unwrap()
            },
        );
    }

    #[test]
    fn split_and_merge_heads_match_plain() {
        let (b, t, h, d, start) = (2usize, 4usize, 3usize, 8usize, 2usize);
        let n = start + t;
        let freqs: Vec<f32> = (0..n * d / 2)
            .map(|i| (i % 7) as f32 * 0.3 + (i / 7) as f32 * 0.1)
            .collect();
        // Tables in the cat(freqs, freqs) layout.
        let table = |f: fn(f32) -> f32| -> Vec<f32> {
            (0..n)
                .flat_map(|p| (0..d).map(move |i| (p, i % (d / 2))))
                .map(|(p, i)| f(freqs[p * d / 2 + i]))
                .collect()
        };
        let (cos, sin) = (table(f32::cos), table(f32::sin));
        let tables = RopeTables::new(cos.clone(), sin.clone(), d);
        let cos = Tensor::from_vec(cos, (n, d), &Device::Cpu)
            .unwrap()
            .narrow(0, start, t)
            .unwrap();
        let sin = Tensor::from_vec(sin, (n, d), &Device::Cpu)
            .unwrap()
            .narrow(0, start, t)
            .unwrap();
        let plain_split = |x: &Tensor| {
            x.reshape((b, t, h, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        check(
            &[rand(&[b, t, h * d], 4)],
            |x| split_heads(&x[0], h, Some((&tables, start))).unwrap(),
            |x| {
                let x = plain_split(&x[0]);
                let x1 = x.narrow(D::Minus1, 0, d / 2).unwrap();
                let x2 = x.narrow(D::Minus1, d / 2, d / 2).unwrap();
                let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
                (x.broadcast_mul(&cos).unwrap() + rot.broadcast_mul(&sin).unwrap()).unwrap()
            },
        );
        check(
            &[rand(&[b, t, h * d], 5)],
            |x| split_heads(&x[0], h, None).unwrap(),
            |x| plain_split(&x[0]),
        );
        check(
            &[rand(&[b, h, t, d], 6)],
            |x| merge_heads(&x[0]).unwrap(),
            |x| {
                x[0].transpose(1, 2)
                    .unwrap()
                    .reshape((b, t, h * d))
                    .unwrap()
            },
        );
        assert!(split_heads(&rand(&[b, t, h * d], 4), h, Some((&tables, n))).is_err());
    }

    #[test]
    fn attention_matches_plain() {
        for start in [0usize, 2] {
            let (t, s, d) = (5usize, 5 + start, 4usize);
            check(
                &[
                    rand(&[2, 3, t, d], 30),
                    rand(&[2, 3, s, d], 31),
                    rand(&[2, 3, s, d], 32),
                ],
                |x| attention(&x[0], &x[1], &x[2], 0.5, start).unwrap(),
                |x| {
                    let m: Vec<f32> = (0..t)
                        .flat_map(|i| {
                            (0..s).map(move |j| {
                                if j > start + i {
                                    f32::NEG_INFINITY
                                } else {
                                    0.0
                                }
                            })
                        })
                        .collect();
                    let m = Tensor::from_vec(m, (t, s), &Device::Cpu).unwrap();
                    let scores = (x[0].matmul(&x[1].t().unwrap()).unwrap() * 0.5).unwrap();
                    let probs =
                        candle_nn::ops::softmax(&scores.broadcast_add(&m).unwrap(), D::Minus1)
                            .unwrap();
                    probs.matmul(&x[2]).unwrap()
                },
            );
        }
    }

    #[test]
    fn swiglu_matches_plain() {
        check(
            &[rand(&[3, 10], 5), rand(&[3, 10], 6)],
            |t| swiglu(&t[0], &t[1]).unwrap(),
            |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
        );
    }

    #[test]
    fn frozen_mlp_matches_plain() {
        let (gate, up, down) = (rand(&[7, 4], 20), rand(&[7, 4], 21), rand(&[4, 7], 22));
        check(
            &[rand(&[5, 4], 23)],
            |x| frozen_mlp(&x[0], &gate, &up, &down).unwrap(),
            |x| {
                let g = x[0].matmul(&gate.t().unwrap()).unwrap();
                let u = x[0].matmul(&up.t().unwrap()).unwrap();
                (g.silu().unwrap() * u)
                    .unwrap()
                    .matmul(&down.t().unwrap())
                    .unwrap()
            },
        );
    }

    #[test]
    fn cross_entropy_matches_plain() {
        let targets = Tensor::new(&[3u32, 0, 7, 7, 1], &Device::Cpu).unwrap();
        check(
            &[rand(&[5, 8], 7)],
            |t| cross_entropy(&t[0], &targets).unwrap(),
            |t| {
                let ls = candle_nn::ops::log_softmax(&t[0], D::Minus1).unwrap();
                ls.gather(&targets.unsqueeze(1).unwrap(), 1)
                    .unwrap()
                    .squeeze(1)
                    .unwrap()
                    .neg()
                    .unwrap()
            },
        );
        assert!(cross_entropy(
            &rand(&[5, 8], 7),
            &Tensor::new(&[8u32, 0, 0, 0, 0], &Device::Cpu).unwrap()
        )
        .is_err());
    }

    #[test]
    fn lora_linear_matches_plain() {
        let w = rand(&[6, 5], 10);
        for frozen_a in [false, true] {
            let x = Var::from_tensor(&rand(&[7, 5], 11)).unwrap();
            let a = Var::from_tensor(&rand(&[2, 5], 12)).unwrap();
            let b = Var::from_tensor(&rand(&[6, 2], 13)).unwrap();
            let a_t = if frozen_a {
                a.as_tensor().detach()
            } else {
                a.as_tensor().clone()
            };
            let fused = lora_linear(x.as_tensor(), &w, &a_t, b.as_tensor(), 1.5).unwrap();
            let plain = (x.as_tensor().matmul(&w.t().unwrap()).unwrap()
                + (x.as_tensor()
                    .matmul(&a_t.t().unwrap())
                    .unwrap()
                    .matmul(&b.as_tensor().t().unwrap())
                    .unwrap()
                    * 1.5)
                    .unwrap())
            .unwrap();
            close(&fused, &plain, 1e-4);
            let wts = rand(fused.dims(), 14);
            let gf = (&fused * &wts)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gp = (&plain * &wts)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            close(
                gf.get(x.as_tensor()).unwrap(),
                gp.get(x.as_tensor()).unwrap(),
                1e-3,
            );
            close(
                gf.get(b.as_tensor()).unwrap(),
                gp.get(b.as_tensor()).unwrap(),
                1e-3,
            );
            if frozen_a {
                assert!(gf.get(a.as_tensor()).is_none());
            } else {
                close(
                    gf.get(a.as_tensor()).unwrap(),
                    gp.get(a.as_tensor()).unwrap(),
                    1e-3,
                );
            }
        }
    }

    #[test]
    fn frozen_linear_matches_matmul_and_skips_the_weight_gradient() {
        let x = Var::from_tensor(&rand(&[6, 5], 8)).unwrap();
        let w = rand(&[4, 5], 9);
        let a = linear(x.as_tensor(), &w).unwrap();
        let b = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        close(&a, &b, 1e-5);
        let ga = a.sum_all().unwrap().backward().unwrap();
        let gb = b.sum_all().unwrap().backward().unwrap();
        close(
            ga.get(x.as_tensor()).unwrap(),
            gb.get(x.as_tensor()).unwrap(),
            1e-5,
        );
        // A trainable weight still gets its gradient (plain matmul path).
        let wv = Var::from_tensor(&w).unwrap();
        let c = linear(x.as_tensor(), wv.as_tensor()).unwrap();
        assert!(c
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(wv.as_tensor())
            .is_some());
    }
}
