//! `device-agent train`: fits a LoRA adapter to the user's own text on the frozen base model
//! and writes it in the PEFT layout.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use fedpersona_model::data::split_ordered;
use fedpersona_model::train::{evaluate, fit, EvalReport, FitConfig, TrainConfig};
use fedpersona_model::{BaseModel, LoraAdapter, LoraConfig};

use crate::adapt::{parse_targets, to_windows};
use crate::dataset::DataArgs;

/// Flags of `device-agent train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Base model folder in the HF layout (default: the shipped byte-level model).
    #[arg(long)]
    pub base: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    /// Where to write the adapter (PEFT layout).
    #[arg(long)]
    pub out: PathBuf,
    /// Start from this adapter instead of a fresh one (its rank and targets win).
    #[arg(long)]
    pub init: Option<PathBuf>,
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// Comma-separated projections: any of q,k,v,o,gate,up,down.
    #[arg(long, default_value = "q,v")]
    pub targets: String,
    /// FFA-LoRA: keep A fixed from the seed, train only B.
    #[arg(long)]
    pub ffa: bool,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Tokens per training window.
    /// (default: 256, or the model's limit if smaller)
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Fraction of the examples (the last ones) held out to report loss before and after.
    #[arg(long, default_value_t = 0.2)]
    pub holdout: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// What a training run reports.
#[derive(Debug, serde::Serialize)]
pub struct TrainSummary {
    pub train_examples: usize,
    pub held_out_examples: usize,
    pub before: Option<EvalReport>,
    pub after: Option<EvalReport>,
    pub final_train_loss: f64,
    pub seconds: f64,
}

/// The window length: the flag, else 256 or the model's limit if smaller.
pub fn resolve_seq_len(flag: Option<usize>, base: &BaseModel) -> anyhow::Result<usize> {
    let max = base.model.config().max_position_embeddings;
    let seq_len = flag.unwrap_or(256.min(max));
    if seq_len < 2 || seq_len > max {
        bail!("--seq-len must be between 2 and the model's max_position_embeddings ({max})");
    }
    Ok(seq_len)
}

/// Whether `out` can be written as a folder: it is one, or its nearest existing ancestor is
/// a folder a file can be created in. Creates nothing that stays.
fn check_writable(out: &Path) -> anyhow::Result<()> {
    let refuse = |why: &str| anyhow::anyhow!("--out {}: {why}", out.display());
    let mut at = out;
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(refuse(&format!("{} is not a folder", at.display()))),
            Err(_) => match at.parent().filter(|p| !p.as_os_str().is_empty()) {
                Some(parent) => at = parent,
                None => {
                    at = Path::new(".");
                    break;
                }
            },
        }
    }
    let probe = at.join(format!(".fedpersona-write-check-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| refuse(&format!("cannot write in {}: {e}", at.display())))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

pub fn run(args: &TrainArgs) -> anyhow::Result<TrainSummary> {
    if !(0.0..1.0).contains(&args.holdout) {
        bail!("--holdout must be in [0, 1)");
    }
    if args.steps == 0 || args.batch_size == 0 {
        bail!("--steps and --batch-size must be positive");
    }
    if !(args.lr.is_finite() && args.lr > 0.0) {
        bail!("--lr must be positive");
    }
    // Refused before any training: minutes of work must not end in an unwritable folder.
    check_writable(&args.out)?;
    let base_dir = args
        .base
        .clone()
        .unwrap_or_else(fedpersona_model::checkpoint::default_model_dir);
    let base = BaseModel::load(&base_dir, &Device::Cpu)
        .with_context(|| format!("loading base model {}", base_dir.display()))?;
    let seq_len = resolve_seq_len(args.seq_len, &base)?;
    let examples = args.data.load()?;
    let (train, held_out) = if args.holdout > 0.0 && examples.len() >= 5 {
        split_ordered(examples, 1.0 - args.holdout)
    } else {
        (examples, Vec::new())
    };
    let train_w = to_windows(&base, &train, seq_len)?;
    let test_w = to_windows(&base, &held_out, seq_len)?;
    if train_w.is_empty() {
        bail!("the training data holds no text to learn");
    }
    let adapter = match &args.init {
        Some(dir) => LoraAdapter::load(dir, base.model.config(), &Device::Cpu)
            .with_context(|| format!("loading adapter {}", dir.display()))?,
        None => LoraAdapter::new(
            base.model.config(),
            LoraConfig {
                rank: args.rank,
                alpha: args.alpha,
                targets: parse_targets(&args.targets)?,
                freeze_a: args.ffa,
                seed: args.seed,
            },
            &Device::Cpu,
        )?,
    };
    let eval = |a: &LoraAdapter| -> anyhow::Result<Option<EvalReport>> {
        if test_w.is_empty() {
            return Ok(None);
        }
        Ok(Some(evaluate(
            &base.model,
            Some(a),
            &base.tokenizer,
            &test_w,
            16,
        )?))
    };
    let before = eval(&adapter)?;
    let cfg = FitConfig {
        steps: args.steps,
        batch_size: args.batch_size,
        optimizer: TrainConfig {
            lr: args.lr,
            ..TrainConfig::default()
        },
        workers: args.threads.unwrap_or_else(crate::available_cores),
        seed: args.seed,
    };
    let started = Instant::now();
    let mut last = 0.0;
    let mut last_log = Instant::now();
    fit(&base.model, &adapter, &train_w, &cfg, |step, s| {
        last = s.loss;
        if last_log.elapsed().as_secs() >= 10 || step + 1 == cfg.steps {
            last_log = Instant::now();
            tracing::info!(step = step + 1, loss = format!("{:.4}", s.loss), "train");
        }
    })?;
    let seconds = started.elapsed().as_secs_f64();
    adapter
        .save(&args.out)
        .with_context(|| format!("writing adapter to {}", args.out.display()))?;
    Ok(TrainSummary {
        train_examples: train.len(),
        held_out_examples: held_out.len(),
        before,
        after: eval(&adapter)?,
        final_train_loss: last,
        seconds,
    })
}
