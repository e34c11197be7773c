//! Causal attention in one node: scores, causal softmax and the weighted sum of values.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};

use super::read;

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
