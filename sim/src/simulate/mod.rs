//! `fedpersona-sim simulate`: the whole system on one machine. A real aggregator (its gRPC
//! server, TLS with a certificate generated for the run, on loopback) and one real agent per
//! training user, sharing one in-memory copy of the frozen base model, run two federations
//! (FedAvg, and a meta-learned initialization by Reptile-style local adaptation with a server
//! step); held-out users then personalize from each starting point in a few local steps and
//! are scored on their own later lines. See DESIGN.md (Benchmark) for the protocol.

mod evaluation;
mod federation;
mod plot;
pub mod report;
pub mod scale;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::corpus::{self, SplitConfig, UserSplit};
use anyhow::{bail, ensure, Context};
use candle_core::Device;
use fedpersona_model::train::Window;
use fedpersona_model::{checkpoint, BaseModel, LoraConfig};
use fedpersona_privacy::AdapterTensors;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use evaluation::{FewShot, Starts, UserScores};
use federation::{Env, Federation, FederationSpec, Interrupted, ServerStep};
use report::{MethodResult, Report, RoundRecord};

/// The FedAvg federation without DP that a private run trains as its reference.
const NONPRIVATE: &str = "fedavg_nonprivate";

pub use aggregator::config::PrivacyMode;

/// Flags of `fedpersona-sim simulate`. Unset values come from the preset (default or
/// `--quick`); `report.json` records the resolved settings.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// A folder of speaker-marked plays (each (play, role) a user) or a JSONL file with
    /// `{"user": ..., "text": ..., "context": ...}` lines (default: the shipped plays).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Base model folder (default: the shipped model).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Where the report, rounds, plots and the run's state go.
    #[arg(long)]
    pub out: PathBuf,
    /// A small preset that finishes in a few minutes on 2 cores.
    #[arg(long)]
    pub quick: bool,
    /// Federated rounds per federation.
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Reports a round needs (its cohort).
    #[arg(long)]
    pub clients_per_round: Option<usize>,
    /// Local steps of a FedAvg client.
    #[arg(long)]
    pub local_steps: Option<u32>,
    /// Cap on the training users (agents) that take part.
    #[arg(long)]
    pub agents: Option<usize>,
    /// Cap on the held-out users evaluated.
    #[arg(long)]
    pub heldout_users: Option<usize>,
    /// Users with fewer lines are dropped.
    #[arg(long)]
    pub min_lines: Option<usize>,
    /// Support lines (k) a held-out user adapts on.
    #[arg(long)]
    pub support_lines: Option<usize>,
    /// Local fine-tuning steps (s) of a held-out user: the methods are scored after these.
    #[arg(long)]
    pub finetune_steps: Option<usize>,
    /// Inner-loop steps of the meta-learned initialization (Reptile's k).
    #[arg(long)]
    pub meta_local_steps: Option<usize>,
    /// The accuracy-vs-steps curve of held-out users goes on to this many steps.
    #[arg(long)]
    pub curve_steps: Option<usize>,
    /// Client learning rate (FedAvg).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning rate of held-out users' fine-tuning and of the meta-learning inner loop.
    #[arg(long)]
    pub finetune_lr: Option<f64>,
    /// Server step of the meta-learned initialization: sgd (Reptile; the default), momentum
    /// (FedAvgM, momentum 0.9) or adam (FedAdam).
    #[arg(long)]
    pub meta_optimizer: Option<String>,
    /// Server learning rate of the meta-learned initialization (Reptile's outer step).
    #[arg(long)]
    pub meta_server_lr: Option<f64>,
    /// LoRA rank (alpha is twice the rank).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Comma-separated projections: any of q,k,v,o,gate,up,down.
    #[arg(long)]
    pub targets: Option<String>,
    /// L2 norm every update is clipped to.
    #[arg(long)]
    pub clip_norm: Option<f64>,
    /// Chance that a picked device takes the task and never reports.
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Differential privacy of the updates: noise on each device (`local`), shares summed
    /// under secure aggregation (`distributed`), or at the aggregator (`central`).
    #[arg(long, value_enum, default_value_t = PrivacyMode::None)]
    pub privacy: PrivacyMode,
    /// Target user-level ε of each federation over all its rounds (with `--privacy`; the
    /// noise multiplier is solved for it).
    #[arg(long)]
    pub epsilon: Option<f64>,
    /// Noise multiplier z (with `--privacy`; instead of `--epsilon`).
    #[arg(long)]
    pub noise_multiplier: Option<f64>,
    /// δ of the (ε, δ) guarantee.
    #[arg(long, default_value_t = 1e-5)]
    pub delta: f64,
    /// Secure aggregation (SecAgg+) of the cohort's updates.
    #[arg(long)]
    pub secure_aggregation: bool,
    /// Skip the ablation of profile-driven adaptation (`adaptive_finetune`) on held-out users.
    #[arg(long)]
    pub no_adaptive: bool,
    /// Seeds the split, device availability, training and the adapters' initialization: the
    /// same seed reproduces a run.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Devices training at once, and evaluation workers (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Score the global adapters on the monitoring slice every this many rounds.
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Scale benchmark: keep `--agents` (default 10,000) agents on synthetic shards resident
    /// and run rounds of `--clients-per-round` (default 100); prints memory and round time.
    #[arg(long)]
    pub scale_test: bool,
    /// No progress bars (they are also off when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

