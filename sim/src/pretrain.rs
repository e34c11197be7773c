//! Pretraining the shipped byte-level base model on the public plays: full-weight training
//! from a seed, with a warm-up + cosine learning-rate schedule and data-parallel steps.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use fedpersona_model::config::LlamaConfig;
use fedpersona_model::data::{Speech, PUBLIC_PLAYS};
use fedpersona_model::model::{Llama, ModelError};
use fedpersona_model::tokenizer::Tokenizer;
use fedpersona_model::train::{
    self, evaluate, tokenize, windows, EvalReport, Example, TrainConfig, Trainer, Window, SEP,
};

/// Settings of a pretraining run. Everything that affects the result is here, so a run is
/// reproduced by its settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PretrainConfig {
    pub model: LlamaConfig,
    pub seq_len: usize,
    pub batch_size: usize,
    pub steps: usize,
    pub lr: f64,
    /// Final learning rate as a fraction of `lr`.
    pub min_lr_ratio: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub seed: u64,
    /// Data-parallel workers per step.
    pub workers: usize,
    pub eval_every: usize,
    /// Held-out speeches scored at each evaluation.
    pub eval_speeches: usize,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            model: LlamaConfig::reference(),
            seq_len: 256,
            batch_size: 16,
            steps: 3000,
            lr: 2e-3,
            min_lr_ratio: 0.05,
            warmup_steps: 100,
            weight_decay: 0.1,
            seed: 20261124,
            workers: 2,
            eval_every: 250,
            eval_speeches: 600,
        }
    }
}

impl PretrainConfig {
    /// Learning rate at a step: linear warm-up, then cosine decay to `min_lr_ratio · lr`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let min = self.lr * self.min_lr_ratio;
        min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// The public plays' speeches rendered as one stream, `speech SEP speech SEP ...`: the same
/// shape as a `context SEP text SEP` example, so the base model learns the example format.
pub fn public_stream(speeches: &[Speech]) -> Vec<u32> {
    let mut out = Vec::new();
    for s in speeches
        .iter()
        .filter(|s| PUBLIC_PLAYS.contains(&s.play.as_str()))
    {
        out.extend(s.text.bytes().map(u32::from));
        out.extend(SEP.bytes().map(u32::from));
    }
    out
}

/// Held-out windows: a fixed sample of speeches (with their contexts) from the plays the
/// base model does not train on.
pub fn held_out_windows(speeches: &[Speech], n: usize, seq_len: usize, seed: u64) -> Vec<Window> {
    let tok = Tokenizer::Bytes { vocab_size: 256 };
    let pool: Vec<&Speech> = speeches
        .iter()
        .filter(|s| !PUBLIC_PLAYS.contains(&s.play.as_str()))
        .collect();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed ^ 0x5eed);
    (0..n.min(pool.len()))
        .flat_map(|_| {
            let s = pool[rng.random_range(0..pool.len())];
            let ex = Example::new(s.context.clone(), s.text.clone());
            windows(
                &tokenize(&tok, None, &ex).expect("bytes always encode"),
                seq_len,
            )
        })
        .collect()
}

/// Progress of a run, reported to the caller.
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    Step { step: usize, loss: f64, lr: f64 },
    Eval { step: usize, report: EvalReport },
}

/// Trains a model from random weights and returns it with its final held-out evaluation.
pub fn pretrain(
    cfg: &PretrainConfig,
    speeches: &[Speech],
    mut on_progress: impl FnMut(Progress),
) -> Result<(Llama, EvalReport), ModelError> {
    let device = Device::Cpu;
    let stream = public_stream(speeches);
    if stream.len() <= cfg.seq_len + 1 {
        return Err(ModelError::Candle(candle_core::Error::Msg(
            "the corpus holds none of the public plays".into(),
        )));
    }
    let held_out = held_out_windows(speeches, cfg.eval_speeches, cfg.seq_len, cfg.seed);
    let mut vars = Vec::new();
    let mut tensors = HashMap::new();
    for (name, shape, data) in Llama::random_tensors(&cfg.model, cfg.seed) {
        let var = Var::from_tensor(&Tensor::from_vec(data, shape, &device)?)?;
        tensors.insert(name, var.as_tensor().clone());
        vars.push(var);
    }
    let model = Llama::from_tensors(cfg.model.clone(), tensors, &device)?;
    let mut trainer = Trainer::new(
        vars,
        TrainConfig {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            beta1: 0.9,
            beta2: 0.95,
            max_grad_norm: Some(1.0),
        },
    )?;
    let tok = Tokenizer::Bytes { vocab_size: 256 };
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(cfg.seed);
    let span = stream.len() - cfg.seq_len - 1;
    for step in 0..cfg.steps {
        let batch: Vec<Window> = (0..cfg.batch_size)
            .map(|_| {
                let at = rng.random_range(0..=span);
                Window {
                    tokens: stream[at..at + cfg.seq_len + 1].to_vec(),
                    targets: 1..cfg.seq_len + 1,
                    weight: 1.0,
                }
            })
            .collect();
        let refs: Vec<&Window> = batch.iter().collect();
        let parts = train::split_batches(&refs, cfg.workers, &device)?;
        let lr = cfg.lr_at(step);
        trainer.set_lr(lr);
        let stats =
            trainer.step_parallel(&parts, |p, total| train::loss_part(&model, None, p, total))?;
        on_progress(Progress::Step {
            step,
            loss: stats.loss,
            lr,
        });
        if cfg.eval_every > 0 && (step + 1) % cfg.eval_every == 0 && step + 1 < cfg.steps {
            let report = evaluate(&model, None, &tok, &held_out, 32)?;
            on_progress(Progress::Eval {
                step: step + 1,
                report,
            });
        }
    }
    let report = evaluate(&model, None, &tok, &held_out, 32)?;
    on_progress(Progress::Eval {
        step: cfg.steps,
        report,
    });
    Ok((model, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_and_decays() {
        let c = PretrainConfig {
            steps: 1000,
            warmup_steps: 100,
            ..PretrainConfig::default()
        };
        assert!(c.lr_at(0) < c.lr_at(50));
        assert!((c.lr_at(100) - c.lr).abs() < 1e-12);
        assert!((c.lr_at(1000) - c.lr * c.min_lr_ratio).abs() < 1e-9);
        assert!(c.lr_at(500) < c.lr && c.lr_at(500) > c.lr_at(900));
    }
}
