//! A local fine-tuning run: windows visited in a seeded random order, optional negatives
//! with their unlikelihood weight, and early stopping.

use super::no_targets;
use super::trainer::{StepStats, TrainConfig, Trainer};
use crate::batch::{split_batches, Batch, Window};
use crate::error::ModelError;
use crate::lora::LoraAdapter;
use crate::model::Llama;

/// Negative windows and the weight of their unlikelihood term in each step's loss.
#[derive(Debug, Clone, Copy)]
pub struct Negatives<'a> {
    pub windows: &'a [Window],
    pub weight: f64,
}

/// Settings of a local fine-tuning run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub optimizer: TrainConfig,
    /// Data-parallel workers per step.
    pub workers: usize,
    pub seed: u64,
}

impl Default for FitConfig {
    fn default() -> Self {
        FitConfig {
            steps: 100,
            batch_size: 16,
            optimizer: TrainConfig {
                lr: 2e-3,
                ..TrainConfig::default()
            },
            workers: 1,
            seed: 0,
        }
    }
}

/// Trains the adapter on windows for `cfg.steps` steps, visiting the windows in a seeded
/// random order, epoch after epoch. `on_step` sees each step's statistics.
pub fn fit(
    model: &Llama,
    adapter: &LoraAdapter,
    windows: &[Window],
    cfg: &FitConfig,
    mut on_step: impl FnMut(usize, StepStats),
) -> Result<(), ModelError> {
    fit_while(model, adapter, windows, None, cfg, |step, stats| {
        on_step(step, stats);
        true
    })
    .map(drop)
}

/// As [`fit`], but stops early when `on_step` returns false (early stopping), and with
/// `negatives` adds their weighted unlikelihood term to every step; returns the
/// steps taken.
pub fn fit_while(
    model: &Llama,
    adapter: &LoraAdapter,
    windows: &[Window],
    negatives: Option<Negatives<'_>>,
    cfg: &FitConfig,
    mut on_step: impl FnMut(usize, StepStats) -> bool,
) -> Result<usize, ModelError> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    if windows.is_empty() {
        return Err(no_targets());
    }
    let mut trainer = Trainer::new(adapter.trainable_vars().to_vec(), cfg.optimizer)?;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = Vec::new();
    for step in 0..cfg.steps {
        let mut picked = Vec::with_capacity(cfg.batch_size);
        while picked.len() < cfg.batch_size.min(windows.len()) {
            if order.is_empty() {
                order = (0..windows.len()).collect();
                order.shuffle(&mut rng);
            }
            picked.push(&windows[order.pop().expect("refilled above")]);
        }
        let parts = split_batches(&picked, cfg.workers, model.device())?;
        let neg = match negatives.filter(|n| !n.windows.is_empty() && n.weight > 0.0) {
            None => None,
            Some(n) => {
                let k = cfg.batch_size.min(n.windows.len());
                let neg: Vec<&Window> = (0..k)
                    .map(|_| &n.windows[rand::Rng::random_range(&mut rng, 0..n.windows.len())])
                    .collect();
                Some((Batch::new(&neg, model.device())?, n.weight))
            }
        };
        let stats =
            trainer.lora_step(model, adapter, &parts, neg.as_ref().map(|(b, w)| (b, *w)))?;
        if !on_step(step, stats) {
            return Ok(step + 1);
        }
    }
    Ok(cfg.steps)
}
