//! The step's shapes and buffers: [`Workspace`], one per worker, reused from step to step.

use crate::model::Target;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Dims {
    /// Sequences, positions, rows (`b·t`).
    pub(super) b: usize,
    pub(super) t: usize,
    pub(super) n: usize,
    pub(super) hidden: usize,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    /// Widths of q, of k (= of v), and of the fused q|k|v row.
    pub(super) q: usize,
    pub(super) kv: usize,
    pub(super) qkv: usize,
    pub(super) inter: usize,
    pub(super) vocab: usize,
    pub(super) rank: usize,
    pub(super) eps: f32,
}

impl Dims {
    /// Column offset and width of a projection's output in its fused row.
    pub(super) fn slot(&self, t: Target) -> (usize, usize) {
        match t {
            Target::Q => (0, self.q),
            Target::K => (self.q, self.kv),
            Target::V => (self.q + self.kv, self.kv),
            Target::Gate => (0, self.inter),
            Target::Up => (self.inter, self.inter),
            Target::O | Target::Down => (0, self.hidden),
        }
    }

    /// Width of a projection's input.
    pub(super) fn input(&self, t: Target) -> usize {
        match t {
            Target::O => self.q,
            Target::Down => self.inter,
            _ => self.hidden,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Buffers.

/// Saved activations of one decoder layer.
#[derive(Debug, Default)]
pub(super) struct LayerBuffers {
    /// RMSNorm inverse scales and outputs before attention and before the MLP.
    pub(super) inv1: Vec<f32>,
    pub(super) h1: Vec<f32>,
    pub(super) inv2: Vec<f32>,
    pub(super) h2: Vec<f32>,
    /// q|k|v after rotary embeddings, `[n, q + 2·kv]`.
    pub(super) qkv: Vec<f32>,
    /// Attention probabilities `[b, heads, t, t]` (one head's when scoring).
    pub(super) probs: Vec<f32>,
    /// Attention output (the o projection's input), `[n, q]`.
    pub(super) att: Vec<f32>,
    /// The residual stream after attention.
    pub(super) mid: Vec<f32>,
    /// gate|up, `[n, 2·inter]`, and SiLU(gate)·up, `[n, inter]`.
    pub(super) gate_up: Vec<f32>,
    pub(super) act: Vec<f32>,
    /// `x·Aᵀ` of each adapted projection, `[n, rank]`.
    pub(super) xa: [Vec<f32>; Target::COUNT],
}

/// One worker's buffers, reused from step to step (they grow to the largest batch seen).
#[derive(Debug, Default)]
pub struct Workspace {
    /// What the buffers are sized for: shapes, layers, and whether for training.
    pub(super) key: Option<(Dims, usize, bool)>,
    pub(super) layers: Vec<LayerBuffers>,
    /// The residual stream entering each layer, and leaving the last.
    pub(super) stream: Vec<Vec<f32>>,
    pub(super) inv_final: Vec<f32>,
    pub(super) h_final: Vec<f32>,
    /// Logits, then their gradient.
    pub(super) logits: Vec<f32>,
    /// Gradients: of the residual stream, of a normalized input, of q|k|v, of the attention
    /// output, of gate|up and of SiLU(gate)·up; one head's score gradients; `x·Aᵀ`'s.
    pub(super) dx: Vec<f32>,
    pub(super) dh: Vec<f32>,
    pub(super) dqkv: Vec<f32>,
    pub(super) datt: Vec<f32>,
    pub(super) dgate_up: Vec<f32>,
    pub(super) dact: Vec<f32>,
    pub(super) dscores: Vec<f32>,
    pub(super) dxa: Vec<f32>,
    pub(super) tokens: Vec<u32>,
    pub(super) targets: Vec<u32>,
    pub(super) weights: Vec<f32>,
}

fn size(v: &mut Vec<f32>, n: usize) {
    if v.len() != n {
        v.resize(n, 0.0);
    }
}

impl Workspace {
    pub(super) fn prepare(&mut self, d: Dims, layers: usize, training: bool) {
        let key = (d, layers, training);
        if self.key == Some(key) {
            return;
        }
        let n = d.n;
        let (slots, streams) = if training {
            (layers, layers + 1)
        } else {
            (1, 2)
        };
        self.layers.resize_with(slots, Default::default);
        for lb in &mut self.layers {
            size(&mut lb.inv1, n);
            size(&mut lb.h1, n * d.hidden);
            size(&mut lb.inv2, n);
            size(&mut lb.h2, n * d.hidden);
            size(&mut lb.qkv, n * d.qkv);
            // Scoring needs one head's probabilities at a time.
            let heads = if training { d.b * d.heads } else { 1 };
            size(&mut lb.probs, heads * d.t * d.t);
            size(&mut lb.att, n * d.q);
            size(&mut lb.mid, n * d.hidden);
            size(&mut lb.gate_up, n * 2 * d.inter);
            size(&mut lb.act, n * d.inter);
            for xa in &mut lb.xa {
                size(xa, n * d.rank);
            }
        }
        self.stream.resize_with(streams, Vec::new);
        for s in &mut self.stream {
            size(s, n * d.hidden);
        }
        size(&mut self.inv_final, n);
        size(&mut self.h_final, n * d.hidden);
        size(&mut self.logits, n * d.vocab);
        self.key = Some(key);
        if !training {
            return;
        }
        size(&mut self.dx, n * d.hidden);
        size(&mut self.dh, n * d.hidden);
        size(&mut self.dqkv, n * d.qkv);
        size(&mut self.datt, n * d.q);
        size(&mut self.dgate_up, n * 2 * d.inter);
        size(&mut self.dact, n * d.inter);
        size(&mut self.dscores, d.t * d.t);
        size(&mut self.dxa, n * d.rank);
    }
}
