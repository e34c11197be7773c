//! The flags of `fedpersona-sim simulate`.

use std::path::PathBuf;

use aggregator::config::PrivacyMode;
use fedpersona_privacy::accountant::Method;

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
    /// Few-shot curves: every method again at each of these support sizes (comma-separated
    /// line counts, or `all`), e.g. `8,16,32,64,128,all`; a user is scored at the sizes its
    /// support split reaches. Off by default: each size costs a full evaluation.
    #[arg(long)]
    pub few_shot_lines: Option<String>,
    /// Keystrokes of each held-out user's query text the keyboard metrics (next-word top-1 and
    /// top-3, keystroke savings) score, from its first line on (default 200; 100 with --quick).
    #[arg(long)]
    pub keyboard_chars: Option<usize>,
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
    /// Server step of the FedAvg federations (the private one and its non-private
    /// reference alike): sgd (plain FedAvg; the default), momentum (FedAvgM, momentum 0.9:
    /// it also averages DP noise over rounds) or adam (FedAdam).
    #[arg(long)]
    pub server_optimizer: Option<String>,
    /// Server learning rate of the FedAvg federations (default 1).
    #[arg(long)]
    pub server_lr: Option<f64>,
    /// LoRA rank (alpha is twice the rank).
    #[arg(long)]
    pub rank: Option<usize>,
    /// FFA-LoRA: A stays at its seeded initialization on every device and only B trains
    /// and travels, which halves the shared update (and its DP noise has no A to multiply).
    #[arg(long)]
    pub ffa: bool,
    /// Comma-separated projections: any of q,k,v,o,gate,up,down.
    #[arg(long)]
    pub targets: Option<String>,
    /// L2 norm every update is clipped to (with `--adaptive-clip`, the first round's).
    #[arg(long)]
    pub clip_norm: Option<f64>,
    /// Adaptive clipping (Andrew et al. 2021): the clip norm follows the median of the
    /// devices' update norms, from a noised count of unclipped devices that travels with
    /// the update (its noise σ_b = max(clients per round / 20, z)); it starts at `--clip-norm`
    /// and may grow to ten times it.
    #[arg(long)]
    pub adaptive_clip: bool,
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
    /// The accountant that solves z for `--epsilon` and charges the aggregators' rounds:
    /// "rdp" (the default) or "pld" (tighter: less noise for the same ε).
    #[arg(long, default_value_t = Method::Rdp)]
    pub accountant: Method,
    /// Secure aggregation (SecAgg+) of the cohort's updates.
    #[arg(long)]
    pub secure_aggregation: bool,
    /// Skip the `local_only` baseline (a fresh adapter fine-tuned on the support lines).
    #[arg(long)]
    pub no_local_only: bool,
    /// Skip the meta-learned initialization's federation (and `meta_finetune`).
    #[arg(long)]
    pub no_meta: bool,
    /// Private runs: skip the non-private reference federations (and the privacy-cost
    /// comparisons they give).
    #[arg(long)]
    pub no_nonprivate_reference: bool,
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
