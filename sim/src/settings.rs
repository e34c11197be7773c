//! What a simulation run is configured with: the flags of `fedpersona-sim simulate`, the
//! settings they resolve to (from the default or the `--quick` preset), and what each
//! federation of the run trains ([`FederationSpec`], its [`PrivacyPlan`]). Plain data: the
//! running parts ([`federation`](crate::federation), [`report`](crate::report)) read it and
//! nothing here reaches back to them.

use std::path::{Path, PathBuf};

use crate::args::SimulateArgs;
use crate::corpus::{self, SplitConfig};
use anyhow::{bail, ensure, Context};
use fedpersona_model::keyboard::KeyboardConfig;
use fedpersona_model::{checkpoint, LoraConfig};
use fedpersona_privacy::accountant::Method;
use fedpersona_privacy::{mode, sampling};
use serde::Serialize;

pub use aggregator::config::PrivacyMode;

/// The federations a run trains, each over the whole training population.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FederationKind {
    /// FedAvg: the global adapter.
    Fedavg,
    /// The meta-learned initialization: Reptile-style local adaptation with a server step.
    Meta,
    /// Private runs only: FedAvg as it would run without DP, the reference for privacy's cost.
    FedavgNonprivate,
    /// Private runs only: the meta-learned initialization without DP.
    MetaNonprivate,
}

impl FederationKind {
    /// The name in `rounds.jsonl`, the report and the run's folders.
    pub fn name(self) -> &'static str {
        match self {
            FederationKind::Fedavg => "fedavg",
            FederationKind::Meta => "meta",
            FederationKind::FedavgNonprivate => "fedavg_nonprivate",
            FederationKind::MetaNonprivate => "meta_nonprivate",
        }
    }
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
    /// The FedAvg federations' server step.
    pub server_optimizer: &'static str,
    pub server_lr: f64,
    /// FFA-LoRA: only B trains and travels.
    pub ffa: bool,
    /// Adaptive clipping from `clip_norm`.
    pub adaptive_clip: bool,
    pub support_lines: usize,
    /// Keystrokes of each held-out user's query text the keyboard metrics score.
    pub keyboard_chars: usize,
    /// The few-shot curves' support sizes (None: all of a user's support lines).
    pub few_shot_lines: Vec<Option<usize>>,
    pub finetune_steps: usize,
    pub meta_local_steps: usize,
    pub curve_steps: usize,
    pub finetune_lr: f64,
    pub eval_every: u64,
    pub monitor_windows: usize,
    pub workers: usize,
    pub privacy: PrivacyPlan,
    pub adaptive: bool,
    /// Whether held-out users also run the `local_only` baseline.
    pub local_only: bool,
    /// Whether the meta-learned initialization's federation runs.
    pub meta: bool,
    /// Private runs: whether the non-private reference federations run.
    pub nonprivate_reference: bool,
}

