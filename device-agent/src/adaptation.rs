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

use std::path::Path;

use anyhow::Context;
use candle_core::Device;
use fedpersona_model::train::{evaluate, fit_while, Example, FitConfig, TrainConfig};
use fedpersona_model::{BaseModel, LoraAdapter};
use fedpersona_privacy::tensors::AdapterTensors;
use serde::{Deserialize, Serialize};

use crate::interactions::{Feedback, Stored};
use crate::profile::Profile;

const DAY_MS: f64 = 86_400_000.0;

/// How examples are weighted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Weights {
    pub no_suggestion: f32,
    pub accepted: f32,
    pub edited: f32,
    pub rejected: f32,
    /// Rating r (1..=5) weighs `rating_1 + (rating_5 - rating_1)·(r - 1)/4`.
    pub rating_1: f32,
    pub rating_5: f32,
    /// Age at which an example's weight halves.
    pub half_life_days: f64,
    /// The least an old example weighs (before feedback).
    pub min_recency: f32,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            no_suggestion: 1.0,
            accepted: 0.75,
            edited: 1.5,
            rejected: 1.25,
            rating_1: 1.5,
            rating_5: 0.5,
            half_life_days: 30.0,
            min_recency: 0.1,
        }
    }
}

impl Weights {
    /// Uniform weights: the plain adaptation the ablation compares against.
    pub fn uniform() -> Self {
        Weights {
            no_suggestion: 1.0,
            accepted: 1.0,
            edited: 1.0,
            rejected: 1.0,
            rating_1: 1.0,
            rating_5: 1.0,
            half_life_days: f64::INFINITY,
            min_recency: 1.0,
        }
    }

    pub fn of(&self, s: &Stored, now_ms: i64) -> f32 {
        let i = &s.interaction;
        let feedback = match i.feedback {
            Feedback::None => self.no_suggestion,
            Feedback::Accepted => self.accepted,
            Feedback::Edited => self.edited,
            Feedback::Rejected => self.rejected,
            Feedback::Rating(r) => {
                self.rating_1 + (self.rating_5 - self.rating_1) * f32::from(r - 1) / 4.0
            }
        };
        let age_days = ((now_ms - i.time_ms).max(0) as f64) / DAY_MS;
        let recency = (0.5f64.powf(age_days / self.half_life_days) as f32).max(self.min_recency);
        feedback * recency
    }

    /// The suggestions the user rejected, in their contexts, weighted by recency: what an
    /// unlikelihood term pushes down.
    pub fn negatives(&self, items: &[Stored], now_ms: i64) -> Vec<Example> {
        items
            .iter()
            .filter(|s| s.interaction.feedback == Feedback::Rejected)
            .filter_map(|s| {
                let text = s.interaction.suggestion.clone().filter(|t| !t.is_empty())?;
                let mut e = Example::new(s.interaction.context.clone(), text);
                let age_days = ((now_ms - s.interaction.time_ms).max(0) as f64) / DAY_MS;
                e.weight =
                    (0.5f64.powf(age_days / self.half_life_days) as f32).max(self.min_recency);
                Some(e)
            })
            .collect()
    }

    /// The interactions as weighted training examples, oldest first.
    pub fn examples(&self, items: &[Stored], now_ms: i64) -> Vec<Example> {
        items
            .iter()
            .map(|s| {
                let mut e = Example::new(s.interaction.context.clone(), s.interaction.text.clone());
                e.weight = self.of(s, now_ms);
                e
            })
            .collect()
    }
}

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
            holdout: 0.1,
            unlikelihood: 0.0,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Outcome {
    pub steps: usize,
    /// Held-out loss of the start and of the kept adapter (None without a held-out slice).
    pub start_loss: Option<f64>,
    pub best_loss: Option<f64>,
    pub best_step: usize,
    pub stopped_early: bool,
    /// False when the time budget ran out first: the progress is saved in the checkpoint
    /// folder and a later run on the same data resumes from it.
    pub finished: bool,
    /// True when [`RunLimits::cancel`] stopped the run: nothing more was saved, and the adapter
    /// is left as it was at the step it stopped (not to be published).
    pub cancelled: bool,
}

