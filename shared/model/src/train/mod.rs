//! Training and evaluation: examples as token windows with per-token loss masks and
//! per-example weights, the causal LM loss, AdamW over trainable vars with gradient-norm
//! clipping, and evaluation (loss, bits per byte, next-token accuracy).
//!
//! `example`: examples and their windows; `loss`: the causal-LM and unlikelihood losses
//! through candle's autograd; `trainer`: AdamW with clipping, and the LoRA step over the
//! worker pool; `fit`: a local fine-tuning run; `eval`: scoring windows.

mod eval;
mod example;
mod fit;
mod loss;
mod trainer;

#[cfg(test)]
mod tests;

pub use crate::batch::{split_batches, Batch, Window};
pub use eval::{evaluate, evaluate_each, EvalReport};
pub use example::{tokenize, windows, Example, TokenizedExample, SEP};
pub use fit::{fit, fit_while, FitConfig, Negatives};
pub use loss::{loss, loss_part, unlikelihood_part};
pub use trainer::{StepStats, TrainConfig, Trainer};

use candle_core::Tensor;

use crate::error::ModelError;

/// The data-parallel training workers: one thread per core, alive as long as the process, so
/// gemm's per-thread packing buffers (and the pages behind them) are reused from step to step
/// instead of allocated again. Rayon's global pool is not used: `RAYON_NUM_THREADS` sizes it
/// for candle's kernels (see [`crate::runtime::set_kernel_threads`]).
fn worker_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
            .thread_name(|i| format!("train-worker-{i}"))
            .build()
            .expect("the training worker threads could not be started")
    })
}

fn non_finite_weights() -> ModelError {
    ModelError::Candle(candle_core::Error::Msg(
        "batch weights are not finite numbers".into(),
    ))
}

fn no_targets() -> ModelError {
    ModelError::Candle(candle_core::Error::Msg("batch has no target tokens".into()))
}

fn finite_loss(loss: &Tensor) -> Result<f64, ModelError> {
    let v = loss.to_scalar::<f32>()? as f64;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(ModelError::Candle(candle_core::Error::Msg(format!(
            "loss is {v}; refusing to update"
        ))))
    }
}
