//! The crate's model error: what building or running the model (and the training step on
//! it) can fail with. Its own module, so that the model, the adapter, checkpoints and the
//! training step all name it without importing one another.

/// Errors from building or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("missing tensor {0} in the checkpoint")]
    MissingTensor(String),
    #[error("tensor {name} has shape {actual:?}, expected {expected:?}")]
    Shape {
        name: String,
        actual: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor {0} contains NaN or infinite values")]
    NonFinite(String),
    #[error("sequence of {needed} positions exceeds max_position_embeddings ({max})")]
    TooLong { needed: usize, max: usize },
    #[error("token id {id} is outside the vocabulary ({vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("the adapter does not fit this model: {0}")]
    AdapterMismatch(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
