//! What the forward pass needs of an adapter. The plain model knows adapters only through
//! this trait; the LoRA adapter (`crate::lora::LoraAdapter`) implements it, so the LoRA
//! layer sits above the model as PEFT wraps a base model.

use candle_core::Tensor;

use super::Target;
use crate::config::LlamaConfig;
use crate::error::ModelError;

/// A low-rank adapter of some projections: [`Llama::forward`](super::Llama::forward) adds
/// `scale · (x·Aᵀ)·Bᵀ` to each adapted projection's output, and
/// [`Llama::merged`](super::Llama::merged) folds `scale · B·A` into the weight.
pub trait Adapter {
    /// Checks that the adapter fits a model of this config: its layer count and every
    /// factor's shape.
    fn check_fits(&self, model: &LlamaConfig) -> Result<(), ModelError>;

    /// The factors `(A, B)` of an adapted projection, `A: [rank, in]`, `B: [out, rank]`;
    /// `None` where the projection is not adapted.
    fn factors(&self, layer: usize, target: Target) -> Option<(&Tensor, &Tensor)>;

    /// The output scaling of the low-rank path.
    fn scale(&self) -> f64;
}
