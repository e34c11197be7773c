//! RMSNorm over the last dimension.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::{read, slice, tensor};

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