impl Settings {
    pub fn resolve(a: &SimulateArgs) -> anyhow::Result<Settings> {
        let quick = a.quick;
        let rounds = a.rounds.unwrap_or(if quick { 4 } else { 30 });
        let targets = device_agent::adapt::parse_targets(
            a.targets.as_deref().unwrap_or("q,k,v,o,gate,up,down"),
        )?;
        let optimizer = |flag: &str, given: Option<&str>| match given.unwrap_or("sgd") {
            "sgd" => Ok("sgd"),
            "momentum" => Ok("momentum"),
            "adam" => Ok("adam"),
            other => bail!("--{flag} must be sgd, momentum or adam, not {other:?}"),
        };
        let meta_optimizer = optimizer("meta-optimizer", a.meta_optimizer.as_deref())?;
        let server_optimizer = optimizer("server-optimizer", a.server_optimizer.as_deref())?;
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
            adaptive_clip: a.adaptive_clip,
            dropout: a.dropout.unwrap_or(0.0),
            meta_optimizer,
            meta_server_lr: a.meta_server_lr.unwrap_or(1.0),
            server_optimizer,
            server_lr: a.server_lr.unwrap_or(1.0),
            ffa: a.ffa,
            support_lines: a.support_lines.unwrap_or(if quick { 16 } else { 64 }),
            keyboard_chars: a.keyboard_chars.unwrap_or(if quick { 100 } else { 200 }),
            few_shot_lines: parse_support_sizes(a.few_shot_lines.as_deref().unwrap_or(""))?,
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
            local_only: !a.no_local_only,
            meta: !a.no_meta,
            nonprivate_reference: !a.no_nonprivate_reference,
            privacy: PrivacyPlan {
                mode: a.privacy,
                epsilon: a.epsilon,
                noise_multiplier: a.noise_multiplier,
                delta: a.delta,
                secure_aggregation: a.secure_aggregation,
                accountant: a.accountant,
            },
        };
        ensure!(s.rounds >= 1, "--rounds must be at least 1");
        ensure!(
            s.clients_per_round >= 1,
            "--clients-per-round must be at least 1"
        );
        ensure!(s.local_steps >= 1, "--local-steps must be at least 1");
        ensure!(s.support_lines >= 1, "--support-lines must be at least 1");
        ensure!(s.keyboard_chars >= 1, "--keyboard-chars must be at least 1");
        ensure!(
            s.lr.is_finite() && s.lr > 0.0 && s.finetune_lr.is_finite() && s.finetune_lr > 0.0,
            "learning rates must be positive"
        );
        ensure!(
            s.meta_server_lr.is_finite() && s.meta_server_lr > 0.0,
            "--meta-server-lr must be positive"
        );
        ensure!(
            s.server_lr.is_finite() && s.server_lr > 0.0,
            "--server-lr must be positive"
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

    /// The federations the run trains, in order: in private runs each non-private reference
    /// before its private federation.
    pub fn kinds(&self) -> Vec<FederationKind> {
        use FederationKind::*;
        let private = self.privacy.mode != PrivacyMode::None;
        let mut out = Vec::new();
        for (on, plain, reference) in [
            (true, Fedavg, FedavgNonprivate),
            (self.meta, Meta, MetaNonprivate),
        ] {
            if !on {
                continue;
            }
            if private && self.nonprivate_reference {
                out.push(reference);
            }
            out.push(plain);
        }
        out
    }

    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            targets: self
                .targets
                .iter()
                .map(|t| fedpersona_model::Target::parse(t).expect("parsed above"))
                .collect(),
            freeze_a: self.ffa,
            seed: self.seed,
        }
    }

    pub fn federation(&self, kind: FederationKind) -> FederationSpec {
        let meta = matches!(kind, FederationKind::Meta | FederationKind::MetaNonprivate);
        let nonprivate = matches!(
            kind,
            FederationKind::FedavgNonprivate | FederationKind::MetaNonprivate
        );
        FederationSpec {
            kind,
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
            adaptive_clip: self.adaptive_clip,
            lora: self.lora(),
            server: if meta {
                ServerStep {
                    optimizer: self.meta_optimizer,
                    lr: self.meta_server_lr,
                    momentum: 0.9,
                }
            } else {
                ServerStep {
                    optimizer: self.server_optimizer,
                    lr: self.server_lr,
                    momentum: 0.9,
                }
            },
            dropout: self.dropout,
            seed: self.seed,
            // The references for privacy's cost: each federation as it would run without DP.
            privacy: if nonprivate {
                PrivacyPlan {
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

    pub fn few_shot(&self) -> FewShot {
        FewShot {
            lora: self.lora(),
            support_lines: self.support_lines,
            keyboard: KeyboardConfig {
                max_chars: self.keyboard_chars,
                ..KeyboardConfig::default()
            },
            steps: self.finetune_steps,
            curve_to: self.curve_steps,
            lr: self.finetune_lr,
            batch_size: self.batch_size as usize,
            train_seq_len: self.train_seq_len as usize,
            eval_seq_len: self.eval_seq_len,
            seed: self.seed,
            adaptive: self.adaptive,
            local_only: self.local_only,
        }
    }
}

/// `8,16,all` → [Some(8), Some(16), None], ascending with all last, without repeats.
fn parse_support_sizes(list: &str) -> anyhow::Result<Vec<Option<usize>>> {
    let mut out = Vec::new();
    for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        out.push(if item == "all" {
            None
        } else {
            match item.parse::<usize>() {
                Ok(k) if k >= 2 => Some(k),
                _ => {
                    bail!("--few-shot-lines takes line counts of at least 2 or `all`, not {item:?}")
                }
            }
        });
    }
    out.sort_by_key(|k| k.unwrap_or(usize::MAX));
    out.dedup();
    Ok(out)
}

impl SimulateArgs {
    /// The corpus and the base model folder (the shipped ones by default).
    pub fn paths(&self) -> (PathBuf, PathBuf) {
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
    pub fn splits(&self, data: &Path) -> anyhow::Result<corpus::Splits> {
        let users = corpus::load_users(data)
            .with_context(|| format!("loading users from {}", data.display()))?;
        Ok(corpus::split_users(users, &self.split)?)
    }
}

/// The server step of a federation.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ServerStep {
    /// `sgd` (FedAvg / Reptile), `momentum` (FedAvgM) or `adam` (FedAdam).
    pub optimizer: &'static str,
    pub lr: f64,
    pub momentum: f64,
}

/// What one federation runs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FederationSpec {
    pub kind: FederationKind,
    pub rounds: u64,
    pub clients_per_round: usize,
    pub local_steps: u32,
    pub lr: f64,
    pub batch_size: u32,
    pub seq_len: u32,
    pub clip_norm: f64,
    /// Adaptive clipping, starting at `clip_norm`.
    pub adaptive_clip: bool,
    #[serde(skip)]
    pub lora: LoraConfig,
    pub server: ServerStep,
    /// Chance that a picked device takes the task and never reports.
    pub dropout: f64,
    pub seed: u64,
    pub privacy: PrivacyPlan,
}

/// How a held-out user adapts.
#[derive(Debug, Clone)]
pub struct FewShot {
    pub lora: LoraConfig,
    /// Support lines used (the first ones of the user's support split).
    pub support_lines: usize,
    /// The keyboard metrics' beam and how much of the query text they score.
    pub keyboard: KeyboardConfig,
    /// Local fine-tuning steps: the methods are scored after this many.
    pub steps: usize,
    /// The accuracy-vs-steps curve goes on to this many steps (at least `steps`).
    pub curve_to: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub train_seq_len: usize,
    pub eval_seq_len: usize,
    pub seed: u64,
    /// Also run the profile-driven adaptation from the FedAvg start.
    pub adaptive: bool,
    /// Also fine-tune a fresh adapter (`local_only`).
    pub local_only: bool,
}

impl FewShot {
    /// Step counts at which the query data is scored: 0, 1, 2, 5, 10, 20, 40, … up to the
    /// curve's end, and the scored budget.
    pub fn checkpoints(&self) -> Vec<usize> {
        let end = self.curve_to.max(self.steps);
        let mut c: Vec<usize> = [0, 1, 2]
            .into_iter()
            .chain((0..).map(|i| 5usize << i).take_while(|&x| x <= end))
            .filter(|&x| x <= end)
            .chain([self.steps, end])
            .collect();
        c.sort_unstable();
        c.dedup();
        c
    }
}

/// Differential privacy and secure aggregation of a simulated federation.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PrivacyPlan {
    pub mode: PrivacyMode,
    /// Target ε over all the rounds (the noise multiplier is solved for it), or None.
    pub epsilon: Option<f64>,
    /// z, or None to solve it from `epsilon`.
    pub noise_multiplier: Option<f64>,
    pub delta: f64,
    pub secure_aggregation: bool,
    /// What solves z and charges the rounds (`[privacy] accountant`).
    pub accountant: Method,
}

