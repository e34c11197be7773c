//! Fused CPU kernels with hand-written backward passes for the training path: a linear layer
//! through a frozen weight (no weight gradient), RMSNorm, rotary embeddings, causal softmax,
//! SwiGLU and the token cross-entropy. Each replaces a chain of candle ops that would
//! allocate and traverse memory once per op; the tests check values and gradients against
//! that plain chain.
//!
//! One module per op: [`linear`](linear()) and [`lora_linear`] (`linear`), [`rms_norm`]
//! (`norm`), [`split_heads`], [`merge_heads`] and [`RopeTables`] (`heads`), [`attention`]
//! (`attention`), [`swiglu`] and [`frozen_mlp`] (`mlp`), [`cross_entropy`] (`loss`). This
//! module holds the storage helpers they share.

mod attention;
mod heads;
mod linear;
mod loss;
mod mlp;
mod norm;

#[cfg(test)]
mod tests;

pub use attention::attention;
pub use heads::{merge_heads, split_heads, RopeTables};
pub use linear::{linear, lora_linear};
pub use loss::cross_entropy;
pub use mlp::{frozen_mlp, swiglu};
pub use norm::rms_norm;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Device, Layout, Result, Shape, Storage, Tensor};

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

fn storage_matmul(a: &CpuStorage, al: &Layout, b: &CpuStorage, bl: &Layout) -> Result<CpuStorage> {
    let (m, k) = al.shape().dims2()?;
    let (k2, n) = bl.shape().dims2()?;
    if k != k2 {
        bail!("lora-linear: inner dimensions {k} and {k2} differ");
    }
    a.matmul(b, (1, m, n, k), al, bl)
}
