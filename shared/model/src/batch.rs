//! Windows (the slices of an example that fit the model) and the padded batches built from
//! them: what the training step, the loss and evaluation take.

use candle_core::{Device, Tensor};

/// A slice of an example that fits the model: `tokens` (at most `max_len + 1`), and the
/// range of target positions (indices into `tokens`, ≥ 1) the loss covers.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub tokens: Vec<u32>,
    pub targets: std::ops::Range<usize>,
    pub weight: f32,
}

/// A padded batch: inputs and targets `[B, T]` (u32) and loss weights `[B, T]` (f32, zero
/// where no loss is taken).
#[derive(Debug, Clone)]
pub struct Batch {
    pub inputs: Tensor,
    pub targets: Tensor,
    pub weights: Tensor,
}

impl Batch {
    pub fn new(windows: &[&Window], device: &Device) -> candle_core::Result<Self> {
        let t = windows
            .iter()
            .map(|w| w.tokens.len() - 1)
            .max()
            .unwrap_or(0)
            .max(1);
        let b = windows.len();
        let mut inputs = vec![0u32; b * t];
        let mut targets = vec![0u32; b * t];
        let mut weights = vec![0f32; b * t];
        for (i, w) in windows.iter().enumerate() {
            let len = w.tokens.len() - 1;
            inputs[i * t..i * t + len].copy_from_slice(&w.tokens[..len]);
            targets[i * t..i * t + len].copy_from_slice(&w.tokens[1..]);
            for p in w.targets.clone() {
                weights[i * t + p - 1] = w.weight;
            }
        }
        Ok(Batch {
            inputs: Tensor::from_vec(inputs, (b, t), device)?,
            targets: Tensor::from_vec(targets, (b, t), device)?,
            weights: Tensor::from_vec(weights, (b, t), device)?,
        })
    }
}

/// Splits windows into at most `parts` batches of nearly equal size (for data-parallel steps).
pub fn split_batches(
    windows: &[&Window],
    parts: usize,
    device: &Device,
) -> candle_core::Result<Vec<Batch>> {
    let per = windows.len().div_ceil(parts.max(1)).max(1);
    windows.chunks(per).map(|c| Batch::new(c, device)).collect()
}
