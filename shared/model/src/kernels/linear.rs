//! A linear layer through a frozen weight, and a LoRA-adapted linear layer, each one graph
//! node.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Storage, Tensor};

use super::storage_matmul;

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
