//! The adapter as plain numbers for one step, and the low-rank parts of a projection's
//! forward and backward pass.

use super::gemm::{a_b, a_bt, at_b};
use super::Result;
use crate::lora::LoraAdapter;
use crate::model::{flat, Target};

pub(super) struct LoraPairData {
    a: Vec<f32>,
    b: Vec<f32>,
}

pub(super) struct LoraData {
    pub(super) scale: f32,
    pub(super) rank: usize,
    pub(super) train_a: bool,
    /// `[layer][target]`.
    pairs: Vec<[Option<LoraPairData>; Target::COUNT]>,
    /// Adapted targets in the adapter config's order (the order of its trainable vars).
    pub(super) targets: Vec<Target>,
}

impl LoraData {
    pub(super) fn new(adapter: &LoraAdapter, layers: usize) -> Result<Self> {
        let cfg = adapter.config();
        let mut pairs = Vec::with_capacity(layers);
        for l in 0..layers {
            let mut slot: [Option<LoraPairData>; Target::COUNT] = Default::default();
            for t in Target::ALL {
                if let Some(p) = adapter.pair(l, t) {
                    slot[t as usize] = Some(LoraPairData {
                        a: flat(&p.a)?,
                        b: flat(&p.b)?,
                    });
                }
            }
            pairs.push(slot);
        }
        Ok(LoraData {
            scale: adapter.scale() as f32,
            rank: cfg.rank,
            train_a: !cfg.freeze_a,
            pairs,
            targets: cfg.targets.clone(),
        })
    }

    /// No adapter: the base model.
    pub(super) fn none(layers: usize) -> Self {
        LoraData {
            scale: 0.0,
            rank: 0,
            train_a: false,
            pairs: (0..layers).map(|_| Default::default()).collect(),
            targets: Vec::new(),
        }
    }

    pub(super) fn pair(&self, l: usize, t: Target) -> Option<&LoraPairData> {
        self.pairs[l][t as usize].as_ref()
    }
}

/// `y[:, off..off + out] += s · (x·Aᵀ)·Bᵀ`, saving `x·Aᵀ` in `xa`.
#[allow(clippy::too_many_arguments)]
pub(super) fn lora_forward(
    p: &LoraPairData,
    s: f32,
    (n, din, dout, rank): (usize, usize, usize, usize),
    x: &[f32],
    xa: &mut [f32],
    y: &mut [f32],
    ldy: usize,
) {
    a_bt((n, rank, din), xa, rank, false, x, din, &p.a, din, 1.0);
    a_bt((n, dout, rank), y, ldy, true, xa, rank, &p.b, rank, s);
}

/// The gradients of A and B from the output gradient `dy` (`[n, out]` at stride `ldy`), and
/// with `dx` the input gradient's low-rank part added to it.
#[allow(clippy::too_many_arguments)]
pub(super) fn lora_backward(
    p: &LoraPairData,
    s: f32,
    (n, din, dout, rank): (usize, usize, usize, usize),
    x: &[f32],
    xa: &[f32],
    dy: &[f32],
    ldy: usize,
    dxa: &mut [f32],
    grad_a: Option<&mut [f32]>,
    grad_b: &mut [f32],
    dx: Option<&mut [f32]>,
) {
    at_b((dout, rank, n), grad_b, rank, false, dy, ldy, xa, rank, s);
    a_b((n, rank, dout), dxa, rank, false, dy, ldy, &p.b, rank, s);
    if let Some(ga) = grad_a {
        at_b((rank, din, n), ga, din, false, dxa, rank, x, din, 1.0);
    }
    if let Some(dx) = dx {
        a_b((n, din, rank), dx, din, true, dxa, rank, &p.a, din, 1.0);
    }
}