/// The resolved settings of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub preset: &'static str,
    pub seed: u64,
    pub split: SplitConfig,
    pub max_train_users: Option<usize>,
    pub max_heldout_users: Option<usize>,
    pub rounds: u64,
    pub clients_per_round: usize,
    pub local_steps: u32,
    pub lr: f64,
    pub batch_size: u32,
    pub train_seq_len: u32,
    pub eval_seq_len: usize,
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<&'static str>,
    pub clip_norm: f64,
    pub dropout: f64,
    pub meta_optimizer: &'static str,
    pub meta_server_lr: f64,
    pub support_lines: usize,
    pub finetune_steps: usize,
    pub meta_local_steps: usize,
    pub curve_steps: usize,
    pub finetune_lr: f64,
    pub eval_every: u64,
    pub monitor_windows: usize,
    pub workers: usize,
    pub privacy: federation::PrivacyPlan,
    pub adaptive: bool,
}

impl Settings {
    fn resolve(a: &SimulateArgs) -> anyhow::Result<Settings> {
        let quick = a.quick;
        let rounds = a.rounds.unwrap_or(if quick { 4 } else { 30 });
        let targets = device_agent::adapt::parse_targets(
            a.targets.as_deref().unwrap_or("q,k,v,o,gate,up,down"),
        )?;
        let meta_optimizer = match a.meta_optimizer.as_deref().unwrap_or("sgd") {
            "sgd" => "sgd",
            "momentum" => "momentum",
            "adam" => "adam",
            other => bail!("--meta-optimizer must be sgd, momentum or adam, not {other:?}"),
        };
        let s = Settings {
            preset: if quick { "quick" } else { "default" },
            seed: a.seed,
            split: SplitConfig {
                min_lines: a.min_lines.unwrap_or(20),
                heldout_fraction: 0.2,
                train_fraction: 0.8,
                seed: a.seed,
            },
            max_train_users: a.agents.or(quick.then_some(16)),
            max_heldout_users: a.heldout_users.or(quick.then_some(6)),
            rounds,
            clients_per_round: a.clients_per_round.unwrap_or(if quick { 4 } else { 10 }),
            local_steps: a.local_steps.unwrap_or(if quick { 4 } else { 10 }),
            lr: a.lr.unwrap_or(1e-3),
            batch_size: 8,
            train_seq_len: 128,
            eval_seq_len: 256,
            rank: a.rank.unwrap_or(8),
            alpha: 2.0 * a.rank.unwrap_or(8) as f64,
            targets: targets.iter().map(|t| t.name()).collect(),
            clip_norm: a.clip_norm.unwrap_or(1.0),
            dropout: a.dropout.unwrap_or(0.0),
            meta_optimizer,
            meta_server_lr: a.meta_server_lr.unwrap_or(1.0),
            support_lines: a.support_lines.unwrap_or(if quick { 16 } else { 64 }),
            finetune_steps: a.finetune_steps.unwrap_or(if quick { 2 } else { 5 }),
            meta_local_steps: a.meta_local_steps.unwrap_or(if quick { 8 } else { 20 }),
            curve_steps: a.curve_steps.unwrap_or(if quick { 8 } else { 20 }),
            finetune_lr: a.finetune_lr.unwrap_or(1e-3),
            eval_every: a.eval_every.unwrap_or((rounds / 10).max(1)),
            monitor_windows: if quick { 32 } else { 128 },
            workers: a
                .threads
                .unwrap_or_else(device_agent::available_cores)
                .max(1),
            adaptive: !a.no_adaptive,
            privacy: federation::PrivacyPlan {
                mode: a.privacy,
                epsilon: a.epsilon,
                noise_multiplier: a.noise_multiplier,
                delta: a.delta,
                secure_aggregation: a.secure_aggregation,
            },
        };
        ensure!(s.rounds >= 1, "--rounds must be at least 1");
        ensure!(
            s.clients_per_round >= 1,
            "--clients-per-round must be at least 1"
        );
        ensure!(s.local_steps >= 1, "--local-steps must be at least 1");
        ensure!(s.support_lines >= 1, "--support-lines must be at least 1");
        ensure!(
            s.lr.is_finite() && s.lr > 0.0 && s.finetune_lr.is_finite() && s.finetune_lr > 0.0,
            "learning rates must be positive"
        );
        ensure!(
            s.meta_server_lr.is_finite() && s.meta_server_lr > 0.0,
            "--meta-server-lr must be positive"
        );
        ensure!(
            s.clip_norm.is_finite() && s.clip_norm > 0.0,
            "--clip-norm must be positive"
        );
        ensure!(
            (0.0..0.9).contains(&s.dropout),
            "--dropout must be in [0, 0.9)"
        );
        ensure!(s.max_train_users != Some(0), "--agents must be at least 1");
        let p = &s.privacy;
        match (p.mode, p.epsilon, p.noise_multiplier) {
            (PrivacyMode::None, None, None) => {}
            (PrivacyMode::None, _, _) => {
                bail!(
                    "--epsilon and --noise-multiplier need --privacy local, distributed or central"
                )
            }
            (_, Some(_), Some(_)) => bail!("give --epsilon or --noise-multiplier, not both"),
            (_, None, None) => bail!(
                "--privacy {} needs --epsilon (the noise is solved for it) or --noise-multiplier",
                p.mode.name()
            ),
            (_, Some(e), None) => ensure!(e.is_finite() && e > 0.0, "--epsilon must be positive"),
            (_, None, Some(z)) => ensure!(
                z.is_finite() && z > 0.0,
                "--noise-multiplier must be positive"
            ),
        }
        ensure!(
            p.delta > 0.0 && p.delta < 1e-2,
            "--delta must be in (0, 0.01)"
        );
        ensure!(
            p.mode != PrivacyMode::Distributed || p.secure_aggregation,
            "--privacy distributed needs --secure-aggregation: without it the aggregator sees \
             each device's under-noised update"
        );
        Ok(s)
    }

