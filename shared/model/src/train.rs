//! Training and evaluation: examples as token windows with per-token loss masks and
//! per-example weights, the causal LM loss, AdamW over trainable vars with gradient-norm
//! clipping, and evaluation (loss, bits per byte, next-token accuracy).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use crate::lora::LoraAdapter;
use crate::lora_step::{self, Gradients, Objective, Part, Workspace};
use crate::model::{Llama, ModelError};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// What separates a context from the text that answers it, and ends the text. The shipped
/// corpus renders a scene as speeches separated by a blank line, so an example is
/// `context + SEP + text + SEP` with the loss on `text + SEP`.
pub const SEP: &str = "\n\n";

/// A training or evaluation example: the user's text, what it answered, and a weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub context: Option<String>,
    pub text: String,
    pub weight: f32,
}

impl Example {
    pub fn new(context: Option<String>, text: impl Into<String>) -> Self {
        Example {
            context,
            text: text.into(),
            weight: 1.0,
        }
    }
}

/// A tokenized example: `tokens[target_start..]` are the positions the loss covers.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedExample {
    pub tokens: Vec<u32>,
    pub target_start: usize,
    pub weight: f32,
}

/// Encodes `[bos] context SEP | text SEP` (the loss starts at `|`).
pub fn tokenize(
    tok: &Tokenizer,
    bos: Option<u32>,
    ex: &Example,
) -> Result<TokenizedExample, TokenizerError> {
    let mut tokens: Vec<u32> = bos.into_iter().collect();
    if let Some(c) = ex.context.as_deref().filter(|c| !c.is_empty()) {
        tokens.extend(tok.encode(c)?);
    }
    tokens.extend(tok.encode(SEP)?);
    let target_start = tokens.len();
    tokens.extend(tok.encode(&ex.text)?);
    tokens.extend(tok.encode(SEP)?);
    Ok(TokenizedExample {
        tokens,
        target_start,
        weight: ex.weight,
    })
}

/// A slice of an example that fits the model: `tokens` (at most `max_len + 1`), and the
/// range of target positions (indices into `tokens`, ≥ 1) the loss covers.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub tokens: Vec<u32>,
    pub targets: std::ops::Range<usize>,
    pub weight: f32,
}

/// Cuts an example into windows of at most `max_len` inputs so that every target position
/// is scored exactly once, each with as much preceding context as fits. A long text is split
/// into chunks of `max_len / 2` targets.
pub fn windows(ex: &TokenizedExample, max_len: usize) -> Vec<Window> {
    assert!(max_len >= 2, "max_len must be at least 2");
    let n = ex.tokens.len();
    let first = ex.target_start.max(1);
    if first >= n {
        return Vec::new();
    }
    let chunk = if n <= max_len + 1 {
        max_len
    } else {
        max_len / 2
    };
    let mut out = Vec::new();
    let mut a = first;
    while a < n {
        let b = (a + chunk).min(n);
        let w = (b - 1).saturating_sub(max_len);
        out.push(Window {
            tokens: ex.tokens[w..b].to_vec(),
            targets: (a - w)..(b - w),
            weight: ex.weight,
        });
        a = b;
    }
    out
}

/// A padded batch: inputs and targets `[B, T]` (u32) and loss weights `[B, T]` (f32, zero
/// where no loss is taken).
#[derive(Debug, Clone)]
pub struct Batch {
    pub inputs: Tensor,
    pub targets: Tensor,
    pub weights: Tensor,
}

impl Batch {
    pub fn new(windows: &[&Window], device: &Device) -> candle_core::Result<Self> {
        let t = windows
            .iter()
            .map(|w| w.tokens.len() - 1)
            .max()
            .unwrap_or(0)
            .max(1);
        let b = windows.len();
        let mut inputs = vec![0u32; b * t];
        let mut targets = vec![0u32; b * t];
        let mut weights = vec![0f32; b * t];
        for (i, w) in windows.iter().enumerate() {
            let len = w.tokens.len() - 1;
            inputs[i * t..i * t + len].copy_from_slice(&w.tokens[..len]);
            targets[i * t..i * t + len].copy_from_slice(&w.tokens[1..]);
            for p in w.targets.clone() {
                weights[i * t + p - 1] = w.weight;
            }
        }
        Ok(Batch {
            inputs: Tensor::from_vec(inputs, (b, t), device)?,
            targets: Tensor::from_vec(targets, (b, t), device)?,
            weights: Tensor::from_vec(weights, (b, t), device)?,
        })
    }
}

/// Per-token negative log-likelihood `[B, T]`.
fn token_nll(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    crate::kernels::cross_entropy(&logits.reshape((b * t, v))?, targets)?.reshape((b, t))
}

/// The weighted mean causal-LM loss of a batch (example weights are relative within it).
pub fn loss(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    batch: &Batch,
) -> Result<Tensor, ModelError> {
    let total = batch.weights.sum_all()?.to_scalar::<f32>()?;
    if total <= 0.0 {
        return Err(no_targets());
    }
    loss_part(model, adapter, batch, total as f64)
}

/// Evaluation figures over a set of windows.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct EvalReport {
    /// Mean NLL per target token, in nats.
    pub loss: f64,
    pub bits_per_byte: f64,
    /// Next-token accuracy (argmax).
    pub accuracy: f64,
    pub tokens: usize,
}

