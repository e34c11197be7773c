//! `aggregator serve` configuration: a TOML file (unknown keys refused) resolved into a
//! validated [`Config`] before any port is bound. Relative paths are relative to the file.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use fedpersona_model::config::LlamaConfig;
use fedpersona_model::lora::{LoraConfig, Target};
use fedpersona_privacy::codec::Encoding;
use fedpersona_privacy::mode;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    server: ServerFile,
    tls: TlsFile,
    enrollment: EnrollmentFile,
    model: ModelFile,
    #[serde(default)]
    adapter: AdapterFile,
    rounds: RoundsFile,
    #[serde(default)]
    training: TrainingFile,
    #[serde(default)]
    update: UpdateFile,
    #[serde(default)]
    meta: MetaFile,
    #[serde(default)]
    privacy: PrivacyFile,
    #[serde(default)]
    secure_aggregation: SecAggFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    listen: SocketAddr,
    metrics_listen: Option<SocketAddr>,
    state_dir: PathBuf,
    #[serde(default = "default_max_concurrent_uploads")]
    max_concurrent_uploads: usize,
    #[serde(default = "default_keep_versions")]
    keep_versions: usize,
}

fn default_max_concurrent_uploads() -> usize {
    8
}
fn default_keep_versions() -> usize {
    10
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(default)]
    plaintext: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollmentFile {
    #[serde(default)]
    tokens: Vec<String>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    /// The base model folder (its `config.json` fixes the adapter shapes).
    dir: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AdapterFile {
    rank: usize,
    alpha: f64,
    targets: Vec<String>,
    freeze_a: bool,
    seed: u64,
}

impl Default for AdapterFile {
    fn default() -> Self {
        let d = LoraConfig::default();
        AdapterFile {
            rank: d.rank,
            alpha: d.alpha,
            targets: d.targets.iter().map(|t| t.name().to_string()).collect(),
            freeze_a: d.freeze_a,
            seed: d.seed,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoundsFile {
    cohort_size: u32,
    #[serde(default = "default_over_selection")]
    over_selection: f64,
    min_reports: u32,
    round_timeout_s: f64,
    #[serde(default = "default_min_task_time_s")]
    min_task_time_s: f64,
    #[serde(default = "default_retry_s")]
    retry_after_s: f64,
    #[serde(default)]
    max_rounds: u64,
}

fn default_over_selection() -> f64 {
    0.3
}
fn default_min_task_time_s() -> f64 {
    10.0
}
fn default_retry_s() -> f64 {
    30.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TrainingFile {
    steps: u32,
    learning_rate: f64,
    batch_size: u32,
    seq_len: u32,
    weight_decay: f64,
    grad_clip: f64,
}

impl Default for TrainingFile {
    fn default() -> Self {
        TrainingFile {
            steps: 10,
            learning_rate: 2e-3,
            batch_size: 8,
            seq_len: 128,
            weight_decay: 0.0,
            grad_clip: 1.0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct UpdateFile {
    clip_norm: f64,
    encoding: String,
    max_upload_bytes: u64,
    chunk_bytes: u32,
    weighting: String,
    max_examples_weight: u32,
}

impl Default for UpdateFile {
    fn default() -> Self {
        UpdateFile {
            clip_norm: 1.0,
            encoding: "q8".into(),
            max_upload_bytes: 64 << 20,
            chunk_bytes: 1 << 20,
            weighting: "uniform".into(),
            max_examples_weight: 10_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct MetaFile {
    optimizer: String,
    server_lr: f64,
    momentum: f64,
    beta1: f64,
    beta2: f64,
    tau: f64,
}

impl Default for MetaFile {
    fn default() -> Self {
        MetaFile {
            optimizer: "sgd".into(),
            server_lr: 1.0,
            momentum: 0.9,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct PrivacyFile {
    mode: String,
    noise_multiplier: f64,
    population: u64,
    epsilon_budget: f64,
    delta: f64,
}

impl Default for PrivacyFile {
    fn default() -> Self {
        PrivacyFile {
            mode: "none".into(),
            noise_multiplier: 0.0,
            population: 0,
            epsilon_budget: 0.0,
            delta: 0.0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct SecAggFile {
    enabled: bool,
    max_neighbours: u32,
    phase_timeout_s: f64,
}

impl Default for SecAggFile {
    fn default() -> Self {
        SecAggFile {
            enabled: false,
            max_neighbours: 20,
            phase_timeout_s: 60.0,
        }
    }
}

/// Where differential-privacy noise is added (see `shared::privacy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PrivacyMode {
    /// Clipping only: no DP guarantee, no accounting.
    None,
    /// Each device adds N(0, z²C²): every update is DP on its own.
    Local,
    /// Each device adds a discrete Gaussian share; the sum of at least `min_reports` carries
    /// zC. Only with secure aggregation.
    Distributed,
    /// The aggregator adds N(0, z²C²) to the sum (a trusted server).
    Central,
}

impl PrivacyMode {
    pub fn name(self) -> &'static str {
        match self {
            PrivacyMode::None => "none",
            PrivacyMode::Local => "local",
            PrivacyMode::Distributed => "distributed",
            PrivacyMode::Central => "central",
        }
    }
}

/// A hard (ε, δ) budget over the deployment's life.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub epsilon: f64,
    pub delta: f64,
}

/// Differential privacy of the rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivacyPolicy {
    pub mode: PrivacyMode,
    /// z: noise standard deviation over the clip norm, for the whole sum.
    pub noise_multiplier: f64,
    /// q: the chance that a given user's update is in a round (assigned devices over the
    /// population), as the accountant's Poisson sampling rate.
    pub sampling_rate: f64,
    /// None only when `mode` is none.
    pub budget: Option<Budget>,
}

/// Secure aggregation (SecAgg+) of a round's updates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecAggPolicy {
    pub max_neighbours: u32,
    /// Each phase (advertise keys, share keys, masked input, unmask) ends after this.
    pub phase_timeout: Duration,
    /// γ: a delta value x travels as the integer ≈ x/γ; sized so the sum of every assigned
    /// device's clipped, noised input cannot wrap around 2^32.
    pub granularity: f64,
}

/// How the server listens.
#[derive(Debug, Clone)]
pub enum Transport {
    Tls {
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
    },
    /// Only on a loopback address.
    Plaintext,
}

/// Round scheduling.
#[derive(Debug, Clone)]
pub struct RoundPolicy {
    /// Reports that close a round early.
    pub target_reports: NonZeroU32,
    /// Devices assigned per round: the target plus over-selection for stragglers.
    pub max_assigned: NonZeroU32,
    /// Fewer reports than this at the deadline abandon the round.
    pub min_reports: NonZeroU32,
    /// From the first assignment to the deadline.
    pub round_timeout: Duration,
    /// A device is not assigned when less than this is left before the deadline.
    pub min_task_time: Duration,
    pub retry_after: Duration,
    /// Stop after this many committed rounds (None: run forever).
    pub max_rounds: Option<u64>,
}

/// What devices are told to do locally.
#[derive(Debug, Clone, Copy)]
pub struct LocalTraining {
    pub steps: u32,
    pub learning_rate: f64,
    pub batch_size: u32,
    pub seq_len: u32,
    pub weight_decay: f64,
    pub grad_clip: f64,
}

/// How reports are weighted in the mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weighting {
    Uniform,
    /// By the reported number of examples, capped.
    Examples {
        cap: u32,
    },
}

/// Rules every upload is held to.
#[derive(Debug, Clone, Copy)]
pub struct UpdatePolicy {
    pub clip_norm: f32,
    pub encoding: Encoding,
    pub max_upload_bytes: u64,
    pub chunk_bytes: u32,
    pub weighting: Weighting,
}

/// The server step applied to the mean delta (Reptile / FedAvg / FedAvgM / FedAdam).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ServerOptimizer {
    /// θ ← θ + lr·Δ̄ (FedAvg when lr = 1, Reptile's outer step otherwise).
    Sgd { lr: f64 },
    /// FedAvgM: m ← μ·m + Δ̄; θ ← θ + lr·m.
    Momentum { lr: f64, momentum: f64 },
    /// FedAdam (Reddi et al. 2021).
    Adam {
        lr: f64,
        beta1: f64,
        beta2: f64,
        tau: f64,
    },
}

/// A validated `serve` configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub state_dir: PathBuf,
    pub max_concurrent_uploads: usize,
    pub keep_versions: usize,
    pub transport: Transport,
    /// SHA-256 digests of the accepted enrollment tokens (tokens themselves are not kept).
    pub enrollment_token_digests: Vec<[u8; 32]>,
    pub model: LlamaConfig,
    pub adapter: LoraConfig,
    pub rounds: RoundPolicy,
    pub training: LocalTraining,
    pub update: UpdatePolicy,
    pub meta: ServerOptimizer,
    pub privacy: PrivacyPolicy,
    pub secure_aggregation: Option<SecAggPolicy>,
}

impl Config {
    /// Reads, parses and validates a config file; the error names the file and the problem.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
            .with_context(|| format!("invalid config {}", path.display()))
    }

    /// Parses config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> anyhow::Result<Config> {
        let f: File = toml::from_str(text)?;
        let resolve = |p: &Path| fedpersona_model::checkpoint::resolve_path(base, p);

        let transport = match (&f.tls.cert, &f.tls.key, f.tls.plaintext) {
            (Some(cert), Some(key), false) => {
                let (cert, key) = (resolve(cert), resolve(key));
                Transport::Tls {
                    cert_pem: std::fs::read(&cert)
                        .with_context(|| format!("tls.cert {}", cert.display()))?,
                    key_pem: std::fs::read(&key)
                        .with_context(|| format!("tls.key {}", key.display()))?,
                }
            }
            (None, None, true) => {
                ensure!(
                    f.server.listen.ip().is_loopback()
                        && f.server.metrics_listen.is_none_or(|a| a.ip().is_loopback()),
                    "tls.plaintext is only allowed on a loopback listen address, not {}",
                    f.server.listen
                );
                Transport::Plaintext
            }
            (_, _, true) => bail!("tls.plaintext = true excludes tls.cert and tls.key"),
            _ => bail!("[tls] needs both cert and key (or plaintext = true on loopback)"),
        };

        let mut tokens = f.enrollment.tokens.clone();
        if let Some(p) = &f.enrollment.token_file {
            let p = resolve(p);
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("enrollment.token_file {}", p.display()))?;
            tokens.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from),
            );
        }
        ensure!(!tokens.is_empty(), "[enrollment] names no token");
        for t in &tokens {
            ensure!(
                t.len() >= 16,
                "enrollment tokens must be at least 16 characters"
            );
        }
        let enrollment_token_digests = tokens.iter().map(|t| token_digest(t)).collect::<Vec<_>>();

        let model_dir = resolve(&f.model.dir);
        let model = LlamaConfig::from_file(&model_dir.join("config.json"))
            .with_context(|| format!("model.dir {}", model_dir.display()))?;

        let targets = f
            .adapter
            .targets
            .iter()
            .map(|s| Target::parse(s).with_context(|| format!("unknown adapter target {s:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let adapter = LoraConfig {
            rank: f.adapter.rank,
            alpha: f.adapter.alpha,
            targets,
            freeze_a: f.adapter.freeze_a,
            seed: f.adapter.seed,
        };
        adapter.validate()?;

        let r = &f.rounds;
        let nz = |v: u32, what: &str| {
            NonZeroU32::new(v).with_context(|| format!("rounds.{what} must be at least 1"))
        };
        let target_reports = nz(r.cohort_size, "cohort_size")?;
        let min_reports = nz(r.min_reports, "min_reports")?;
        ensure!(
            min_reports <= target_reports,
            "rounds.min_reports ({min_reports}) exceeds rounds.cohort_size ({target_reports})"
        );
        ensure!(
            r.over_selection.is_finite() && (0.0..=10.0).contains(&r.over_selection),
            "rounds.over_selection must be in [0, 10]"
        );
        let max_assigned =
            mode::assigned_per_round(u64::from(target_reports.get()), r.over_selection);
        let max_assigned = NonZeroU32::new(max_assigned.min(u64::from(u32::MAX)) as u32)
            .context("rounds: cohort too large")?;
        let secs = |v: f64, what: &str| -> anyhow::Result<Duration> {
            ensure!(
                v.is_finite() && v > 0.0 && v < 1e7,
                "rounds.{what} must be a positive number of seconds"
            );
            Ok(Duration::from_secs_f64(v))
        };
        let round_timeout = secs(r.round_timeout_s, "round_timeout_s")?;
        let min_task_time = secs(r.min_task_time_s, "min_task_time_s")?;
        ensure!(
            min_task_time < round_timeout,
            "rounds.min_task_time_s must be below rounds.round_timeout_s"
        );
        let rounds = RoundPolicy {
            target_reports,
            max_assigned,
            min_reports,
            round_timeout,
            min_task_time,
            retry_after: secs(r.retry_after_s, "retry_after_s")?,
            max_rounds: (r.max_rounds > 0).then_some(r.max_rounds),
        };

        let t = &f.training;
        ensure!(t.steps >= 1, "training.steps must be at least 1");
        ensure!(t.batch_size >= 1, "training.batch_size must be at least 1");
        ensure!(
            t.seq_len >= 8 && t.seq_len as usize <= model.max_position_embeddings,
            "training.seq_len must be in [8, {}]",
            model.max_position_embeddings
        );
        ensure!(
            t.learning_rate.is_finite() && t.learning_rate > 0.0,
            "training.learning_rate must be positive"
        );
        ensure!(
            t.weight_decay.is_finite() && t.weight_decay >= 0.0,
            "training.weight_decay must be non-negative"
        );
        ensure!(
            t.grad_clip.is_finite() && t.grad_clip >= 0.0,
            "training.grad_clip must be non-negative (0 = off)"
        );
        let training = LocalTraining {
            steps: t.steps,
            learning_rate: t.learning_rate,
            batch_size: t.batch_size,
            seq_len: t.seq_len,
            weight_decay: t.weight_decay,
            grad_clip: t.grad_clip,
        };

        let u = &f.update;
        ensure!(
            u.clip_norm.is_finite() && u.clip_norm > 0.0 && u.clip_norm < 1e6,
            "update.clip_norm must be positive"
        );
        let encoding = match u.encoding.as_str() {
            "q8" => Encoding::Q8,
            "f32" => Encoding::F32,
            other => bail!("update.encoding must be \"q8\" or \"f32\", not {other:?}"),
        };
        ensure!(
            (1024..=1 << 30).contains(&u.max_upload_bytes),
            "update.max_upload_bytes must be between 1 KiB and 1 GiB"
        );
        ensure!(
            (1024..=4 << 20).contains(&u.chunk_bytes),
            "update.chunk_bytes must be between 1 KiB and 4 MiB"
        );
        let weighting = match u.weighting.as_str() {
            "uniform" => Weighting::Uniform,
            "examples" => {
                ensure!(
                    u.max_examples_weight >= 1,
                    "update.max_examples_weight must be at least 1"
                );
                Weighting::Examples {
                    cap: u.max_examples_weight,
                }
            }
            other => bail!("update.weighting must be \"uniform\" or \"examples\", not {other:?}"),
        };
        let update = UpdatePolicy {
            clip_norm: u.clip_norm as f32,
            encoding,
            max_upload_bytes: u.max_upload_bytes,
            chunk_bytes: u.chunk_bytes,
            weighting,
        };

        let m = &f.meta;
        let finite_pos = |v: f64, what: &str| {
            ensure!(v.is_finite() && v > 0.0, "meta.{what} must be positive");
            Ok(())
        };
        finite_pos(m.server_lr, "server_lr")?;
        let meta = match m.optimizer.as_str() {
            "sgd" => ServerOptimizer::Sgd { lr: m.server_lr },
            "momentum" => {
                ensure!((0.0..1.0).contains(&m.momentum), "meta.momentum must be in [0, 1)");
                ServerOptimizer::Momentum {
                    lr: m.server_lr,
                    momentum: m.momentum,
                }
            }
            "adam" => {
                ensure!((0.0..1.0).contains(&m.beta1), "meta.beta1 must be in [0, 1)");
                ensure!((0.0..1.0).contains(&m.beta2), "meta.beta2 must be in [0, 1)");
                finite_pos(m.tau, "tau")?;
                ServerOptimizer::Adam {
                    lr: m.server_lr,
                    beta1: m.beta1,
                    beta2: m.beta2,
                    tau: m.tau,
                }
            }
            other => bail!(
                "meta.optimizer must be \"sgd\" (FedAvg/Reptile), \"momentum\" (FedAvgM) or \"adam\" (FedAdam), not {other:?}"
            ),
        };

        let (privacy, secure_aggregation) = privacy_policy(&f, &rounds, &update)?;

        ensure!(
            f.server.max_concurrent_uploads >= 1,
            "server.max_concurrent_uploads must be at least 1"
        );
        ensure!(
            f.server.keep_versions >= 1,
            "server.keep_versions must be at least 1"
        );

        Ok(Config {
            listen: f.server.listen,
            metrics_listen: f.server.metrics_listen,
            state_dir: resolve(&f.server.state_dir),
            max_concurrent_uploads: f.server.max_concurrent_uploads,
            keep_versions: f.server.keep_versions,
            transport,
            enrollment_token_digests,
            model,
            adapter,
            rounds,
            training,
            update,
            meta,
            privacy,
            secure_aggregation,
        })
    }
}

fn privacy_policy(
    f: &File,
    rounds: &RoundPolicy,
    update: &UpdatePolicy,
) -> anyhow::Result<(PrivacyPolicy, Option<SecAggPolicy>)> {
    let p = &f.privacy;
    let mode = match p.mode.as_str() {
        "none" => PrivacyMode::None,
        "local" => PrivacyMode::Local,
        "distributed" => PrivacyMode::Distributed,
        "central" => PrivacyMode::Central,
        other => bail!("privacy.mode must be none, local, distributed or central, not {other:?}"),
    };
    let s = &f.secure_aggregation;
    let assigned = rounds.max_assigned.get();
    let policy = if mode == PrivacyMode::None {
        ensure!(
            p.noise_multiplier == 0.0 && p.epsilon_budget == 0.0,
            "privacy.noise_multiplier and privacy.epsilon_budget need a privacy.mode other than none"
        );
        PrivacyPolicy {
            mode,
            noise_multiplier: 0.0,
            sampling_rate: 0.0,
            budget: None,
        }
    } else {
        ensure!(
            p.noise_multiplier.is_finite() && p.noise_multiplier > 0.0 && p.noise_multiplier <= 1e3,
            "privacy.noise_multiplier must be in (0, 1000] with privacy.mode {:?}",
            p.mode
        );
        ensure!(
            p.population >= u64::from(assigned),
            "privacy.population ({}) must be at least the devices assigned per round ({assigned}): \
             it is the number of eligible devices, and assigned / population is the sampling rate",
            p.population
        );
        ensure!(
            p.epsilon_budget.is_finite() && p.epsilon_budget > 0.0,
            "privacy.epsilon_budget must be positive with privacy.mode {:?}",
            p.mode
        );
        ensure!(
            p.delta > 0.0 && p.delta < 1e-2,
            "privacy.delta must be in (0, 0.01)"
        );
        ensure!(
            update.weighting == Weighting::Uniform,
            "update.weighting must be \"uniform\" with differential privacy: weights by reported \
             example counts change the sensitivity"
        );
        let policy = PrivacyPolicy {
            mode,
            noise_multiplier: p.noise_multiplier,
            sampling_rate: mode::sampling_rate(u64::from(assigned), p.population),
            budget: Some(Budget {
                epsilon: p.epsilon_budget,
                delta: p.delta,
            }),
        };
        let one = fedpersona_privacy::accountant::epsilon(
            policy.noise_multiplier,
            policy.sampling_rate,
            1,
            p.delta,
        )?;
        ensure!(
            one <= p.epsilon_budget,
            "privacy: a single round already costs epsilon {one:.3}, above privacy.epsilon_budget {}",
            p.epsilon_budget
        );
        policy
    };
    if mode == PrivacyMode::Distributed {
        ensure!(
            s.enabled,
            "privacy.mode \"distributed\" needs [secure_aggregation] enabled = true: without it the \
             aggregator sees each device's under-noised update"
        );
    }
    let secagg = if s.enabled {
        ensure!(
            update.weighting == Weighting::Uniform,
            "secure aggregation sums updates unweighted: update.weighting must be \"uniform\""
        );
        ensure!(
            rounds.target_reports.get() >= 3,
            "secure aggregation needs rounds.cohort_size of at least 3"
        );
        ensure!(
            (2..=254).contains(&s.max_neighbours),
            "secure_aggregation.max_neighbours must be in [2, 254]"
        );
        ensure!(
            s.phase_timeout_s.is_finite() && s.phase_timeout_s >= 1.0 && s.phase_timeout_s < 1e5,
            "secure_aggregation.phase_timeout_s must be at least 1 second"
        );
        // Each device's noise share is z·B/√m: m = min_reports under distributed noise; a
        // local-noise device adds its whole z·B (m = 1); otherwise none.
        let (z, m) = match mode {
            PrivacyMode::Distributed => (policy.noise_multiplier, rounds.min_reports.get()),
            PrivacyMode::Local => (policy.noise_multiplier, 1),
            PrivacyMode::None | PrivacyMode::Central => (0.0, 1),
        };
        let grid = mode::secagg_grid(
            f64::from(update.clip_norm),
            u64::from(assigned),
            z,
            u64::from(m),
        );
        ensure!(
            grid.units >= mode::MIN_GRID_UNITS,
            "secure aggregation: {assigned} devices per round leave {} grid steps per clip norm; \
             fewer devices per round are needed",
            grid.units
        );
        Some(SecAggPolicy {
            max_neighbours: s.max_neighbours,
            phase_timeout: Duration::from_secs_f64(s.phase_timeout_s),
            granularity: grid.granularity,
        })
    } else {
        None
    };
    Ok((policy, secagg))
}

/// SHA-256 of an enrollment token: what the server compares.
pub fn token_digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}