/// Saved progress of a resumable run. The checkpoint folder holds the current adapter (PEFT
/// layout) and the best one so far (`best-<best_step>.safetensors`), which a resumed run
/// restores with `best_loss`, so it keeps (and publishes) the best adapter of every part.
#[derive(Debug, Serialize, Deserialize)]
struct Progress {
    /// Identifies the data: the number of examples and the newest interaction's id.
    data: (usize, i64),
    steps: usize,
    best_loss: Option<f64>,
    best_step: usize,
    /// Evaluations without improvement since the best (patience goes on across a resume).
    #[serde(default)]
    stale: usize,
    /// Held-out loss of the adapter the first part started from.
    #[serde(default)]
    start_loss: Option<f64>,
}

const PROGRESS_FILE: &str = "progress.json";

/// The best adapter so far of a resumable run, by the step it was scored at.
fn best_file(dir: &Path, step: usize) -> std::path::PathBuf {
    dir.join(format!("best-{step}.safetensors"))
}

/// Removes the best-adapter files of `dir`, except the one of step `keep`.
fn remove_best_files(dir: &Path, keep: Option<usize>) {
    let keep = keep.map(|s| best_file(dir, s));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("best-")
            && name.ends_with(".safetensors")
            && Some(&path) != keep.as_ref()
        {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Where a run keeps its progress, and until when it may run.
#[derive(Debug, Clone, Copy)]
pub struct RunLimits<'a> {
    /// Checkpoint folder (PEFT adapter + progress) for resuming.
    pub checkpoint: Option<&'a Path>,
    /// Stop at the first evaluation after this instant (progress saved).
    pub deadline: Option<std::time::Instant>,
    /// Asked after every training step; true stops the run at once (nothing saved).
    pub cancel: Option<Cancel<'a>>,
}

/// Whether to give a run up now (the local API sets it when the user asks to forget their
/// data).
#[derive(Clone, Copy)]
pub struct Cancel<'a>(pub &'a (dyn Fn() -> bool + Sync));

impl std::fmt::Debug for Cancel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cancel(..)")
    }
}

/// What a run trains on.
#[derive(Debug, Clone, Copy)]
pub struct Data<'a> {
    /// The user's text, oldest first.
    pub examples: &'a [Example],
    /// Rejected suggestions (used with [`Plan::unlikelihood`]).
    pub negatives: &'a [Example],
    /// Identifies the data for resuming (e.g. the newest interaction's id).
    pub id: i64,
}

