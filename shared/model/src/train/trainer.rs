//! The optimizer: AdamW over a fixed set of vars with gradient-norm clipping, stepping on an
//! autograd loss, on data-parallel autograd parts, or on the hand-written LoRA step.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use super::{finite_loss, no_targets, non_finite_weights, worker_pool};
use crate::batch::Batch;
use crate::error::ModelError;
use crate::lora::LoraAdapter;
use crate::lora_step::{self, Gradients, Objective, Part, Workspace};
use crate::model::Llama;

/// Optimizer settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainConfig {
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Clip the global gradient norm to this (none if `None`).
    pub max_grad_norm: Option<f64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 1e-3,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            max_grad_norm: Some(1.0),
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

/// AdamW over a fixed set of vars, with gradient-norm clipping.
#[derive(Debug)]
pub struct Trainer {
    vars: Vec<Var>,
    opt: AdamW,
    config: TrainConfig,
    checked: bool,
    /// One per data-parallel worker of [`Trainer::lora_step`], reused from step to step.
    workspaces: Vec<Workspace>,
}

impl Trainer {
    pub fn new(vars: Vec<Var>, config: TrainConfig) -> Result<Self, ModelError> {
        let opt = AdamW::new(
            vars.clone(),
            ParamsAdamW {
                lr: config.lr,
                beta1: config.beta1,
                beta2: config.beta2,
                eps: 1e-8,
                weight_decay: config.weight_decay,
            },
        )?;
        Ok(Trainer {
            vars,
            opt,
            config,
            checked: false,
            workspaces: Vec::new(),
        })
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.opt.set_learning_rate(lr);
    }

    /// Backpropagates `loss` and applies one AdamW step.
    pub fn step(&mut self, loss: &Tensor) -> Result<StepStats, ModelError> {
        let value = finite_loss(loss)?;
        let grads = loss.backward()?;
        self.apply(grads, value)
    }

