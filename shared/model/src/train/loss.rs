//! The causal-LM loss and the unlikelihood loss of a batch through `Llama::forward` and
//! candle's autograd (the reference the hand-written LoRA step is checked against, and
//! pretraining's path).

use candle_core::Tensor;

use super::no_targets;
use crate::batch::Batch;
use crate::error::ModelError;
use crate::lora::LoraAdapter;
use crate::model::{Adapter, Llama};

/// Per-token negative log-likelihood `[B, T]`.
fn token_nll(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    crate::kernels::cross_entropy(&logits.reshape((b * t, v))?, targets)?.reshape((b, t))
}

/// The weighted mean causal-LM loss of a batch (example weights are relative within it).
pub fn loss(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    batch: &Batch,
) -> Result<Tensor, ModelError> {
    let total = batch.weights.sum_all()?.to_scalar::<f32>()?;
    if total <= 0.0 {
        return Err(no_targets());
    }
    loss_part(model, adapter, batch, total as f64)
}

/// The weighted NLL sum of a batch divided by `total_weight` (for [`Trainer::step_parallel`](super::Trainer::step_parallel)).
pub fn loss_part(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    batch: &Batch,
    total_weight: f64,
) -> Result<Tensor, ModelError> {
    let nll = batch_nll(model, adapter, batch)?;
    Ok(((nll * &batch.weights)?.sum_all()? / total_weight)?)
}

fn batch_nll(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    batch: &Batch,
) -> Result<Tensor, ModelError> {
    let logits = model.forward(&batch.inputs, adapter.map(|a| a as &dyn Adapter), None)?;
    Ok(token_nll(&logits, &batch.targets)?)
}

/// The unlikelihood loss of a batch of *negative* windows (text the model should not
/// produce, e.g. a suggestion the user rejected): Σ w·(−log(1 − p(target))) / `total_weight`
/// (Welleck et al. 2020), with p = exp(−NLL) from the same fused cross-entropy, so its
/// gradient comes through that kernel's backward.
pub fn unlikelihood_part(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    batch: &Batch,
    total_weight: f64,
) -> Result<Tensor, ModelError> {
    // 1 − p, kept off zero.
    let unlikely = batch_nll(model, adapter, batch)?
        .neg()?
        .exp()?
        .affine(-1.0, 1.0 + 1e-5)?;
    let ul = unlikely.log()?.neg()?;
    Ok(((ul * &batch.weights)?.sum_all()? / total_weight)?)
}
