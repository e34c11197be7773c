//! The LoRA training step with its forward and backward passes written out over reused
//! buffers: the loss (likelihood or unlikelihood) and the adapter's gradients for one batch,
//! the same numbers as `Llama::forward` + the token cross-entropy + candle's `backward`
//! (`crate::train`'s tests check that), in about 60% of its time; and [`score`], the same
//! forward pass for evaluation.
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
//!
//! The pieces: `gemm` (the matrix products), `elementwise` (the vectorized loops),
//! `workspace` (shapes and buffers), `adapter` (the adapter as plain numbers and its
//! low-rank products), `forward`, `loss` (the objectives at the logits) and `backward`.

mod adapter;
mod backward;
mod elementwise;
mod forward;
mod gemm;
mod loss;
mod workspace;

#[cfg(test)]
pub(crate) mod tests;

pub use workspace::Workspace;

use std::sync::Arc;

use crate::batch::Batch;
use crate::error::ModelError;
use crate::lora::LoraAdapter;
use crate::model::{flat, Adapter, FlatWeights, Llama};
use adapter::LoraData;
use backward::{backward, GradIndex};
use forward::forward;
use loss::{score_rows, token_loss};
use workspace::Dims;

type Result<T> = std::result::Result<T, ModelError>;

fn invalid(msg: String) -> ModelError {
    ModelError::Candle(candle_core::Error::Msg(msg))
}

/// The gradients of an adapter's trainable tensors, in the order of
/// [`LoraAdapter::trainable_vars`].
#[derive(Debug)]
pub struct Gradients {
    pub loss: f64,
    pub grads: Vec<Vec<f32>>,
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
