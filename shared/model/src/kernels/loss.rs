//! The token cross-entropy.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::{read, slice, tensor};

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
