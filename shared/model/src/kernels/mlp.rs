//! SwiGLU, and the SwiGLU MLP through frozen weights in one node.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, Device, Layout, Result, Shape, Storage, Tensor,
};

use super::linear::linear;
use super::{read, slice, storage_matmul, tensor};

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
