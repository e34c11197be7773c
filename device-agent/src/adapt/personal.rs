//! The device's adaptation on its stored interactions: the one code path the local API runs
//! and the simulation scores.

use fedpersona_model::train::{evaluate, Example};
use fedpersona_model::{BaseModel, LoraAdapter};
use serde::Serialize;

use crate::adapt::{adapt, Data, Gate, Outcome, Plan, RunLimits, Weights};
use crate::user::profile::Profile;
use crate::user::store::Stored;

/// What the device's adaptation is given besides the user's interactions: the settings the
/// profile does not choose.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Settings {
    /// Learning rate before the profile's adjustments ([`Plan::from_profile`]).
    pub lr: f64,
    /// Tokens per window, for training and for the profile's drift scores.
    pub seq_len: usize,
    pub batch_size: usize,
    /// Most steps one run may take.
    pub max_steps: usize,
    /// Weight of the unlikelihood term on rejected suggestions (0: left out, the default).
    pub unlikelihood: f64,
}

impl Settings {
    /// What the local API runs on a device: windows of 128 tokens (or the model's limit),
    /// as many a batch as `max_batch_tokens` allows (1 to 16), lr 1e-3, at most 200 steps.
    pub fn device(base: &BaseModel, max_batch_tokens: usize) -> Settings {
        let seq_len = 128.min(base.model.config().max_position_embeddings);
        Settings {
            lr: 1e-3,
            seq_len,
            batch_size: (max_batch_tokens / seq_len).clamp(1, 16),
            max_steps: 200,
            unlikelihood: 0.0,
        }
    }
}

/// What [`adapt_on_interactions`] planned, what the run did, and what the device should
/// serve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Personalized {
    pub plan: Plan,
    pub outcome: Outcome,
    /// The never-harm check of a finished run (None when the run did not finish).
    pub gate: Option<Gate>,
}

/// The device's adaptation, the one code path the local API runs and the simulation scores:
/// the interactions (oldest first) weighted by [`Weights::default`], the profile at `now_ms`
/// with drift scored by `adapter` as it starts, the plan from the profile and `settings`, and
/// the early-stopped run of [`adapt`] within `budget`, and, when it finished, the never-harm
/// check ([`Gate::check`]) of base, `global` and the result on the held-out slice. `adapter`
/// ends as [`adapt`] leaves it, whatever the check serves.
#[allow(clippy::too_many_arguments)]
pub fn adapt_on_interactions(
    base: &BaseModel,
    adapter: &mut LoraAdapter,
    global: Option<&LoraAdapter>,
    items: &[Stored],
    now_ms: i64,
    settings: &Settings,
    seed: u64,
    budget: RunLimits<'_>,
) -> anyhow::Result<Personalized> {
    let weights = Weights::default();
    let examples = weights.examples(items, now_ms);
    let profile = {
        let start: &LoraAdapter = adapter;
        let scorer = |ex: &[Example]| -> anyhow::Result<f64> {
            let w = super::to_windows(base, ex, settings.seq_len)?;
            Ok(evaluate(&base.model, Some(start), &base.tokenizer, &w, 16)?.loss)
        };
        Profile::compute(items, now_ms, Some(&scorer))?
    };
    let plan = Plan {
        unlikelihood: settings.unlikelihood,
        ..Plan::from_profile(
            &profile,
            examples.len(),
            settings.lr,
            settings.batch_size,
            settings.seq_len,
            settings.max_steps,
        )
    };
    let negatives = if plan.unlikelihood > 0.0 {
        weights.negatives(items, now_ms)
    } else {
        Vec::new()
    };
    let data = Data {
        examples: &examples,
        negatives: &negatives,
        id: items.last().map_or(0, |s| s.id),
    };
    let outcome = adapt(base, adapter, data, &plan, seed, budget)?;
    let gate = if outcome.finished {
        let held = plan.held_out(examples.len());
        let held_out = super::to_windows(base, &examples[examples.len() - held..], plan.seq_len)?;
        Some(Gate::check(base, &held_out, global, adapter)?)
    } else {
        None
    };
    Ok(Personalized {
        plan,
        outcome,
        gate,
    })
}
