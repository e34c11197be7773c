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
    use rayon::prelude::*;
    // The chunks are scored on the training workers: one run of consecutive chunks and one
    // workspace per worker, so at most that many workspaces exist at once.
    model.flat_weights()?;
    let chunks: Vec<&[Window]> = windows.chunks(batch_size.max(1)).collect();
    let pool = worker_pool();
    let per_worker = chunks.len().div_ceil(pool.current_num_threads()).max(1);
    let sums = pool.install(|| {
        chunks
            .par_chunks(per_worker)
            .map(|run| {
                let mut ws = Workspace::default();
                run.iter()
                    .map(|chunk| score_chunk(model, adapter, tok, chunk, &mut ws))
                    .collect::<Result<Vec<_>, ModelError>>()
            })
            .collect::<Result<Vec<_>, ModelError>>()
    })?;
    let (mut nll_sum, mut correct, mut count, mut bytes) = (0f64, 0usize, 0usize, 0usize);
    for s in sums.into_iter().flatten() {
        nll_sum += s.nll;
        correct += s.correct;
        count += s.count;
        bytes += s.bytes;
    }
    let n = count.max(1) as f64;
    Ok(EvalReport {
        loss: nll_sum / n,
        bits_per_byte: nll_sum / std::f64::consts::LN_2 / bytes.max(1) as f64,
        accuracy: correct as f64 / n,
        tokens: count,
    })
}

/// Sums over one chunk of windows.
struct ChunkScore {
    nll: f64,
    correct: usize,
    count: usize,
    bytes: usize,
}

fn score_chunk(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    tok: &Tokenizer,
    chunk: &[Window],
    ws: &mut Workspace,
) -> Result<ChunkScore, ModelError> {
    let refs: Vec<&Window> = chunk.iter().collect();
    let batch = Batch::new(&refs, model.device())?;
    let t = batch.inputs.dim(1)?;
    let scores = lora_step::score(model, adapter, &batch, ws)?;
    let mut out = ChunkScore {
        nll: 0.0,
        correct: 0,
        count: 0,
        bytes: 0,
    };
    for (i, w) in chunk.iter().enumerate() {
        for p in w.targets.clone() {
            let s = scores[i * t + p - 1];
            out.nll += f64::from(s.nll);
            out.correct += usize::from(s.correct);
            out.count += 1;
        }
        out.bytes += tok
            .byte_len(&w.tokens[w.targets.clone()])
            .map_err(|e| ModelError::Candle(candle_core::Error::Msg(e.to_string())))?;
    }
    Ok(out)
}
