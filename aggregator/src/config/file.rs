//! The TOML file's schema, section by section, as `Config::load` reads it: public and
//! serializable, so a program can build a file value and write it with `toml::to_string`.

use std::net::SocketAddr;
use std::path::PathBuf;

use fedpersona_model::lora::LoraConfig;
use fedpersona_privacy::accountant::Method;
use serde::{Deserialize, Serialize};

/// The whole file: `[server]`, `[tls]`, `[enrollment]`, `[model]` and `[rounds]` are required,
/// the other sections default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub server: ServerFile,
    pub tls: TlsFile,
    pub enrollment: EnrollmentFile,
    pub model: ModelFile,
    #[serde(default)]
    pub adapter: AdapterFile,
    pub rounds: RoundsFile,
    #[serde(default)]
    pub training: TrainingFile,
    #[serde(default)]
    pub update: UpdateFile,
    #[serde(default)]
    pub meta: MetaFile,
    #[serde(default)]
    pub privacy: PrivacyFile,
    #[serde(default)]
    pub secure_aggregation: SecAggFile,
}

impl ConfigFile {
    /// A file of the required sections, every optional section at its default.
    pub fn new(
        server: ServerFile,
        tls: TlsFile,
        enrollment: EnrollmentFile,
        model: ModelFile,
        rounds: RoundsFile,
    ) -> Self {
        ConfigFile {
            server,
            tls,
            enrollment,
            model,
            adapter: AdapterFile::default(),
            rounds,
            training: TrainingFile::default(),
            update: UpdateFile::default(),
            meta: MetaFile::default(),
            privacy: PrivacyFile::default(),
            secure_aggregation: SecAggFile::default(),
        }
    }
}

/// `[server]`: where to listen and keep state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub listen: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    pub state_dir: PathBuf,
    #[serde(default = "default_max_concurrent_uploads")]
    pub max_concurrent_uploads: usize,
    /// Longest wait for an upload's header, and between its chunks.
    #[serde(default = "default_upload_idle_timeout_s")]
    pub upload_idle_timeout_s: f64,
    /// Longest an upload stream may take, header to last chunk.
    #[serde(default = "default_upload_timeout_s")]
    pub upload_timeout_s: f64,
    #[serde(default = "default_keep_versions")]
    pub keep_versions: usize,
    /// TCP connections open at once; more wait in the listen backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Longest a TLS handshake may take.
    #[serde(default = "default_handshake_timeout_s")]
    pub handshake_timeout_s: f64,
    /// HTTP/2 streams (calls) open at once on one connection.
    #[serde(default = "default_max_streams_per_connection")]
    pub max_streams_per_connection: u32,
}

impl ServerFile {
    /// Listening on `listen` with state in `state_dir`, no metrics endpoint, other keys at
    /// their defaults.
    pub fn new(listen: SocketAddr, state_dir: impl Into<PathBuf>) -> Self {
        ServerFile {
            listen,
            metrics_listen: None,
            state_dir: state_dir.into(),
            max_concurrent_uploads: default_max_concurrent_uploads(),
            upload_idle_timeout_s: default_upload_idle_timeout_s(),
            upload_timeout_s: default_upload_timeout_s(),
            keep_versions: default_keep_versions(),
            max_connections: default_max_connections(),
            handshake_timeout_s: default_handshake_timeout_s(),
            max_streams_per_connection: default_max_streams_per_connection(),
        }
    }
}

fn default_max_concurrent_uploads() -> usize {
    8
}
fn default_upload_idle_timeout_s() -> f64 {
    20.0
}
fn default_upload_timeout_s() -> f64 {
    120.0
}
fn default_max_connections() -> usize {
    1024
}
fn default_handshake_timeout_s() -> f64 {
    10.0
}
fn default_max_streams_per_connection() -> u32 {
    64
}
fn default_keep_versions() -> usize {
    10
}

/// `[tls]`: certificate and key files, or plaintext (loopback only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub plaintext: bool,
}

impl TlsFile {
    /// TLS with this certificate and key (PEM files).
    pub fn files(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        TlsFile {
            cert: Some(cert.into()),
            key: Some(key.into()),
            plaintext: false,
        }
    }

    /// No TLS: accepted only on a loopback listen address.
    pub fn plaintext() -> Self {
        TlsFile {
            cert: None,
            key: None,
            plaintext: true,
        }
    }
}

/// `[enrollment]`: the tokens a device may enroll with (inline or one per line in a file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentFile {
    #[serde(default)]
    pub tokens: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

impl EnrollmentFile {
    /// These tokens, inline.
    pub fn tokens(tokens: Vec<String>) -> Self {
        EnrollmentFile {
            tokens,
            token_file: None,
        }
    }
}

/// `[model]`: the base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    /// The base model folder (its `config.json` fixes the adapter shapes).
    pub dir: PathBuf,
}

/// `[adapter]`: the LoRA adapter being federated (defaults: `LoraConfig::default()`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterFile {
    pub rank: usize,
    pub alpha: f64,
    /// Module names, as `Target::name` spells them.
    pub targets: Vec<String>,
    pub freeze_a: bool,
    pub seed: u64,
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

