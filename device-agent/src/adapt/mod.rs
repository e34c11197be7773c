//! The neural adaptation layer: personal LoRA training on the user's own interactions,
//! weighted and scheduled by the profile.
//!
//! * **Objective**: next-token prediction on what the user wrote, conditioned on its context
//!   (the loss covers only the user's tokens: `train::tokenize`).
//! * **Weights** ([`Weights`]): feedback says where the model was wrong, so text the user
//!   wrote after editing or rejecting a suggestion counts more than text that only accepted
//!   it; explicit ratings likewise (a low rating: the suggestion missed). Older text counts
//!   less (exponential decay with a half-life, floored). Rejected suggestions can be pushed
//!   down by an unlikelihood term (`Plan::unlikelihood`); the default leaves them out, as
//!   the simulation's ablation measured (see README).
//! * **Plan** ([`Plan::from_profile`]): steps from the data volume (a few epochs, capped),
//!   the learning rate raised when the user's recent text drifts from the adapter and lowered
//!   when suggestions are mostly accepted.
//! * **Early stopping**: the user's most recent interactions are held out; the adapter is
//!   scored on them every few steps, and the best one is kept.
//! * **Resumable**: with a checkpoint folder, progress (adapter and steps) is saved at each
//!   evaluation, and a run over the same data resumes from it.

//!
//! Modules, bottom to top: [`weights`] reads the interactions (and the profile,
//! [`crate::user::profile`]), [`plan`] sizes a run, [`run`] is the run itself with its
//! checkpoint (`progress`), [`gate`] is the never-harm check, and [`personal`] puts them
//! together as the device runs them.

pub mod gate;
pub mod personal;
pub mod plan;
mod progress;
pub mod run;
pub mod weights;

use anyhow::bail;
use fedpersona_model::train::{tokenize, windows, Example, Window};
use fedpersona_model::{BaseModel, Target};

pub use gate::{held_out_len, Gate, Served, HOLDOUT_SHARE};
pub use personal::{adapt_on_interactions, Personalized, Settings};
pub use plan::Plan;
pub use run::{adapt, Cancel, Data, Outcome, RunLimits};
pub use weights::Weights;

/// The LoRA targets named in a comma-separated list (any of q,k,v,o,gate,up,down).
pub fn parse_targets(s: &str) -> anyhow::Result<Vec<Target>> {
    let mut out = Vec::new();
    for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match Target::parse(name) {
            Some(t) => out.push(t),
            None => bail!("unknown target {name:?}: use q, k, v, o, gate, up or down"),
        }
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        bail!("--targets names no projection");
    }
    Ok(out)
}

/// Tokenized windows of examples for a model.
pub fn to_windows(
    base: &BaseModel,
    examples: &[Example],
    seq_len: usize,
) -> anyhow::Result<Vec<Window>> {
    let mut out = Vec::new();
    for ex in examples {
        out.extend(windows(
            &tokenize(&base.tokenizer, base.bos(), ex)?,
            seq_len,
        ));
    }
    Ok(out)
}
