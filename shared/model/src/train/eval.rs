//! Evaluation: loss, bits per byte and next-token accuracy over windows, scored by the LoRA
//! step's forward pass on the training workers.

use super::worker_pool;
use crate::batch::{Batch, Window};
use crate::error::ModelError;
use crate::lora::LoraAdapter;
use crate::lora_step::{self, Workspace};
use crate::model::Llama;
use crate::tokenizer::Tokenizer;

/// Evaluation figures over a set of windows.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct EvalReport {
    /// Mean NLL per target token, in nats.
    pub loss: f64,
    pub bits_per_byte: f64,
    /// Next-token accuracy (argmax).
    pub accuracy: f64,
    pub tokens: usize,
}

/// Scores windows (unweighted: every target token counts once), through
/// [`lora_step::score`].
pub fn evaluate(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    tok: &Tokenizer,
    windows: &[Window],
    batch_size: usize,
) -> Result<EvalReport, ModelError> {
    let mut total = WindowScore::default();
    for s in score_windows(model, adapter, tok, windows, batch_size)? {
        total.nll += s.nll;
        total.correct += s.correct;
        total.count += s.count;
        total.bytes += s.bytes;
    }
    Ok(total.report())
}

/// Scores each window on its own: one report per window, in order (batched as
/// [`evaluate`] batches them).
pub fn evaluate_each(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    tok: &Tokenizer,
    windows: &[Window],
    batch_size: usize,
) -> Result<Vec<EvalReport>, ModelError> {
    Ok(score_windows(model, adapter, tok, windows, batch_size)?
        .iter()
        .map(WindowScore::report)
        .collect())
}

/// Per-window sums, in window order.
fn score_windows(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    tok: &Tokenizer,
    windows: &[Window],
    batch_size: usize,
) -> Result<Vec<WindowScore>, ModelError> {
    use rayon::prelude::*;
    // The chunks are scored on the training workers: one run of consecutive chunks and one
    // workspace per worker, so at most that many workspaces exist at once.
    model.flat_weights()?;
    let chunks: Vec<&[Window]> = windows.chunks(batch_size.max(1)).collect();
    let pool = worker_pool();
    let per_worker = chunks.len().div_ceil(pool.current_num_threads()).max(1);
    let runs = pool.install(|| {
        chunks
            .par_chunks(per_worker)
            .map(|run| {
                let mut ws = Workspace::default();
                let mut out = Vec::new();
                for chunk in run {
                    out.extend(score_chunk(model, adapter, tok, chunk, &mut ws)?);
                }
                Ok(out)
            })
            .collect::<Result<Vec<_>, ModelError>>()
    })?;
    Ok(runs.into_iter().flatten().collect())
}

/// Sums over one window's target tokens.
#[derive(Debug, Default)]
struct WindowScore {
    nll: f64,
    correct: usize,
    count: usize,
    bytes: usize,
}

impl WindowScore {
    fn report(&self) -> EvalReport {
        let n = self.count.max(1) as f64;
        EvalReport {
            loss: self.nll / n,
            bits_per_byte: self.nll / std::f64::consts::LN_2 / self.bytes.max(1) as f64,
            accuracy: self.correct as f64 / n,
            tokens: self.count,
        }
    }
}

fn score_chunk(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    tok: &Tokenizer,
    chunk: &[Window],
    ws: &mut Workspace,
) -> Result<Vec<WindowScore>, ModelError> {
    let refs: Vec<&Window> = chunk.iter().collect();
    let batch = Batch::new(&refs, model.device())?;
    let t = batch.inputs.dim(1)?;
    let scores = lora_step::score(model, adapter, &batch, ws)?;
    let mut out = Vec::with_capacity(chunk.len());
    for (i, w) in chunk.iter().enumerate() {
        let mut one = WindowScore::default();
        for p in w.targets.clone() {
            let s = scores[i * t + p - 1];
            one.nll += f64::from(s.nll);
            one.correct += usize::from(s.correct);
            one.count += 1;
        }
        one.bytes = tok
            .byte_len(&w.tokens[w.targets.clone()])
            .map_err(|e| ModelError::Candle(candle_core::Error::Msg(e.to_string())))?;
        out.push(one);
    }
    Ok(out)
}
