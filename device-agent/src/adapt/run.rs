//! The resumable, early-stopped adaptation of one adapter on the user's examples.

use std::path::Path;

use candle_core::Device;
use fedpersona_model::train::{evaluate, fit_while, Example, FitConfig, TrainConfig};
use fedpersona_model::{BaseModel, LoraAdapter};
use serde::Serialize;

use crate::adapt::progress::{self, Progress};
use crate::adapt::Plan;

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
    let held = plan.held_out(examples.len());
    let (train, val) = examples.split_at(examples.len() - held);
    let train_w = super::to_windows(base, train, plan.seq_len)?;
    let val_w = super::to_windows(base, val, plan.seq_len)?;
    anyhow::ensure!(!train_w.is_empty(), "no training text");
    let neg_w = if plan.unlikelihood > 0.0 {
        super::to_windows(base, negatives, plan.seq_len)?
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
        if let Some(p) = progress::load_progress(dir, data)? {
            match progress::load_best(dir, p.best_step) {
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
                        progress::save_progress(
                            dir,
                            shared,
                            (!best_saved).then_some(&best.1),
                            &progress,
                        )?;
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
        progress::clear(dir);
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
