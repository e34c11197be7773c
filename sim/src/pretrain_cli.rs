//! `fedpersona-sim pretrain`: trains the byte-level base model on the public plays and writes
//! it in the HF layout, with a `pretrain.json` record of the settings and results.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::pretrain::{pretrain, PretrainConfig, Progress};
use anyhow::{bail, Context};
use candle_core::DType;
use fedpersona_model::checkpoint::{save_model, write_atomic};
use fedpersona_model::{data, LlamaConfig};

/// Flags of `fedpersona-sim pretrain`.
#[derive(Debug, clap::Args)]
pub struct PretrainArgs {
    /// Folder of speaker-marked plays (default: the shipped `data/shakespeare`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output model folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Model config.json (default: the reference byte-level config).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = PretrainConfig::default().steps)]
    pub steps: usize,
    #[arg(long, default_value_t = PretrainConfig::default().seq_len)]
    pub seq_len: usize,
    #[arg(long, default_value_t = PretrainConfig::default().batch_size)]
    pub batch_size: usize,
    #[arg(long, default_value_t = PretrainConfig::default().lr)]
    pub lr: f64,
    #[arg(long, default_value_t = PretrainConfig::default().warmup_steps)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = PretrainConfig::default().seed)]
    pub seed: u64,
    /// Data-parallel workers (one per core is fastest).
    #[arg(long, default_value_t = PretrainConfig::default().workers)]
    pub workers: usize,
    #[arg(long, default_value_t = PretrainConfig::default().eval_every)]
    pub eval_every: usize,
    /// Store weights as float32 instead of float16.
    #[arg(long)]
    pub f32: bool,
}

impl PretrainArgs {
    fn to_config(&self) -> anyhow::Result<PretrainConfig> {
        let model = match &self.config {
            Some(p) => LlamaConfig::from_file(p)?,
            None => LlamaConfig::reference(),
        };
        if model.vocab_size < 256 {
            bail!("pretraining is byte-level: vocab_size must be at least 256");
        }
        if self.seq_len < 2 || self.seq_len > model.max_position_embeddings {
            bail!(
                "--seq-len must be between 2 and max_position_embeddings ({})",
                model.max_position_embeddings
            );
        }
        if self.batch_size == 0 || self.workers == 0 || self.steps == 0 {
            bail!("--steps, --batch-size and --workers must be positive");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr must be positive");
        }
        Ok(PretrainConfig {
            model,
            seq_len: self.seq_len,
            batch_size: self.batch_size,
            steps: self.steps,
            lr: self.lr,
            warmup_steps: self.warmup_steps.min(self.steps),
            seed: self.seed,
            workers: self.workers,
            eval_every: self.eval_every,
            ..PretrainConfig::default()
        })
    }
}

pub fn run(args: &PretrainArgs) -> anyhow::Result<()> {
    let cfg = args.to_config()?;
    let root = args.data.clone().unwrap_or_else(data::default_corpus_dir);
    let speeches = data::load_plays(&root)
        .with_context(|| format!("reading plays from {}", root.display()))?;
    tracing::info!(
        params = cfg.model.num_parameters(),
        steps = cfg.steps,
        tokens_per_step = cfg.batch_size * cfg.seq_len,
        "pretraining"
    );
    let started = Instant::now();
    let mut last_log = Instant::now();
    let mut ema: Option<f64> = None;
    let (model, report) = pretrain(&cfg, &speeches, |p| match p {
        Progress::Step { step, loss, lr } => {
            let e = ema.map_or(loss, |e| 0.98 * e + 0.02 * loss);
            ema = Some(e);
            if last_log.elapsed().as_secs() >= 30 || step + 1 == cfg.steps {
                last_log = Instant::now();
                let secs = started.elapsed().as_secs_f64();
                tracing::info!(
                    step = step + 1,
                    loss = format!("{e:.4}"),
                    lr = format!("{lr:.2e}"),
                    tokens_per_s = format!(
                        "{:.0}",
                        ((step + 1) * cfg.batch_size * cfg.seq_len) as f64 / secs
                    ),
                    "train"
                );
            }
        }
        Progress::Eval { step, report } => tracing::info!(
            step,
            loss = format!("{:.4}", report.loss),
            bits_per_byte = format!("{:.4}", report.bits_per_byte),
            accuracy = format!("{:.4}", report.accuracy),
            "held-out eval"
        ),
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let dtype = if args.f32 { DType::F32 } else { DType::F16 };
    save_model(&args.out, &model, dtype)?;
    write_record(&args.out, &cfg, &report, seconds)?;
    println!(
        "wrote {}: {} parameters, held-out bits/byte {:.4}, accuracy {:.4}, {:.0} s",
        args.out.display(),
        cfg.model.num_parameters(),
        report.bits_per_byte,
        report.accuracy,
        seconds
    );
    Ok(())
}

fn write_record(
    dir: &Path,
    cfg: &PretrainConfig,
    report: &fedpersona_model::train::EvalReport,
    seconds: f64,
) -> anyhow::Result<()> {
    let record = serde_json::json!({
        "command": "fedpersona-sim pretrain",
        "public_plays": data::PUBLIC_PLAYS,
        "settings": {
            "steps": cfg.steps, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
            "lr": cfg.lr, "min_lr_ratio": cfg.min_lr_ratio, "warmup_steps": cfg.warmup_steps,
            "weight_decay": cfg.weight_decay, "seed": cfg.seed, "workers": cfg.workers,
        },
        "held_out": {
            "what": "speeches (with their context) of plays not in public_plays",
            "speeches": cfg.eval_speeches,
            "loss": report.loss, "bits_per_byte": report.bits_per_byte,
            "accuracy": report.accuracy, "tokens": report.tokens,
        },
        "parameters": cfg.model.num_parameters(),
        "seconds": seconds,
    });
    write_atomic(
        &dir.join("pretrain.json"),
        &serde_json::to_vec_pretty(&record)?,
    )?;
    Ok(())
}
