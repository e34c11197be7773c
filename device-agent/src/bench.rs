//! `device-agent bench train|generate`: times LoRA training steps (forward, backward, AdamW)
//! and greedy decoding with the KV cache, on the same code path `train` and the agent use.
//! Batches are chosen exactly as the PyTorch reference (`scripts/reference/hf_peft_train.py`)
//! chooses them, so both do the same work.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use fedpersona_model::generate::{generate, Sampling};
use fedpersona_model::train::{self, TrainConfig, Trainer, Window};
use fedpersona_model::{Llama, LlamaConfig, LoraAdapter, LoraConfig};

/// Flags shared by both benchmarks.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Model config.json (default: the reference byte-level config).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Text file whose bytes are the tokens (default: the shipped plays).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Threads: data-parallel workers for training, kernel threads for decoding.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    #[arg(long, default_value = "q,v")]
    pub targets: String,
    /// Timed training steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Tokens to decode (generate).
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// LoRA training steps.
    Train(BenchArgs),
    /// Greedy decoding, batch 1, with the KV cache.
    Generate(BenchArgs),
}

/// What a benchmark measured.
#[derive(Debug, serde::Serialize)]
pub struct BenchResult {
    pub tokens_per_s: f64,
    pub median_step_ms: f64,
    pub peak_rss_mb: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_tokens_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_first: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_last: Option<f64>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Setup {
    model: Llama,
    data: Vec<u8>,
}

fn setup(args: &BenchArgs) -> anyhow::Result<Setup> {
    let cfg = match &args.config {
        Some(p) => LlamaConfig::from_file(p)?,
        None => LlamaConfig::reference(),
    };
    if cfg.vocab_size < 256 {
        bail!("the benchmark feeds bytes: vocab_size must be at least 256");
    }
    if args.seq < 2 || args.seq > cfg.max_position_embeddings || args.batch == 0 || args.steps == 0
    {
        bail!("--seq must fit the model, --batch and --steps must be positive");
    }
    let data = match &args.data {
        Some(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        None => {
            let mut all = Vec::new();
            for (_, path) in
                fedpersona_model::data::play_files(&fedpersona_model::data::default_corpus_dir())?
            {
                all.extend(std::fs::read(path)?);
            }
            all
        }
    };
    if data.len() < args.seq + 2 {
        bail!("the data file is shorter than one sequence");
    }
    let tensors: HashMap<String, Tensor> = Llama::random_tensors(&cfg, 0)
        .into_iter()
        .map(|(n, s, d)| Ok((n, Tensor::from_vec(d, s, &Device::Cpu)?)))
        .collect::<candle_core::Result<_>>()?;
    Ok(Setup {
        model: Llama::from_tensors(cfg, tensors, &Device::Cpu)?,
        data,
    })
}

/// The reference's batch for a step: rows at `((step·batch + b) · 2654435761) mod n`.
fn batch_windows(data: &[u8], batch: usize, seq: usize, step: usize) -> Vec<Window> {
    let n = data.len() - seq - 1;
    (0..batch)
        .map(|b| {
            let o = (((step * batch + b) as u64 * 2654435761) % n as u64) as usize;
            Window {
                tokens: data[o..o + seq + 1].iter().map(|&x| u32::from(x)).collect(),
                targets: 1..seq + 1,
                weight: 1.0,
            }
        })
        .collect()
}

pub fn train(args: &BenchArgs) -> anyhow::Result<BenchResult> {
    let s = setup(args)?;
    let adapter = LoraAdapter::new(
        s.model.config(),
        LoraConfig {
            rank: args.rank,
            alpha: args.alpha,
            targets: crate::adapt::parse_targets(&args.targets)?,
            ..LoraConfig::default()
        },
        &Device::Cpu,
    )?;
    // The reference's optimizer: AdamW, lr 5e-3, no weight decay, no clipping.
    let optimizer = TrainConfig {
        lr: 5e-3,
        weight_decay: 0.0,
        max_grad_norm: None,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(adapter.trainable_vars().to_vec(), optimizer)?;
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for step in 0..args.warmup + args.steps {
        let windows = batch_windows(&s.data, args.batch, args.seq, step);
        let t0 = Instant::now();
        let refs: Vec<&Window> = windows.iter().collect();
        let parts = train::split_batches(&refs, args.threads, &Device::Cpu)?;
        let stats = trainer.lora_step(&s.model, &adapter, &parts, None)?;
        let dt = t0.elapsed().as_secs_f64();
        if step >= args.warmup {
            times.push(dt);
            losses.push(stats.loss);
        }
    }
    let med = median(&mut times);
    Ok(BenchResult {
        tokens_per_s: (args.batch * args.seq) as f64 / med,
        median_step_ms: med * 1e3,
        peak_rss_mb: fedpersona_model::runtime::peak_rss_mb(),
        decode_tokens_per_s: None,
        loss_first: losses.first().copied(),
        loss_last: losses.last().copied(),
    })
}

pub fn generate_bench(args: &BenchArgs) -> anyhow::Result<BenchResult> {
    let s = setup(args)?;
    let prompt: Vec<u32> = s.data[..16].iter().map(|&b| u32::from(b)).collect();
    let max = s.model.config().max_position_embeddings;
    if prompt.len() + args.tokens > max {
        bail!("--tokens must fit the model's max_position_embeddings ({max})");
    }
    // As the reference: three timed runs (after one warm-up run unless --warmup 0).
    let warmup = args.warmup.min(1);
    let mut rates = Vec::new();
    for run in 0..warmup + 3 {
        let t0 = Instant::now();
        let out = generate(
            &s.model,
            None,
            &prompt,
            args.tokens,
            Sampling::default(),
            |_| true,
        )?;
        let rate = out.len() as f64 / t0.elapsed().as_secs_f64();
        if run >= warmup {
            rates.push(rate);
        }
    }
    let rate = median(&mut rates);
    Ok(BenchResult {
        tokens_per_s: rate,
        median_step_ms: 1e3 / rate,
        peak_rss_mb: fedpersona_model::runtime::peak_rss_mb(),
        decode_tokens_per_s: Some(rate),
        loss_first: None,
        loss_last: None,
    })
}