    fn lora(&self) -> LoraConfig {
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            targets: self
                .targets
                .iter()
                .map(|t| fedpersona_model::Target::parse(t).expect("parsed above"))
                .collect(),
            freeze_a: false,
            seed: self.seed,
        }
    }

    fn federation(&self, name: &'static str) -> FederationSpec {
        let meta = name == "meta";
        FederationSpec {
            name,
            rounds: self.rounds,
            clients_per_round: self.clients_per_round,
            // The meta-learned initialization's inner loop trains as a new user adapts (the
            // fine-tuning learning rate; Reptile's k steps); its outer step is the server
            // optimizer.
            local_steps: if meta {
                self.meta_local_steps.max(1) as u32
            } else {
                self.local_steps
            },
            lr: if meta { self.finetune_lr } else { self.lr },
            batch_size: self.batch_size,
            seq_len: self.train_seq_len,
            clip_norm: self.clip_norm,
            lora: self.lora(),
            server: if meta {
                ServerStep {
                    optimizer: self.meta_optimizer,
                    lr: self.meta_server_lr,
                    momentum: 0.9,
                }
            } else {
                ServerStep {
                    optimizer: "sgd",
                    lr: 1.0,
                    momentum: 0.9,
                }
            },
            dropout: self.dropout,
            seed: self.seed,
            // The reference for privacy's cost: FedAvg as it would run without DP.
            privacy: if name == NONPRIVATE {
                federation::PrivacyPlan {
                    mode: PrivacyMode::None,
                    epsilon: None,
                    noise_multiplier: None,
                    secure_aggregation: false,
                    ..self.privacy
                }
            } else {
                self.privacy
            },
        }
    }

    fn few_shot(&self) -> FewShot {
        FewShot {
            lora: self.lora(),
            support_lines: self.support_lines,
            steps: self.finetune_steps,
            curve_to: self.curve_steps,
            lr: self.finetune_lr,
            batch_size: self.batch_size as usize,
            train_seq_len: self.train_seq_len as usize,
            eval_seq_len: self.eval_seq_len,
            seed: self.seed,
            adaptive: self.adaptive,
        }
    }
}

