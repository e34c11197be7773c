//! How long and how fast one adaptation runs.

use serde::Serialize;

use crate::adapt::gate::{held_out_len, HOLDOUT_SHARE};
use crate::user::profile::Profile;

/// How long and how fast to adapt.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Plan {
    pub max_steps: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub seq_len: usize,
    /// Score the held-out slice every this many steps.
    pub eval_every: usize,
    /// Stop after this many evaluations without improvement.
    pub patience: usize,
    /// Share of the most recent examples held out for early stopping.
    pub holdout: f64,
    /// Weight of the unlikelihood term on rejected suggestions (0: they are left out).
    pub unlikelihood: f64,
}

impl Plan {
    /// A fixed plan: `steps` steps at `lr`, no early stopping (the ablation's plain arm).
    pub fn fixed(steps: usize, lr: f64, batch_size: usize, seq_len: usize) -> Self {
        Plan {
            max_steps: steps,
            lr,
            batch_size,
            seq_len,
            eval_every: usize::MAX,
            patience: usize::MAX,
            holdout: 0.0,
            unlikelihood: 0.0,
        }
    }

    /// Chosen from the profile: about three epochs of the data (4 to `cap` steps); the
    /// learning rate `lr` ×1.5 when recent text fits the adapter clearly worse than older text
    /// (drift), ×0.5 when most suggestions are accepted.
    pub fn from_profile(
        p: &Profile,
        examples: usize,
        lr: f64,
        batch_size: usize,
        seq_len: usize,
        cap: usize,
    ) -> Self {
        let epochs_steps = (3 * examples).div_ceil(batch_size.max(1));
        let mut lr = lr;
        if p.drift.is_some_and(|d| d.shift > 0.1) {
            lr *= 1.5;
        }
        if p.acceptance_rate.is_some_and(|a| a > 0.7) {
            lr *= 0.5;
        }
        Plan {
            max_steps: epochs_steps.clamp(4, cap.max(4)),
            lr,
            batch_size,
            seq_len,
            eval_every: 2,
            patience: 2,
            holdout: HOLDOUT_SHARE,
            unlikelihood: 0.0,
        }
    }
}

impl Plan {
    /// How many of `examples` (the newest) are held out: for early stopping and for the
    /// never-harm check. None below 10 examples.
    pub fn held_out(&self, examples: usize) -> usize {
        held_out_len(examples, self.holdout)
    }
}