/// Adapts `adapter` in place on `data` by `plan`. The adapter ends as the best one on the
/// held-out slice (or the last, without one); a run resumed from a checkpoint keeps the best
/// adapter of the parts before it.
pub fn adapt(
    base: &BaseModel,
    adapter: &mut LoraAdapter,
    data: Data<'_>,
    plan: &Plan,
    seed: u64,
    budget: RunLimits<'_>,
) -> anyhow::Result<Outcome> {
    let Data {
        examples,
        negatives,
        id: data_id,
    } = data;
    let checkpoint = budget.checkpoint;
    anyhow::ensure!(!examples.is_empty(), "no examples to adapt on");
    let held = if plan.holdout > 0.0 && examples.len() >= 10 {
        ((examples.len() as f64 * plan.holdout).ceil() as usize).max(2)
    } else {
        0
    };
    let (train, val) = examples.split_at(examples.len() - held);
    let train_w = crate::adapt::to_windows(base, train, plan.seq_len)?;
    let val_w = crate::adapt::to_windows(base, val, plan.seq_len)?;
    anyhow::ensure!(!train_w.is_empty(), "no training text");
    let neg_w = if plan.unlikelihood > 0.0 {
        crate::adapt::to_windows(base, negatives, plan.seq_len)?
    } else {
        Vec::new()
    };
    let negatives = fedpersona_model::train::Negatives {
        windows: &neg_w,
        weight: plan.unlikelihood,
    };
    let score = |a: &LoraAdapter| -> anyhow::Result<Option<f64>> {
        if val_w.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            evaluate(&base.model, Some(a), &base.tokenizer, &val_w, 16)?.loss,
        ))
    };

    let data = (examples.len(), data_id);
    let mut done = 0;
    let mut best_step = 0;
    let mut stale = 0;
    // A resumed run goes on from the saved adapter with the best one so far, its loss, the
    // start's loss and the patience already spent.
    let mut resumed = None;
    if let Some(dir) = checkpoint {
        if let Some(p) = load_progress(dir, data)? {
            match load_best(dir, p.best_step) {
                Ok(best) => {
                    let saved = LoraAdapter::load(dir, base.model.config(), &Device::Cpu)?;
                    adapter.set_tensors(&saved.to_tensors()?)?;
                    done = p.steps;
                    best_step = p.best_step;
                    stale = p.stale;
                    resumed = Some((p.start_loss, p.best_loss, best));
                }
                // Progress without its best adapter (an older checkpoint): resuming would
                // lose the best, so the run starts over.
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "not resuming"),
            }
        }
    }
    let resuming = resumed.is_some();
    let (start_loss, mut best) = match resumed {
        Some((start_loss, best_loss, best)) => (start_loss, (best_loss, best)),
        None => {
            let start_loss = score(adapter)?;
            (start_loss, (start_loss, adapter.to_tensors()?))
        }
    };
    // Whether the checkpoint holds `best` (a resumed run's does).
    let mut best_saved = resuming;
    let remaining = plan.max_steps.saturating_sub(done);
    let cfg = FitConfig {
        steps: remaining,
        batch_size: plan.batch_size,
        optimizer: TrainConfig {
            lr: plan.lr,
            ..TrainConfig::default()
        },
        workers: 1,
        seed: seed ^ done as u64,
    };
    let mut error = None;
    let mut stopped_early = false;
    let mut out_of_time = false;
    let mut cancelled = false;
    let shared: &LoraAdapter = adapter;
    let taken = if remaining == 0 {
        0
    } else {
        fit_while(
            &base.model,
            shared,
            &train_w,
            Some(negatives),
            &cfg,
            |step, _| {
                if budget.cancel.is_some_and(|c| (c.0)()) {
                    cancelled = true;
                    return false;
                }
                let step = done + step + 1;
                if val_w.is_empty() || step % plan.eval_every.max(1) != 0 {
                    return true;
                }
                let result = (|| -> anyhow::Result<bool> {
                    let loss = score(shared)?;
                    if loss < best.0 || best.0.is_none() {
                        best = (loss, shared.to_tensors()?);
                        best_step = step;
                        best_saved = false;
                        stale = 0;
                    } else {
                        stale += 1;
                    }
                    if let Some(dir) = checkpoint {
                        let progress = Progress {
                            data,
                            steps: step,
                            best_loss: best.0,
                            best_step,
                            stale,
                            start_loss,
                        };
                        save_progress(dir, shared, (!best_saved).then_some(&best.1), &progress)?;
                        best_saved = true;
                    }
                    out_of_time = budget
                        .deadline
                        .is_some_and(|d| std::time::Instant::now() >= d);
                    Ok(stale < plan.patience && !out_of_time)
                })();
                match result {
                    Ok(go_on) => {
                        stopped_early = !go_on && !out_of_time;
                        go_on
                    }
                    Err(e) => {
                        error = Some(e);
                        false
                    }
                }
            },
        )?
    };
    if let Some(e) = error {
        return Err(e);
    }
    if cancelled || out_of_time {
        // Out of time, the checkpoint holds the current adapter, the best one and the steps;
        // either way `adapter` is left as it is.
        return Ok(Outcome {
            steps: done + taken,
            start_loss,
            best_loss: best.0,
            best_step,
            stopped_early: false,
            finished: false,
            cancelled,
        });
    }
    if !val_w.is_empty() {
        adapter.set_tensors(&best.1)?;
    }
    if let Some(dir) = checkpoint {
        let _ = std::fs::remove_file(dir.join(PROGRESS_FILE));
        remove_best_files(dir, None);
    }
    Ok(Outcome {
        steps: done + taken,
        start_loss,
        best_loss: best.0,
        best_step,
        stopped_early,
        finished: true,
        cancelled: false,
    })
}

fn load_progress(dir: &Path, data: (usize, i64)) -> anyhow::Result<Option<Progress>> {
    let path = dir.join(PROGRESS_FILE);
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(None);
    };
    let p: Progress =
        serde_json::from_slice(&bytes).with_context(|| format!("{} is corrupt", path.display()))?;
    Ok((p.data == data).then_some(p))
}

/// The best adapter of a resumable run, saved when it was scored at `step`.
fn load_best(dir: &Path, step: usize) -> anyhow::Result<AdapterTensors> {
    let path = best_file(dir, step);
    let named = fedpersona_model::checkpoint::load_safetensors(&path)
        .with_context(|| format!("the best adapter of {}", dir.display()))?;
    fedpersona_model::tensors::from_named(named)
        .with_context(|| format!("{} is corrupt", path.display()))
}