impl SimulateArgs {
    /// The corpus and the base model folder (the shipped ones by default).
    fn paths(&self) -> (PathBuf, PathBuf) {
        (
            self.data
                .clone()
                .unwrap_or_else(fedpersona_model::data::default_corpus_dir),
            self.base
                .clone()
                .unwrap_or_else(checkpoint::default_model_dir),
        )
    }
}

impl Settings {
    /// Loads the corpus's users and splits them.
    fn splits(&self, data: &Path) -> anyhow::Result<corpus::Splits> {
        let users = corpus::load_users(data)
            .with_context(|| format!("loading users from {}", data.display()))?;
        Ok(corpus::split_users(users, &self.split)?)
    }
}

/// The runtime of the in-process aggregator and agents. Local training runs on blocking
/// threads: as many as train at once (plus one for the aggregator's round close), so each
/// keeps its allocator cache warm and no more.
fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(workers + 1)
        .enable_all()
        .build()?)
}

/// Progress bars on a terminal, nothing otherwise.
struct Progress {
    multi: MultiProgress,
}

impl Progress {
    fn new(enabled: bool) -> Self {
        let target = if enabled && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Progress {
            multi: MultiProgress::with_draw_target(target),
        }
    }

    fn bar(&self, len: u64, what: &str) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(len));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>22} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(what.to_string());
        bar
    }
}

