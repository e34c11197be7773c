//! Splitting heads (with rotary embeddings) and merging them back, and the rotary tables.

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::{read, slice, tensor};

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