/// Scores windows (unweighted: every target token counts once), through
/// [`lora_step::score`].
pub fn evaluate(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    tok: &Tokenizer,
    windows: &[Window],
    batch_size: usize,
) -> Result<EvalReport, ModelError> {
    use rayon::prelude::*;
    // The chunks are scored on the training workers: one run of consecutive chunks and one
    // workspace per worker, so at most that many workspaces exist at once.
    model.flat_weights()?;
    let chunks: Vec<&[Window]> = windows.chunks(batch_size.max(1)).collect();
    let pool = worker_pool();
    let per_worker = chunks.len().div_ceil(pool.current_num_threads()).max(1);
    let sums = pool.install(|| {
        chunks
            .par_chunks(per_worker)
            .map(|run| {
                let mut ws = Workspace::default();
                run.iter()
                    .map(|chunk| score_chunk(model, adapter, tok, chunk, &mut ws))
                    .collect::<Result<Vec<_>, ModelError>>()
            })
            .collect::<Result<Vec<_>, ModelError>>()
    })?;
    let (mut nll_sum, mut correct, mut count, mut bytes) = (0f64, 0usize, 0usize, 0usize);
    for s in sums.into_iter().flatten() {
        nll_sum += s.nll;
        correct += s.correct;
        count += s.count;
        bytes += s.bytes;
    }
    let n = count.max(1) as f64;
    Ok(EvalReport {
        loss: nll_sum / n,
        bits_per_byte: nll_sum / std::f64::consts::LN_2 / bytes.max(1) as f64,
        accuracy: correct as f64 / n,
        tokens: count,
    })
}

/// Sums over one chunk of windows.
struct ChunkScore {
    nll: f64,
    correct: usize,
    count: usize,
    bytes: usize,
}

fn score_chunk(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    tok: &Tokenizer,
    chunk: &[Window],
    ws: &mut Workspace,
) -> Result<ChunkScore, ModelError> {
    let refs: Vec<&Window> = chunk.iter().collect();
    let batch = Batch::new(&refs, model.device())?;
    let t = batch.inputs.dim(1)?;
    let scores = lora_step::score(model, adapter, &batch, ws)?;
    let mut out = ChunkScore {
        nll: 0.0,
        correct: 0,
        count: 0,
        bytes: 0,
    };
    for (i, w) in chunk.iter().enumerate() {
        for p in w.targets.clone() {
            let s = scores[i * t + p - 1];
            out.nll += f64::from(s.nll);
            out.correct += usize::from(s.correct);
            out.count += 1;
        }
        out.bytes += tok
            .byte_len(&w.tokens[w.targets.clone()])
            .map_err(|e| ModelError::Candle(candle_core::Error::Msg(e.to_string())))?;
    }
    Ok(out)
}

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

/// The data-parallel training workers: one thread per core, alive as long as the process, so
/// gemm's per-thread packing buffers (and the pages behind them) are reused from step to step
/// instead of allocated again. Rayon's global pool is not used: `RAYON_NUM_THREADS` sizes it
/// for candle's kernels (see [`crate::runtime::set_kernel_threads`]).
fn worker_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
            .thread_name(|i| format!("train-worker-{i}"))
            .build()
            .expect("the training worker threads could not be started")
    })
}

fn non_finite_weights() -> ModelError {
    ModelError::Candle(candle_core::Error::Msg(
        "batch weights are not finite numbers".into(),
    ))
}

fn no_targets() -> ModelError {
    ModelError::Candle(candle_core::Error::Msg("batch has no target tokens".into()))
}

fn finite_loss(loss: &Tensor) -> Result<f64, ModelError> {
    let v = loss.to_scalar::<f32>()? as f64;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(ModelError::Candle(candle_core::Error::Msg(format!(
            "loss is {v}; refusing to update"
        ))))
    }
}

/// The weighted NLL sum of a batch divided by `total_weight` (for [`Trainer::step_parallel`]).
pub fn loss_part(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    batch: &Batch,
    total_weight: f64,
) -> Result<Tensor, ModelError> {
    let nll = batch_nll(model, adapter, batch)?;
    Ok(((nll * &batch.weights)?.sum_all()? / total_weight)?)
}

fn batch_nll(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    batch: &Batch,
) -> Result<Tensor, ModelError> {
    let logits = model.forward(&batch.inputs, adapter, None)?;
    Ok(token_nll(&logits, &batch.targets)?)
}

/// The unlikelihood loss of a batch of *negative* windows (text the model should not
/// produce, e.g. a suggestion the user rejected): Σ w·(−log(1 − p(target))) / `total_weight`
/// (Welleck et al. 2020), with p = exp(−NLL) from the same fused cross-entropy, so its
/// gradient comes through that kernel's backward.
pub fn unlikelihood_part(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    batch: &Batch,
    total_weight: f64,
) -> Result<Tensor, ModelError> {
    // 1 − p, kept off zero.
    let unlikely = batch_nll(model, adapter, batch)?
        .neg()?
        .exp()?
        .affine(-1.0, 1.0 + 1e-5)?;
    let ul = unlikely.log()?.neg()?;
    Ok(((ul * &batch.weights)?.sum_all()? / total_weight)?)
}

/// Negative windows and the weight of their unlikelihood term in each step's loss.
#[derive(Debug, Clone, Copy)]
pub struct Negatives<'a> {
    pub windows: &'a [Window],
    pub weight: f64,
}

/// Splits windows into at most `parts` batches of nearly equal size (for data-parallel steps).
pub fn split_batches(
    windows: &[&Window],
    parts: usize,
    device: &Device,
) -> candle_core::Result<Vec<Batch>> {
    let per = windows.len().div_ceil(parts.max(1)).max(1);
    windows.chunks(per).map(|c| Batch::new(c, device)).collect()
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
