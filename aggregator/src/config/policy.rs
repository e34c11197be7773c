//! The validated policy types a [`Config`](super::Config) is made of: rounds, uploads, the
//! server optimizer, transport, differential privacy and secure aggregation.

use std::num::NonZeroU32;
use std::time::Duration;

use fedpersona_privacy::accountant::Method;
use fedpersona_privacy::codec::Encoding;

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
    /// q: the chance that a given user's update is in a round, each device's own Poisson
    /// draw (`rounds.sampling = "poisson"`).
    pub sampling_rate: f64,
    /// None only when `mode` is none.
    pub budget: Option<Budget>,
    /// The accountant that charges rounds against the budget (RDP unless the file says PLD).
    pub accountant: Method,
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

/// How a round's devices are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The first devices to check in, up to `max_assigned`.
    FirstCome,
    /// Each device joins with probability `rate`, drawn on the device; the aggregator takes
    /// every device that drew itself in (see `fedpersona_privacy::sampling`).
    Poisson {
        rate: f64,
        /// From a round's opening until joins close: a device that checks in within it
        /// gets its draw for the round.
        join_window: Duration,
    },
}

impl Sampling {
    /// The Poisson rate, if devices draw their participation.
    pub fn rate(self) -> Option<f64> {
        match self {
            Sampling::FirstCome => None,
            Sampling::Poisson { rate, .. } => Some(rate),
        }
    }
}

/// Round scheduling.
#[derive(Debug, Clone)]
pub struct RoundPolicy {
    pub sampling: Sampling,
    /// First come: reports that close a round early. Poisson: the expected cohort.
    pub target_reports: NonZeroU32,
    /// First come: devices assigned per round, the target plus over-selection for
    /// stragglers. Poisson: the largest cohort the aggregator is built for (the SecAgg
    /// grid); a round that more devices join is abandoned.
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
    /// The L2 bound of every upload (before noise): the fixed clip norm, or with adaptive
    /// clipping the ceiling of a round's extended bound (update and count coordinate).
    pub clip_norm: f32,
    /// The clip norm follows a quantile of update norms (`fedpersona_privacy::adaptive_clip`).
    pub adaptive: Option<AdaptiveClipping>,
    pub encoding: Encoding,
    pub max_upload_bytes: u64,
    pub chunk_bytes: u32,
    pub weighting: Weighting,
}

/// `[update.adaptive_clipping]`, validated: each round's clip norm C steps by
/// C·exp(−η(b̄ − γ)) from the noised share b̄ of unclipped devices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveClipping {
    /// γ: the share of devices clipping should leave alone.
    pub target_quantile: f64,
    /// η of the geometric step.
    pub learning_rate: f64,
    /// σ_b: the noise on the count of unclipped devices, in devices.
    pub count_stddev: f64,
    /// The clip norm of the first round (and of any restart without a saved one).
    pub initial: f64,
    /// The clip norm stays in [min, max]; max keeps a round's extended bound within
    /// `update.clip_norm`.
    pub min: f64,
    pub max: f64,
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