/// Runs the simulation and writes the report into `--out`.
pub fn run(args: &SimulateArgs) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut settings = Settings::resolve(args)?;
    let (data_path, base_dir) = args.paths();
    let mut splits = settings.splits(&data_path)?;
    if let Some(cap) = settings.max_train_users {
        splits.train_users.truncate(cap);
    }
    if let Some(cap) = settings.max_heldout_users {
        splits.heldout_users.truncate(cap);
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let base = Arc::new(
        BaseModel::load(&base_dir, &Device::Cpu)
            .with_context(|| format!("loading base model {}", base_dir.display()))?,
    );
    // Windows no longer than the base model's context.
    let max_pos = base.model.config().max_position_embeddings;
    settings.eval_seq_len = settings.eval_seq_len.min(max_pos);
    settings.train_seq_len = settings.train_seq_len.min(max_pos as u32);
    tracing::info!(
        train_users = splits.train_users.len(),
        heldout_users = splits.heldout_users.len(),
        dropped = splits.dropped_users,
        "users"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let rt = runtime(settings.workers)?;
    {
        let stop = stop.clone();
        rt.spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.store(true, Ordering::Relaxed);
                eprintln!("\nstopping: writing a partial report (Ctrl-C again to quit now)");
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
    }
    let tls_dir = args.out.join("tls");
    let material = aggregator::tls::generate(&["localhost".into(), "127.0.0.1".into()])?;
    aggregator::tls::write(&material, &tls_dir)?;
    let env = Env {
        base: base.clone(),
        base_dir: base_dir.clone(),
        tls_dir,
        stop: stop.clone(),
        workers: settings.workers,
    };
    let progress = Progress::new(!args.no_progress);
    let lora = settings.lora();

    // The monitoring slice: a fixed sample of the training users' test windows.
    let train_test: Vec<Window> = windows_of(&base, &splits.train_users, settings.eval_seq_len)?;
    let monitor: Vec<Window> = {
        let mut w = train_test.clone();
        w.shuffle(&mut rand_chacha::ChaCha20Rng::seed_from_u64(settings.seed));
        w.truncate(settings.monitor_windows);
        w
    };
    let monitor_base =
        evaluation::score_windows(&base, None, &lora, &monitor, settings.workers)?.accuracy;

    let mut rounds: Vec<RoundRecord> = Vec::new();
    let mut thetas: BTreeMap<&'static str, AdapterTensors> = BTreeMap::new();
    let mut interrupted = None;
    let mut rounds_completed = u64::MAX;
    let mut spent = Vec::new();
    let private = settings.privacy.mode != PrivacyMode::None;
    let names: &[&'static str] = if private {
        &[NONPRIVATE, "fedavg", "meta"]
    } else {
        &["fedavg", "meta"]
    };
    for &name in names {
        let spec = settings.federation(name);
        let dir = args.out.join(name);
        let enroll = progress.bar(
            splits.train_users.len() as u64,
            &format!("{name}: enrolling"),
        );
        let tick = enroll.clone();
        let mut fed = Federation::start(&rt, spec, &env, &splits.train_users, &dir, move || {
            tick.inc(1)
        })?;
        enroll.finish_and_clear();
        let bar = progress.bar(settings.rounds, &format!("{name}: rounds"));
        let mut done = 0;
        for n in 1..=settings.rounds {
            if stop.load(Ordering::Relaxed) {
                interrupted = Some("federation");
                break;
            }
            if fed.budget_exhausted() {
                tracing::warn!(
                    federation = name,
                    "the privacy budget is spent: no more rounds"
                );
                break;
            }
            let mut record = match fed.round(&rt) {
                Ok(r) => r,
                Err(e) if e.is::<Interrupted>() => {
                    interrupted = Some("federation");
                    break;
                }
                Err(e) => return Err(e),
            };
            done += u64::from(record.committed);
            if n.is_multiple_of(settings.eval_every) || n == settings.rounds {
                let theta = fed.theta();
                record.monitor_accuracy = Some(
                    evaluation::score_windows(
                        &base,
                        Some(&theta),
                        &lora,
                        &monitor,
                        settings.workers,
                    )?
                    .accuracy,
                );
            }
            bar.set_message(format!(
                "loss {:.3}{}",
                record.train_loss.unwrap_or(f64::NAN),
                record
                    .monitor_accuracy
                    .map(|a| format!(", acc {:.2}%", 100.0 * a))
                    .unwrap_or_default()
            ));
            rounds.push(record);
            report::write_rounds(&rounds, &args.out)?;
            bar.inc(1);
        }
        bar.finish();
        tracing::info!(
            federation = name,
            rounds = done,
            rss_mb = fedpersona_model::runtime::rss_mb(),
            peak_rss_mb = fedpersona_model::runtime::peak_rss_mb(),
            "federation finished"
        );
        rounds_completed = rounds_completed.min(done);
        spent.push((fed.privacy, fed.epsilon_spent()));
        thetas.insert(name, fed.theta());
        fed.shutdown(&rt)?;
        if interrupted.is_some() {
            break;
        }
    }
    if rounds_completed == u64::MAX {
        rounds_completed = 0;
    }

    // Evaluation (skipped when the federation was interrupted).
    let mut global_accuracy = None;
    let mut global_accuracy_nonprivate = None;
    let mut base_accuracy_train_users = None;
    let mut methods = BTreeMap::new();
    let mut comparisons = Vec::new();
    let mut adaptive = None;
    if interrupted.is_none() {
        let fedavg = thetas.get("fedavg").cloned();
        let g = evaluation::score_windows(
            &base,
            fedavg.as_ref(),
            &lora,
            &train_test,
            settings.workers,
        )?;
        let b = evaluation::score_windows(&base, None, &lora, &train_test, settings.workers)?;
        if let Some(theta) = thetas.get(NONPRIVATE) {
            let reference = evaluation::score_windows(
                &base,
                Some(theta),
                &lora,
                &train_test,
                settings.workers,
            )?;
            global_accuracy_nonprivate = Some(reference.accuracy);
        }
        tracing::info!(
            peak_rss_mb = fedpersona_model::runtime::peak_rss_mb(),
            "global accuracy scored"
        );
        global_accuracy = Some(g.accuracy);
        base_accuracy_train_users = Some(b.accuracy);

        let few_shot = settings.few_shot();
        let starts = Starts {
            fedavg,
            meta: thetas.get("meta").cloned(),
            fedavg_nonprivate: thetas.get(NONPRIVATE).cloned(),
        };
        let bar = progress.bar(splits.heldout_users.len() as u64, "held-out users");
        let scores = evaluation::par_map(
            &splits.heldout_users,
            settings.workers,
            &stop,
            || bar.inc(1),
            |u| evaluation::personalize(&base, u, &starts, &few_shot),
        )?;
        bar.finish();
        let scores: Vec<UserScores> = scores.into_iter().flatten().collect();
        if scores.len() < splits.heldout_users.len() {
            interrupted = Some("evaluation");
        }
        methods = method_results(&scores, settings.finetune_steps);
        adaptive = report::AdaptiveSummary::of(scores.iter().filter_map(|s| s.adaptive));
        comparisons = method_comparisons(&scores, settings.finetune_steps);
    }

    let rep = Report {
        users: report::UserCounts {
            train: splits.train_users.len(),
            heldout: splits.heldout_users.len(),
            dropped: splits.dropped_users,
        },
        rounds_completed,
        privacy: report::PrivacyReport::new(
            &settings.privacy,
            &spent,
            global_accuracy,
            global_accuracy_nonprivate,
        ),
        global_accuracy,
        base_accuracy_train_users,
        methods,
        comparisons,
        adaptive,
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_mb: fedpersona_model::runtime::peak_rss_mb(),
        complete: interrupted.is_none(),
        interrupted_during: interrupted,
        settings: serde_json::to_value(&settings)?,
        data: data_path.display().to_string(),
        base_model: base_dir.display().to_string(),
    };
    write_plots(&args.out, &rounds, &rep, monitor_base)?;
    report::write(&rep, &args.out)?;
    Ok(rep)
}

fn windows_of(
    base: &BaseModel,
    users: &[UserSplit],
    seq_len: usize,
) -> anyhow::Result<Vec<Window>> {
    let mut out = Vec::new();
    for u in users {
        out.extend(device_agent::adapt::to_windows(base, &u.test, seq_len)?);
    }
    Ok(out)
}

/// A user's report under a method: `base` without an adapter, `global` at step 0 of the
/// FedAvg curve, the others after `budget` fine-tuning steps. None where the method did not
/// run.
fn user_report<'a>(
    s: &'a UserScores,
    method: &str,
    budget: usize,
) -> Option<&'a fedpersona_model::train::EvalReport> {
    let (curve, step) = match method {
        "base" => return Some(&s.base),
        "global" => ("fedavg", 0),
        "fedavg_finetune" => ("fedavg", budget),
        "meta_finetune" => ("meta", budget),
        "local_only" => ("local_only", budget),
        "global_nonprivate" => (NONPRIVATE, 0),
        "adaptive_finetune" => ("adaptive", budget),
        "adaptive_unlikelihood_finetune" => ("adaptive_unlikelihood", budget),
        "fedavg_finetune_nonprivate" => (NONPRIVATE, budget),
        _ => return None,
    };
    s.curves
        .get(curve)?
        .iter()
        .find(|(k, _)| *k == step)
        .map(|(_, r)| r)
}