/// What the aggregator is configured with, resolved for the population.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ResolvedPrivacy {
    pub noise_multiplier: f64,
    pub sampling_rate: f64,
    pub epsilon_budget: f64,
}

impl FederationSpec {
    /// The expected cohort for a federation of `users`: each device draws itself into a
    /// round with probability cohort / users.
    pub fn cohort(&self, users: usize) -> usize {
        self.clients_per_round.clamp(1, users)
    }

    /// The federation's Poisson sampling rate.
    pub fn sampling_rate(&self, users: usize) -> f64 {
        sampling::poisson_rate(self.cohort(users) as u64, users as u64)
    }
}

impl PrivacyPlan {
    /// The noise multiplier and budget for `users` devices (None without DP), at the
    /// federation's Poisson sampling rate.
    pub fn resolve(
        &self,
        spec: &FederationSpec,
        users: usize,
    ) -> anyhow::Result<Option<ResolvedPrivacy>> {
        if self.mode == PrivacyMode::None {
            return Ok(None);
        }
        let q = spec.sampling_rate(users);
        let z = match (self.noise_multiplier, self.epsilon) {
            (Some(z), _) => z,
            (None, Some(e)) => {
                self.accountant
                    .noise_multiplier_for(e, q, spec.rounds, self.delta)?
            }
            (None, None) => bail!("a private simulation needs --epsilon or --noise-multiplier"),
        };
        let planned = self.accountant.epsilon(z, q, spec.rounds, self.delta)?;
        Ok(Some(ResolvedPrivacy {
            noise_multiplier: z,
            sampling_rate: q,
            epsilon_budget: mode::planned_budget(self.epsilon, planned),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SimulateArgs,
    }

    fn resolve(flags: &[&str]) -> anyhow::Result<Settings> {
        let argv = ["simulate", "--out", "unused"].iter().chain(flags);
        Settings::resolve(&Cli::try_parse_from(argv)?.args)
    }

    #[test]
    fn the_quick_preset_and_flags_resolve() {
        let s = resolve(&["--quick", "--rounds", "3", "--rank", "4"]).unwrap();
        assert_eq!((s.preset, s.rounds, s.clients_per_round), ("quick", 3, 4));
        assert_eq!((s.rank, s.alpha), (4, 8.0));
        assert_eq!(s.max_train_users, Some(16));
        assert_eq!(s.eval_every, 1);
        let d = resolve(&[]).unwrap();
        assert_eq!((d.preset, d.rounds, d.eval_every), ("default", 30, 3));
        assert!(d.few_shot_lines.is_empty(), "few-shot curves are opt-in");
        let f = resolve(&["--few-shot-lines", "all,16, 8,16"]).unwrap();
        assert_eq!(f.few_shot_lines, [Some(8), Some(16), None]);
        for bad in ["1", "eight", "8,,-3"] {
            let e = resolve(&["--few-shot-lines", bad]).unwrap_err();
            assert!(e.to_string().contains("--few-shot-lines"), "{bad}: {e}");
        }
        let e = resolve(&["--keyboard-chars", "0"]).unwrap_err();
        assert!(e.to_string().contains("--keyboard-chars"), "{e}");
    }

    #[test]
    fn inconsistent_flags_are_refused() {
        for (flags, says) in [
            (&["--epsilon", "8"][..], "need --privacy"),
            (&["--privacy", "central"][..], "needs --epsilon"),
            (
                &[
                    "--privacy",
                    "central",
                    "--epsilon",
                    "8",
                    "--noise-multiplier",
                    "1",
                ][..],
                "not both",
            ),
            (
                &["--privacy", "distributed", "--epsilon", "8"][..],
                "needs --secure-aggregation",
            ),
            (&["--dropout", "0.95"][..], "--dropout"),
            (&["--meta-optimizer", "lbfgs"][..], "--meta-optimizer"),
            (&["--agents", "0"][..], "--agents"),
        ] {
            let e = resolve(flags).expect_err(says).to_string();
            assert!(e.contains(says), "{flags:?}: {e}");
        }
    }

    #[test]
    fn each_federation_trains_as_its_kind_says() {
        let s = resolve(&[
            "--privacy",
            "central",
            "--epsilon",
            "8",
            "--meta-local-steps",
            "7",
        ])
        .unwrap();
        let fedavg = s.federation(FederationKind::Fedavg);
        let meta = s.federation(FederationKind::Meta);
        let reference = s.federation(FederationKind::FedavgNonprivate);
        assert_eq!((fedavg.local_steps, fedavg.lr), (s.local_steps, s.lr));
        assert_eq!(fedavg.server.optimizer, "sgd");
        // The meta-learned initialization's inner loop trains as a new user adapts.
        assert_eq!((meta.local_steps, meta.lr), (7, s.finetune_lr));
        assert_eq!(meta.server.lr, s.meta_server_lr);
        // The reference for privacy's cost is FedAvg with no DP at all.
        assert_eq!(fedavg.privacy.mode, PrivacyMode::Central);
        assert_eq!(reference.privacy.mode, PrivacyMode::None);
        assert_eq!(reference.privacy.epsilon, None);
        assert!(!reference.privacy.secure_aggregation);
    }

    #[test]
    fn the_run_trains_the_federations_its_flags_ask_for() {
        use FederationKind::*;
        let kinds = |flags: &[&str]| resolve(flags).unwrap().kinds();
        assert_eq!(kinds(&[]), [Fedavg, Meta]);
        assert_eq!(kinds(&["--no-meta"]), [Fedavg]);
        let private = ["--privacy", "central", "--epsilon", "8"];
        assert_eq!(
            kinds(&private),
            [FedavgNonprivate, Fedavg, MetaNonprivate, Meta]
        );
        let mut flags = private.to_vec();
        flags.extend(["--no-meta", "--no-nonprivate-reference"]);
        assert_eq!(kinds(&flags), [Fedavg]);
        // Without privacy there is no reference to skip.
        assert_eq!(kinds(&["--no-nonprivate-reference"]), [Fedavg, Meta]);
    }

    #[test]
    fn a_private_plan_resolves_to_the_accountants_noise() {
        let s = resolve(&["--privacy", "central", "--epsilon", "8", "--rounds", "30"]).unwrap();
        let spec = s.federation(FederationKind::Fedavg);
        let r = spec.privacy.resolve(&spec, 194).unwrap().unwrap();
        // Ten devices of 194 per round, no over-selection without dropouts.
        assert!((r.sampling_rate - 10.0 / 194.0).abs() < 1e-12);
        let spent = Method::Rdp
            .epsilon(r.noise_multiplier, r.sampling_rate, 30, 1e-5)
            .unwrap();
        assert!((spent - 8.0).abs() < 0.05, "z solved for ε = 8: {spent}");
        let none = s.federation(FederationKind::FedavgNonprivate);
        assert_eq!(none.privacy.resolve(&none, 194).unwrap(), None);

        // The PLD accountant: dp_accounting's PLD noise for this plan is 0.59069, RDP's 0.63675.
        let flags = [
            "--privacy",
            "central",
            "--epsilon",
            "8",
            "--accountant",
            "pld",
        ];
        let s = resolve(&flags).unwrap();
        let spec = s.federation(FederationKind::Fedavg);
        assert_eq!(spec.privacy.accountant, Method::Pld);
        let p = spec.privacy.resolve(&spec, 194).unwrap().unwrap();
        assert!(
            (p.noise_multiplier - 0.59069).abs() < 2e-4,
            "{}",
            p.noise_multiplier
        );
        assert!(p.noise_multiplier < r.noise_multiplier);
        assert!(p.epsilon_budget <= 8.0 * (1.0 + 1e-9));
    }
}
