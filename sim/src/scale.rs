//! `simulate --scale-test`: many agents resident in one process against the real aggregator
//! (TLS on loopback, one shared HTTP/2 connection), on synthetic users cut from the corpus
//! (consecutive shards of the training users' lines). Prints peak RSS, memory per resident
//! agent and seconds per round; writes `scale.json`.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use crate::corpus::UserSplit;
use anyhow::{ensure, Context};
use candle_core::Device;
use fedpersona_model::runtime::{peak_rss_mb, rss_mb};
use fedpersona_model::{checkpoint, BaseModel};
use serde::Serialize;

use crate::args::SimulateArgs;
use crate::federation::{runtime, Env, Federation};
use crate::progress::Progress;
use crate::settings::{FederationKind, FederationSpec, ServerStep, Settings};

/// Lines per synthetic user.
const SHARD_LINES: usize = 4;

/// What the scale benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    pub agents: usize,
    pub clients_per_round: usize,
    pub rounds: usize,
    pub enroll_seconds: f64,
    pub rss_before_agents_mb: f64,
    pub rss_with_agents_mb: f64,
    /// (RSS with every agent resident − RSS before) / agents; includes the in-process
    /// aggregator's per-device state.
    pub kb_per_agent: f64,
    pub seconds_per_round: Vec<f64>,
    pub median_seconds_per_round: f64,
    pub peak_rss_mb: f64,
}

pub fn run(args: &SimulateArgs) -> anyhow::Result<ScaleReport> {
    let n = args.agents.unwrap_or(10_000);
    let cohort = args.clients_per_round.unwrap_or(100);
    let rounds = args.rounds.unwrap_or(3) as usize;
    ensure!(
        n >= 1 && cohort >= 1 && rounds >= 1,
        "agents, clients and rounds must be positive"
    );
    ensure!(cohort <= n, "--clients-per-round exceeds --agents");
    let settings = Settings::resolve(&SimulateArgs {
        agents: Some(n),
        ..args.clone()
    })?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let (data, base_dir) = args.paths();
    let users = settings.splits(&data)?;
    let lines: Vec<_> = users
        .train_users
        .iter()
        .flat_map(|u| u.train.iter().cloned())
        .collect();
    ensure!(
        lines.len() >= SHARD_LINES,
        "the corpus is too small to shard"
    );
    let shards: Vec<UserSplit> = (0..n)
        .map(|i| {
            let start = (i * SHARD_LINES) % (lines.len() - SHARD_LINES + 1);
            UserSplit {
                key: format!("synthetic-{i}"),
                train: lines[start..start + SHARD_LINES].to_vec(),
                test: Vec::new(),
            }
        })
        .collect();
    drop(lines);

    let base = Arc::new(BaseModel::load(&base_dir, &Device::Cpu)?);
    let rt = runtime(settings.workers)?;
    let tls_dir = args.out.join("tls");
    aggregator::tls::write(
        &aggregator::tls::generate(&["localhost".into(), "127.0.0.1".into()])?,
        &tls_dir,
    )?;
    let env = Env {
        base,
        base_dir,
        tls_dir,
        stop: Arc::new(AtomicBool::new(false)),
        workers: settings.workers,
    };
    let spec = FederationSpec {
        kind: FederationKind::Fedavg,
        rounds: rounds as u64,
        clients_per_round: cohort,
        local_steps: 1,
        lr: settings.lr,
        batch_size: 2,
        seq_len: 64,
        clip_norm: settings.clip_norm,
        adaptive_clip: false,
        lora: settings.lora(),
        server: ServerStep {
            optimizer: "sgd",
            lr: 1.0,
            momentum: 0.9,
        },
        dropout: 0.0,
        seed: settings.seed,
        privacy: settings.privacy,
    };
    let progress = Progress::new(!args.no_progress);
    fedpersona_model::runtime::return_freed_memory();
    let rss_before = rss_mb();
    let enroll_started = Instant::now();
    let bar = progress.bar(n as u64, "enrolling agents");
    let tick = bar.clone();
    let mut fed = Federation::start(
        &rt,
        spec,
        &env,
        &shards,
        &args.out.join("scale"),
        move || tick.inc(1),
    )?;
    bar.finish();
    drop(shards);
    let enroll_seconds = enroll_started.elapsed().as_secs_f64();
    fedpersona_model::runtime::return_freed_memory();
    let rss_with = rss_mb();
    let bar = progress.bar(rounds as u64, "rounds");
    let mut per_round = Vec::new();
    for _ in 0..rounds {
        let r = fed.round(&rt)?;
        ensure!(r.committed, "round {} did not commit", r.round);
        per_round.push(r.seconds);
        bar.inc(1);
    }
    bar.finish();
    fed.shutdown(&rt)?;
    let mut sorted = per_round.clone();
    sorted.sort_by(f64::total_cmp);
    let report = ScaleReport {
        agents: n,
        clients_per_round: cohort,
        rounds,
        enroll_seconds,
        rss_before_agents_mb: rss_before,
        rss_with_agents_mb: rss_with,
        kb_per_agent: (rss_with - rss_before).max(0.0) * 1024.0 / n as f64,
        median_seconds_per_round: sorted[sorted.len() / 2],
        seconds_per_round: per_round,
        peak_rss_mb: peak_rss_mb(),
    };
    checkpoint::write_atomic(
        &args.out.join("scale.json"),
        &serde_json::to_vec_pretty(&report)?,
    )?;
    Ok(report)
}