/// The fine-tuning curve behind a method (None for the methods without local steps).
fn method_curve(method: &str) -> Option<&'static str> {
    match method {
        "local_only" => Some("local_only"),
        "fedavg_finetune" => Some("fedavg"),
        "meta_finetune" => Some("meta"),
        "fedavg_finetune_nonprivate" => Some(NONPRIVATE),
        _ => None,
    }
}

/// The benchmark's ordering as paired differences: meta_finetune − fedavg_finetune,
/// fedavg_finetune − global, global − base, and local_only − base.
fn method_comparisons(scores: &[UserScores], budget: usize) -> Vec<report::Comparison> {
    [
        ("meta_finetune", "fedavg_finetune"),
        ("fedavg_finetune", "global"),
        ("global", "base"),
        ("local_only", "base"),
        // The profile ablation: profile-weighted, profile-scheduled adaptation against the plain
        // one (uniform weights, fixed steps), both from the FedAvg adapter.
        ("adaptive_finetune", "fedavg_finetune"),
        // Rejected suggestions as negatives (unlikelihood) or left out.
        ("adaptive_unlikelihood_finetune", "adaptive_finetune"),
        // Privacy's cost on held-out users (private runs).
        ("global", "global_nonprivate"),
        ("fedavg_finetune", "fedavg_finetune_nonprivate"),
    ]
    .into_iter()
    .filter_map(|(better, worse)| {
        let d: Vec<f64> = scores
            .iter()
            .filter_map(|s| {
                Some(
                    user_report(s, better, budget)?.accuracy
                        - user_report(s, worse, budget)?.accuracy,
                )
            })
            .collect();
        (!d.is_empty()).then(|| {
            let i = report::interval(&d);
            report::Comparison {
                better,
                worse,
                mean_difference: i.mean,
                ci95: i.ci95,
                users: i.n,
            }
        })
    })
    .collect()
}