/// `[rounds]`: how devices are sampled, cohort size, over-selection, minimum reports and
/// timing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundsFile {
    /// How a round's devices are chosen (required with differential privacy: `"poisson"`).
    #[serde(default)]
    pub sampling: SamplingFile,
    /// With `"poisson"`, the expected cohort: q = cohort_size / privacy.population.
    pub cohort_size: u32,
    /// First-come cohorts only: devices assigned beyond the cohort, for stragglers
    /// (default 0.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over_selection: Option<f64>,
    /// Poisson only: seconds from a round's opening until joins close (default three
    /// check-in intervals, `3 × retry_after_s`, at most half of `round_timeout_s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_window_s: Option<f64>,
    pub min_reports: u32,
    pub round_timeout_s: f64,
    #[serde(default = "default_min_task_time_s")]
    pub min_task_time_s: f64,
    #[serde(default = "default_retry_s")]
    pub retry_after_s: f64,
    /// Stop after this many committed rounds; 0: no limit.
    #[serde(default)]
    pub max_rounds: u64,
}

impl RoundsFile {
    /// The required keys; over-selection, minimum task time and retry at their defaults, no
    /// limit on rounds.
    pub fn new(cohort_size: u32, min_reports: u32, round_timeout_s: f64) -> Self {
        RoundsFile {
            sampling: SamplingFile::default(),
            cohort_size,
            over_selection: None,
            join_window_s: None,
            min_reports,
            round_timeout_s,
            min_task_time_s: default_min_task_time_s(),
            retry_after_s: default_retry_s(),
            max_rounds: 0,
        }
    }
}

/// `rounds.sampling`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplingFile {
    /// The first devices to check in, up to the cohort and its over-selection: no sampling
    /// the accountant can stand behind, so only without differential privacy.
    #[default]
    FirstCome,
    /// Each device draws its own participation with probability q, and the aggregator takes
    /// every device that drew itself in.
    Poisson,
}
fn default_min_task_time_s() -> f64 {
    10.0
}
fn default_retry_s() -> f64 {
    30.0
}

/// `[training]`: what devices are told to do locally.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingFile {
    pub steps: u32,
    pub learning_rate: f64,
    pub batch_size: u32,
    pub seq_len: u32,
    pub weight_decay: f64,
    pub grad_clip: f64,
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

/// `[update]`: clipping, encoding, size limits and weighting of uploads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpdateFile {
    pub clip_norm: f64,
    /// `"q8"` or `"f32"`.
    pub encoding: String,
    pub max_upload_bytes: u64,
    pub chunk_bytes: u32,
    /// `"uniform"` or `"examples"` (capped at `max_examples_weight`).
    pub weighting: String,
    pub max_examples_weight: u32,
    /// Adaptive clipping: absent, the clip norm stays `clip_norm`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive_clipping: Option<AdaptiveClippingFile>,
}

/// `[update.adaptive_clipping]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveClippingFile {
    /// γ, in (0, 1): the share of devices left unclipped (0.5: the median norm).
    pub target_quantile: f64,
    /// η of the geometric step, in (0, 10].
    pub learning_rate: f64,
    /// σ_b in devices (default 0.05 × cohort_size, as Andrew et al.).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count_stddev: Option<f64>,
    /// The first round's clip norm (default: the largest `clip_norm` allows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_clip_norm: Option<f64>,
    /// The smallest clip norm (default: the largest over 1000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_clip_norm: Option<f64>,
}

impl Default for AdaptiveClippingFile {
    fn default() -> Self {
        AdaptiveClippingFile {
            target_quantile: 0.5,
            learning_rate: 0.2,
            count_stddev: None,
            initial_clip_norm: None,
            min_clip_norm: None,
        }
    }
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
            adaptive_clipping: None,
        }
    }
}

/// `[meta]`: the server optimizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetaFile {
    /// `"sgd"`, `"momentum"` or `"adam"`.
    pub optimizer: String,
    pub server_lr: f64,
    pub momentum: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub tau: f64,
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

/// `[privacy]`: differential privacy mode, noise, population, budget and accountant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyFile {
    /// `"none"`, `"local"`, `"distributed"` or `"central"` (`PrivacyMode::name`).
    pub mode: String,
    pub noise_multiplier: f64,
    pub population: u64,
    pub epsilon_budget: f64,
    pub delta: f64,
    /// What bounds ε: `"rdp"` (the default) or `"pld"` (tighter).
    pub accountant: Method,
    /// Run even though the expected signal-to-noise ratio of a round is below
    /// `config::MIN_EXPECTED_SNR` (refused otherwise).
    pub allow_low_snr: bool,
}

impl Default for PrivacyFile {
    fn default() -> Self {
        PrivacyFile {
            mode: "none".into(),
            noise_multiplier: 0.0,
            population: 0,
            epsilon_budget: 0.0,
            delta: 0.0,
            accountant: Method::default(),
            allow_low_snr: false,
        }
    }
}

/// `[secure_aggregation]`: SecAgg+ of the updates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecAggFile {
    pub enabled: bool,
    pub max_neighbours: u32,
    pub phase_timeout_s: f64,
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