    /// One step over a batch split into parts, each part's forward and backward on its own
    /// thread (data parallelism: one single-threaded worker per core beats intra-op threads
    /// for these small matrices). `part_loss(part, total_weight)` must return the part's
    /// weighted NLL sum divided by `total_weight`, so the gradients add up exactly.
    pub fn step_parallel<F>(
        &mut self,
        parts: &[Batch],
        part_loss: F,
    ) -> Result<StepStats, ModelError>
    where
        F: Fn(&Batch, f64) -> Result<Tensor, ModelError> + Sync,
    {
        let total: f64 = parts
            .iter()
            .map(|p| p.weights.sum_all()?.to_scalar::<f32>().map(f64::from))
            .sum::<candle_core::Result<f64>>()?;
        if total <= 0.0 {
            return Err(no_targets());
        }
        let run = |p: &Batch| -> Result<(f64, GradStore), ModelError> {
            let l = part_loss(p, total)?;
            let v = finite_loss(&l)?;
            Ok((v, l.backward()?))
        };
        let results: Vec<Result<(f64, GradStore), ModelError>> = if parts.len() == 1 {
            vec![run(&parts[0])]
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = parts.iter().map(|p| s.spawn(|| run(p))).collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("training worker panicked"))
                    .collect()
            })
        };
        let mut loss = 0.0;
        let mut sum: Option<GradStore> = None;
        for r in results {
            let (v, mut g) = r?;
            loss += v;
            match sum.as_mut() {
                None => sum = Some(g),
                Some(acc) => {
                    for var in &self.vars {
                        if let Some(x) = g.remove(var) {
                            let y = match acc.remove(var) {
                                Some(y) => (y + x)?,
                                None => x,
                            };
                            acc.insert(var, y);
                        }
                    }
                }
            }
        }
        self.apply(sum.ok_or_else(no_targets)?, loss)
    }

    /// One LoRA training step: the batch's weighted mean NLL over its parts, plus, with
    /// `negatives`, their weighted unlikelihood term (`weight · Σ w·(−log(1 − p)) / Σ w`). Each
    /// part's loss and adapter gradients are computed on its own thread by
    /// [`lora_step`](crate::lora_step) (forward and backward written out over reused buffers;
    /// `vars` must be `adapter`'s trainable vars), the gradients summed, then AdamW. The path
    /// `fit`, the agent, the simulation and `device-agent bench train` take.
    pub fn lora_step(
        &mut self,
        model: &Llama,
        adapter: &LoraAdapter,
        parts: &[Batch],
        negatives: Option<(&Batch, f64)>,
    ) -> Result<StepStats, ModelError> {
        let vars = adapter.trainable_vars();
        if vars.len() != self.vars.len()
            || vars
                .iter()
                .zip(&self.vars)
                .any(|(a, b)| a.as_tensor().id() != b.as_tensor().id())
        {
            return Err(ModelError::AdapterMismatch(
                "the trainer was built for another adapter's tensors".into(),
            ));
        }
        let weight_sum = |b: &Batch| -> candle_core::Result<f64> {
            Ok(f64::from(b.weights.sum_all()?.to_scalar::<f32>()?))
        };
        let total = parts
            .iter()
            .map(weight_sum)
            .sum::<candle_core::Result<f64>>()?;
        if !total.is_finite() {
            return Err(non_finite_weights());
        }
        if parts.is_empty() || total <= 0.0 {
            return Err(no_targets());
        }
        let mut work: Vec<Part<'_>> = parts
            .iter()
            .map(|batch| Part {
                batch,
                objective: Objective::Likelihood,
                scale: 1.0 / total,
            })
            .collect();
        if let Some((batch, weight)) = negatives {
            let neg_total = weight_sum(batch)?;
            if !neg_total.is_finite() {
                return Err(non_finite_weights());
            }
            if !(weight.is_finite() && weight >= 0.0) {
                return Err(ModelError::Candle(candle_core::Error::Msg(format!(
                    "unlikelihood weight {weight} is not a non-negative number"
                ))));
            }
            if neg_total > 0.0 && weight > 0.0 {
                work.push(Part {
                    batch,
                    objective: Objective::Unlikelihood,
                    scale: weight / neg_total,
                });
            }
        }
        // Built (or fetched) once here, not by every worker at once.
        model.flat_weights()?;
        if self.workspaces.len() < work.len() {
            self.workspaces.resize_with(work.len(), Workspace::default);
        }
        let run = |p: &Part<'_>, ws: &mut Workspace| {
            lora_step::loss_and_gradients(model, adapter, *p, ws)
        };
        let results: Vec<Result<Gradients, ModelError>> = if work.len() == 1 {
            vec![run(&work[0], &mut self.workspaces[0])]
        } else {
            use rayon::prelude::*;
            worker_pool().install(|| {
                work.par_iter()
                    .zip(self.workspaces.par_iter_mut())
                    .map(|(p, ws)| run(p, ws))
                    .collect()
            })
        };
        let mut results = results.into_iter();
        let mut sum = results.next().expect("at least one part")?;
        for r in results {
            let r = r?;
            sum.loss += r.loss;
            for (acc, g) in sum.grads.iter_mut().zip(r.grads) {
                acc.iter_mut().zip(g).for_each(|(a, b)| *a += b);
            }
        }
        let mut store = GradStore::default();
        for (var, g) in self.vars.iter().zip(sum.grads) {
            store.insert(
                var.as_tensor(),
                Tensor::from_vec(g, var.shape(), var.device())?,
            );
        }
        self.apply(store, sum.loss)
    }

    /// Checks (first step: every var got a gradient; a kernel without backward would silently
    /// freeze it), clips the global gradient norm, and applies AdamW.
    fn apply(&mut self, mut grads: GradStore, loss_value: f64) -> Result<StepStats, ModelError> {
        if !self.checked {
            if let Some(i) = self.vars.iter().position(|v| grads.get(v).is_none()) {
                return Err(ModelError::Candle(candle_core::Error::Msg(format!(
                    "trainable tensor #{i} {:?} received no gradient",
                    self.vars[i].dims()
                ))));
            }
            self.checked = true;
        }
        let mut sq = 0f64;
        for v in &self.vars {
            if let Some(g) = grads.get(v) {
                sq += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return Err(ModelError::Candle(candle_core::Error::Msg(
                "gradient is not finite; refusing to update".into(),
            )));
        }
        if let Some(max) = self.config.max_grad_norm {
            if grad_norm > max {
                let f = max / (grad_norm + 1e-6);
                for v in &self.vars {
                    if let Some(g) = grads.remove(v) {
                        grads.insert(v, (g * f)?);
                    }
                }
            }
        }
        self.opt.step(&grads)?;
        Ok(StepStats {
            loss: loss_value,
            grad_norm,
        })
    }
}