/// Per-method means and intervals over the evaluated users.
fn method_results(scores: &[UserScores], budget: usize) -> BTreeMap<&'static str, MethodResult> {
    let mut out = BTreeMap::new();
    for method in report::METHODS {
        let picked: Vec<_> = scores
            .iter()
            .filter_map(|s| user_report(s, method, budget))
            .collect();
        if picked.is_empty() {
            continue;
        }
        let a = report::interval(&picked.iter().map(|r| r.accuracy).collect::<Vec<_>>());
        let b = report::interval(&picked.iter().map(|r| r.bits_per_byte).collect::<Vec<_>>());
        let accuracy_by_steps = match method_curve(method) {
            Some(curve) => {
                let mut sums: BTreeMap<usize, (f64, usize)> = BTreeMap::new();
                for (step, r) in scores.iter().filter_map(|s| s.curves.get(curve)).flatten() {
                    let e = sums.entry(*step).or_default();
                    e.0 += r.accuracy;
                    e.1 += 1;
                }
                sums.into_iter()
                    .map(|(k, (s, n))| (k, s / n as f64))
                    .collect()
            }
            None => BTreeMap::from([(0, a.mean)]),
        };
        out.insert(
            method,
            MethodResult {
                accuracy: a.mean,
                accuracy_ci95: a.ci95,
                bits_per_byte: b.mean,
                bits_per_byte_ci95: b.ci95,
                users: a.n,
                accuracy_by_steps,
            },
        );
    }
    out
}

fn write_plots(
    out: &Path,
    rounds: &[RoundRecord],
    rep: &Report,
    monitor_base: f64,
) -> anyhow::Result<()> {
    let mut series = Vec::new();
    for name in ["fedavg", "meta"] {
        let points: Vec<(f64, f64)> = rounds
            .iter()
            .filter(|r| r.federation == name)
            .filter_map(|r| r.monitor_accuracy.map(|a| (r.round as f64, a)))
            .collect();
        if !points.is_empty() {
            let mut pts = vec![(0.0, monitor_base)];
            pts.extend(points);
            series.push(plot::Series {
                name: format!("{name} global adapter"),
                points: pts,
            });
        }
    }
    plot::line_chart(
        &out.join("accuracy_vs_round.svg"),
        "Global adapter accuracy on training users' test data (monitoring slice)",
        "round",
        "next-byte accuracy %",
        &series,
    )?;
    let mut series = Vec::new();
    for m in ["local_only", "fedavg_finetune", "meta_finetune"] {
        if let Some(x) = rep.methods.get(m) {
            series.push(plot::Series {
                name: m.to_string(),
                points: x
                    .accuracy_by_steps
                    .iter()
                    .map(|(k, v)| (*k as f64, *v))
                    .collect(),
            });
        }
    }
    plot::line_chart(
        &out.join("accuracy_vs_steps.svg"),
        "Held-out users: accuracy after local fine-tuning steps",
        "local steps",
        "next-byte accuracy %",
        &series,
    )
}