/// Saves the current adapter, the best one if it changed since the last save, then the
/// progress that names it: `progress.json` is written last, and best files it does not name
/// are removed only after it, so a crash at any point leaves a consistent checkpoint.
fn save_progress(
    dir: &Path,
    adapter: &LoraAdapter,
    best: Option<&AdapterTensors>,
    progress: &Progress,
) -> anyhow::Result<()> {
    adapter.save(dir)?;
    if let Some(best) = best {
        fedpersona_model::checkpoint::save_safetensors(
            &best_file(dir, progress.best_step),
            &fedpersona_model::tensors::into_named(best.clone()),
        )?;
    }
    fedpersona_model::checkpoint::write_atomic(
        &dir.join(PROGRESS_FILE),
        &serde_json::to_vec(progress).expect("plain struct"),
    )?;
    remove_best_files(dir, Some(progress.best_step));
    Ok(())
}

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

/// What [`adapt_on_interactions`] planned and what the run did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Personalized {
    pub plan: Plan,
    pub outcome: Outcome,
}

/// The device's adaptation, the one code path the local API runs and the simulation scores:
/// the interactions (oldest first) weighted by [`Weights::default`], the profile at `now_ms`
/// with drift scored by `adapter` as it starts, the plan from the profile and `settings`, and
/// the early-stopped run of [`adapt`] within `budget`. `adapter` ends as [`adapt`] leaves it.
pub fn adapt_on_interactions(
    base: &BaseModel,
    adapter: &mut LoraAdapter,
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
            let w = crate::adapt::to_windows(base, ex, settings.seq_len)?;
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
    Ok(Personalized { plan, outcome })
}

/// Character-level similarity of a suggestion to what the user wrote: 1 − Levenshtein
/// distance / the longer length (1: identical, 0: nothing in common).
pub fn similarity(a: &str, b: &str) -> f64 {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let longest = a.len().max(b.len());
    if longest == 0 {
        return 1.0;
    }
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    1.0 - row[b.len()] as f64 / longest as f64
}

/// The feedback a simulated user gives a suggestion, from its similarity to what they wrote:
/// at least 0.6 accepted (little to change), at least 0.3 edited, below rejected.
pub fn simulated_feedback(suggestion: &str, written: &str) -> Feedback {
    match similarity(suggestion, written) {
        s if s >= 0.6 => Feedback::Accepted,
        s if s >= 0.3 => Feedback::Edited,
        _ => Feedback::Rejected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interactions::Interaction;

    fn stored(time_ms: i64, feedback: Feedback) -> Stored {
        Stored {
            id: 1,
            interaction: Interaction {
                time_ms,
                context: None,
                suggestion: None,
                text: "t".into(),
                feedback,
                app: "a".into(),
                kind: "k".into(),
            },
        }
    }

    #[test]
    fn weights_follow_feedback_and_recency() {
        let w = Weights::default();
        let now = 100 * DAY_MS as i64;
        let fresh = |f| w.of(&stored(now, f), now);
        assert!(fresh(Feedback::Edited) > fresh(Feedback::Rejected));
        assert!(fresh(Feedback::Rejected) > fresh(Feedback::None));
        assert!(fresh(Feedback::None) > fresh(Feedback::Accepted));
        assert!(fresh(Feedback::Rating(1)) > fresh(Feedback::Rating(5)));
        assert_eq!(fresh(Feedback::Rating(3)), 1.0);
        let month_old = w.of(&stored(now - 30 * DAY_MS as i64, Feedback::None), now);
        assert!((month_old - 0.5).abs() < 1e-6);
        let ancient = w.of(&stored(0, Feedback::None), now);
        assert_eq!(ancient, 0.1);
        let u = Weights::uniform();
        assert_eq!(u.of(&stored(0, Feedback::Edited), now), 1.0);
    }

    #[test]
    fn similarity_is_one_minus_normalized_edit_distance() {
        assert_eq!(similarity("abc", "abc"), 1.0);
        assert_eq!(similarity("", ""), 1.0);
        assert_eq!(similarity("abc", ""), 0.0);
        assert!((similarity("kitten", "sitting") - (1.0 - 3.0 / 7.0)).abs() < 1e-12);
        assert_eq!(
            simulated_feedback("to be or not", "to be or not"),
            Feedback::Accepted
        );
        assert_eq!(
            simulated_feedback("xyz", "to be or not"),
            Feedback::Rejected
        );
    }
}
