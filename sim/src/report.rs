//! What a simulation writes: `report.json`, `report.md` and `rounds.jsonl`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use fedpersona_model::checkpoint::write_atomic;
use serde::Serialize;

use crate::methods::{Comparison, Method, MethodResult, Metric};
use crate::settings::{FederationKind, PrivacyMode, PrivacyPlan, ResolvedPrivacy};

/// One federated round, as `rounds.jsonl` records it.
#[derive(Debug, Clone, Serialize)]
pub struct RoundRecord {
    pub federation: FederationKind,
    pub round: u64,
    pub committed: bool,
    pub reports: u32,
    /// Devices that took the task and vanished.
    pub drops: u32,
    /// Requests the aggregator refused during the round.
    pub rejects: u64,
    /// Mean of the reporting devices' mean local training loss.
    pub train_loss: Option<f64>,
    /// Privacy spent so far (None without DP).
    pub epsilon_spent: Option<f64>,
    pub seconds: f64,
    pub upload_bytes: u64,
    pub download_bytes: u64,
    /// Accuracy of the new global adapter on the monitoring slice, when evaluated.
    pub monitor_accuracy: Option<f64>,
    /// Committed rounds: the L2 norm of the released (noised) mean update.
    pub update_norm: Option<f64>,
    /// Committed private rounds: the expected norm of the DP noise on that mean.
    pub noise_norm_expected: Option<f64>,
    /// Committed private rounds: the estimated signal-to-noise ratio,
    /// √max(0, update_norm² − noise_norm_expected²) / noise_norm_expected
    /// (`fedpersona_privacy::snr::Measured`).
    pub snr: Option<f64>,
    /// The round's clip norm, the median L2 norm of the reporting devices' deltas before
    /// clipping, and the share of them that clipping cut (read off the simulated devices;
    /// none of it reaches the aggregator).
    pub clip_norm: Option<f64>,
    pub median_norm_before_clip: Option<f64>,
    pub clipped_share: Option<f64>,
}

/// A private federation's signal-to-noise ratio per round: the config's expectation (signal
/// at most C) and the estimates measured on its committed rounds.
#[derive(Debug, Clone, Serialize)]
pub struct SnrSummary {
    pub expected: f64,
    /// Median and last of the measured estimates (None before any private round committed).
    pub median: Option<f64>,
    pub last: Option<f64>,
    pub rounds: usize,
}

impl SnrSummary {
    /// The summary of `kind`'s rounds in `rounds`.
    pub fn of(expected: f64, rounds: &[RoundRecord], kind: FederationKind) -> Self {
        let mut measured: Vec<f64> = rounds
            .iter()
            .filter(|r| r.federation == kind)
            .filter_map(|r| r.snr)
            .collect();
        let last = measured.last().copied();
        measured.sort_by(f64::total_cmp);
        let n = measured.len();
        let median = (n > 0).then(|| {
            if n % 2 == 1 {
                measured[n / 2]
            } else {
                (measured[n / 2 - 1] + measured[n / 2]) / 2.0
            }
        });
        SnrSummary {
            expected,
            median,
            last,
            rounds: n,
        }
    }
}

/// What the profile-driven adaptation of the held-out users did, on average.
#[derive(Debug, Clone, Serialize)]
pub struct AdaptiveSummary {
    pub users: usize,
    pub mean_steps: f64,
    /// Share of users whose run stopped early on its held-out slice.
    pub stopped_early: f64,
    pub mean_lr: f64,
    /// Feedback of the replayed suggestions, over all users.
    pub accepted: usize,
    pub edited: usize,
    pub rejected: usize,
}

impl AdaptiveSummary {
    pub fn of(runs: impl Iterator<Item = crate::evaluation::AdaptiveRun>) -> Option<Self> {
        let runs: Vec<_> = runs.collect();
        if runs.is_empty() {
            return None;
        }
        let n = runs.len() as f64;
        Some(AdaptiveSummary {
            users: runs.len(),
            mean_steps: runs.iter().map(|r| r.steps as f64).sum::<f64>() / n,
            stopped_early: runs.iter().filter(|r| r.stopped_early).count() as f64 / n,
            mean_lr: runs.iter().map(|r| r.lr).sum::<f64>() / n,
            accepted: runs.iter().map(|r| r.accepted).sum(),
            edited: runs.iter().map(|r| r.edited).sum(),
            rejected: runs.iter().map(|r| r.rejected).sum(),
        })
    }
}

/// Privacy settings and what was spent.
#[derive(Debug, Clone, Serialize)]
pub struct PrivacyReport {
    pub mode: String,
    /// User-level ε each federation spent (its aggregator's ledger; the largest of the two).
    /// A user of the training population is in both federations only in this comparison; a
    /// deployment runs one.
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
    /// The accountant that bounds ε (`rdp` or `pld`), for private runs.
    pub accountant: Option<String>,
    pub noise_multiplier: Option<f64>,
    /// The accountant's sampling rate: devices assigned per round over the population.
    pub sampling_rate: Option<f64>,
    pub secure_aggregation: bool,
    /// Private runs: `global_accuracy` of FedAvg trained without DP in the same run, and the
    /// difference (private − non-private): what privacy costs on the training users.
    pub global_accuracy_nonprivate: Option<f64>,
    pub accuracy_cost: Option<f64>,
    /// Each private federation's signal-to-noise ratio per round, by federation name.
    pub snr: BTreeMap<&'static str, SnrSummary>,
}

impl PrivacyReport {
    pub fn new(
        plan: &PrivacyPlan,
        spent: &[(Option<ResolvedPrivacy>, Option<f64>)],
        global_accuracy: Option<f64>,
        global_accuracy_nonprivate: Option<f64>,
    ) -> Self {
        let resolved = spent.iter().find_map(|(r, _)| *r);
        let epsilon = spent
            .iter()
            .filter_map(|(_, e)| *e)
            .fold(None, |m: Option<f64>, e| Some(m.map_or(e, |m| m.max(e))));
        let private = plan.mode != PrivacyMode::None;
        PrivacyReport {
            mode: plan.mode.name().into(),
            epsilon,
            delta: private.then_some(plan.delta),
            accountant: private.then(|| plan.accountant.name().to_string()),
            noise_multiplier: resolved.map(|r| r.noise_multiplier),
            sampling_rate: resolved.map(|r| r.sampling_rate),
            secure_aggregation: plan.secure_aggregation,
            global_accuracy_nonprivate,
            accuracy_cost: global_accuracy
                .zip(global_accuracy_nonprivate)
                .map(|(p, n)| p - n),
            snr: BTreeMap::new(),
        }
    }
}

/// One method at one support size of the few-shot curves: what was served after the
/// never-harm check at the scored number of steps; `accuracy_by_steps` of the adapters as
/// trained.
#[derive(Debug, Clone, Serialize)]
pub struct FewShotEntry {
    pub method: &'static str,
    /// None: all of each user's support lines.
    pub support_lines: Option<usize>,
    pub steps: usize,
    /// The held-out users whose support split has that many lines.
    pub users: usize,
    pub accuracy: f64,
    pub next_word_top1: f64,
    pub next_word_top3: f64,
    pub keystroke_savings: f64,
    pub hurt_share: f64,
    pub unchecked_accuracy: f64,
    pub accuracy_by_steps: BTreeMap<usize, f64>,
}

impl FewShotEntry {
    pub fn of(
        method: &'static str,
        support_lines: Option<usize>,
        steps: usize,
        r: &MethodResult,
    ) -> Self {
        FewShotEntry {
            method,
            support_lines,
            steps,
            users: r.users,
            accuracy: r.accuracy,
            next_word_top1: r.next_word_top1,
            next_word_top3: r.next_word_top3,
            keystroke_savings: r.keystroke_savings,
            hurt_share: r.hurt_share,
            unchecked_accuracy: r.unchecked_accuracy,
            accuracy_by_steps: r.accuracy_by_steps.clone(),
        }
    }
}

/// Users in each part of the split.
#[derive(Debug, Clone, Serialize)]
pub struct UserCounts {
    pub train: usize,
    pub heldout: usize,
    /// Users below the minimum number of lines.
    pub dropped: usize,
}

/// Everything `report.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub users: UserCounts,
    pub rounds_completed: u64,
    pub privacy: PrivacyReport,
    /// The FedAvg global adapter's next-byte accuracy on the training users' test split
    /// (pooled over their tokens, as McMahan et al. 2017 report it).
    pub global_accuracy: Option<f64>,
    /// The base model's accuracy on the same data, for reference.
    pub base_accuracy_train_users: Option<f64>,
    pub methods: BTreeMap<&'static str, MethodResult>,
    /// Paired per-user differences between methods (the ordering the benchmark asks about)
    /// on every metric, each with its 95% interval.
    pub comparisons: Vec<Comparison>,
    /// The few-shot curves (`--few-shot-lines`): every method at each support size.
    pub few_shot: Vec<FewShotEntry>,
    /// The profile-driven adaptation's runs (`adaptive_finetune`), summarized.
    pub adaptive: Option<AdaptiveSummary>,
    pub seconds: f64,
    pub peak_rss_mb: f64,
    /// False when the run was interrupted (Ctrl-C): what is here is what was done.
    pub complete: bool,
    pub interrupted_during: Option<&'static str>,
    pub settings: serde_json::Value,
    pub data: String,
    pub base_model: String,
}

/// Writes `report.json` and `report.md`.
pub fn write(report: &Report, out: &Path) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(report).context("serializing the report")?;
    write_atomic(&out.join("report.json"), &json)?;
    write_atomic(&out.join("report.md"), markdown(report).as_bytes())?;
    Ok(())
}

/// Writes `rounds.jsonl`: rewritten whole and atomically after each round, so an interrupted
/// run leaves a complete file.
pub fn write_rounds(rounds: &[RoundRecord], out: &Path) -> anyhow::Result<()> {
    let mut text = String::new();
    for r in rounds {
        text.push_str(&serde_json::to_string(r).context("serializing a round")?);
        text.push('\n');
    }
    write_atomic(&out.join("rounds.jsonl"), text.as_bytes())?;
    Ok(())
}

fn pct(x: f64) -> String {
    format!("{:.2}", 100.0 * x)
}

/// A few lines for the terminal: the methods table and the headline figures.
pub fn summary(r: &Report) -> String {
    let mut s = String::new();
    if !r.complete {
        let _ = writeln!(
            s,
            "partial: interrupted during {}",
            r.interrupted_during.unwrap_or("the run")
        );
    }
    let _ = writeln!(
        s,
        "{} training users, {} held-out users, {} rounds per federation, {:.0} s, peak RSS {:.0} MB",
        r.users.train, r.users.heldout, r.rounds_completed, r.seconds, r.peak_rss_mb
    );
    if let Some(g) = r.global_accuracy {
        let _ = writeln!(s, "global_accuracy {}%", pct(g));
    }
    if let (Some(e), Some(n)) = (r.privacy.epsilon, r.privacy.global_accuracy_nonprivate) {
        let _ = writeln!(
            s,
            "privacy {}: epsilon {e:.3}; global_accuracy without DP {}%",
            r.privacy.mode,
            pct(n)
        );
    }
    for (name, x) in &r.privacy.snr {
        let _ = writeln!(
            s,
            "snr {name}: expected {:.4} per round, measured median {}",
            x.expected,
            x.median.map_or("-".into(), |m| format!("{m:.4}"))
        );
    }
    for m in Method::ALL {
        if let Some(x) = r.methods.get(m.name()) {
            let _ = writeln!(
                s,
                "{m:>16}  accuracy {:>6}% ± {:<5}  bits/byte {:.4}  next word {:>6}%  keystrokes saved {:>6}%",
                pct(x.accuracy),
                pct(x.accuracy_ci95),
                x.bits_per_byte,
                pct(x.next_word_top1),
                pct(x.keystroke_savings)
            );
        }
    }
    s
}

/// The paired differences, a table per support size, a row per pair and a column per metric:
/// what was served, and the adapters unchecked in brackets.
fn comparisons_tables(s: &mut String, comparisons: &[Comparison]) {
    let mut sizes: Vec<Option<usize>> = Vec::new();
    for c in comparisons {
        if !sizes.contains(&c.support_lines) {
            sizes.push(c.support_lines);
        }
    }
    for size in sizes {
        let these: Vec<&Comparison> = comparisons
            .iter()
            .filter(|c| c.support_lines == size)
            .collect();
        let _ = writeln!(
            s,
            "Paired differences per user (same query data, {} support lines), in points ± 95% interval, of what was served (the adapters unchecked in brackets):\n",
            size.map_or("all".to_string(), |k| k.to_string())
        );
        let _ = write!(s, "| better − worse |");
        for m in Metric::ALL {
            let _ = write!(s, " {m} |");
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "|---|{}", "---|".repeat(Metric::ALL.len()));
        let mut pairs: Vec<(Method, Method)> = Vec::new();
        for c in &these {
            if !pairs.contains(&(c.better, c.worse)) {
                pairs.push((c.better, c.worse));
            }
        }
        for (better, worse) in pairs {
            let _ = write!(s, "| {better} − {worse} |");
            for m in Metric::ALL {
                let cell = these
                    .iter()
                    .find(|c| (c.better, c.worse, c.metric) == (better, worse, m))
                    .map_or("-".to_string(), |c| {
                        format!(
                            "{:+.2} ± {:.2} ({:+.2} ± {:.2})",
                            100.0 * c.mean_difference,
                            100.0 * c.ci95,
                            100.0 * c.unchecked_mean_difference,
                            100.0 * c.unchecked_ci95
                        )
                    });
                let _ = write!(s, " {cell} |");
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(s);
    }
}

/// The few-shot curves: a row per method, a column per support size; each cell what was
/// served: next-word top-1 %, accuracy %.
fn few_shot_table(s: &mut String, entries: &[FewShotEntry]) {
    let mut sizes: Vec<Option<usize>> = entries.iter().map(|e| e.support_lines).collect();
    sizes.sort_by_key(|k| k.unwrap_or(usize::MAX));
    sizes.dedup();
    let _ = writeln!(
        s,
        "## Few-shot curves\n\nEvery method again with each user's first k support lines (users whose support split has k lines), {} fine-tuning steps, what the never-harm check served: next-word top-1 % / next-byte accuracy % (users in brackets).\n",
        entries.first().map_or(0, |e| e.steps)
    );
    let _ = write!(s, "| method |");
    for k in &sizes {
        let _ = write!(s, " {} |", k.map_or("all".to_string(), |k| k.to_string()));
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "|---|{}", "---|".repeat(sizes.len()));
    for m in Method::ALL {
        let row: Vec<Option<&FewShotEntry>> = sizes
            .iter()
            .map(|k| {
                entries
                    .iter()
                    .find(|e| e.method == m.name() && e.support_lines == *k)
            })
            .collect();
        if row.iter().all(Option::is_none) {
            continue;
        }
        let _ = write!(s, "| {m} |");
        for e in row {
            let cell = e.map_or("-".to_string(), |e| {
                format!(
                    "{} / {} ({})",
                    pct(e.next_word_top1),
                    pct(e.accuracy),
                    e.users
                )
            });
            let _ = write!(s, " {cell} |");
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s);
}

/// The human-readable report.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# fedpersona simulation report\n");
    if !r.complete {
        let _ = writeln!(
            s,
            "**Partial report**: the run was interrupted during {}; figures cover what finished.\n",
            r.interrupted_during.unwrap_or("the run")
        );
    }
    let _ = writeln!(
        s,
        "Data `{}` — {} federation users, {} held-out users ({} dropped for too few lines). Base model `{}`.\n",
        r.data, r.users.train, r.users.heldout, r.users.dropped, r.base_model
    );
    let _ = writeln!(
        s,
        "Rounds completed: {} per federation. Privacy: {}{}. Wall time {:.0} s, peak RSS {:.0} MB.\n",
        r.rounds_completed,
        r.privacy.mode,
        match (r.privacy.epsilon, r.privacy.delta) {
            (Some(e), Some(d)) => format!(" (ε = {e:.3} at δ = {d:e})"),
            _ => String::new(),
        },
        r.seconds,
        r.peak_rss_mb
    );
    if let Some(g) = r.global_accuracy {
        let _ = writeln!(
            s,
            "**Global accuracy** (FedAvg adapter, training users' test split, pooled over bytes): {}%{}\n",
            pct(g),
            r.base_accuracy_train_users
                .map(|b| format!(" (base model: {}%)", pct(b)))
                .unwrap_or_default()
        );
    }
    if let (Some(n), Some(c)) = (
        r.privacy.global_accuracy_nonprivate,
        r.privacy.accuracy_cost,
    ) {
        let _ = writeln!(
            s,
            "**What privacy costs**: the same FedAvg federation without DP reaches {}% global accuracy; with {} noise (z = {}, sampling rate {}{}) it reaches {:+.2} points of that. On held-out users, see `global_nonprivate`, `fedavg_finetune_nonprivate`, `meta_finetune_nonprivate` and the paired differences below.\n",
            pct(n),
            r.privacy.mode,
            r.privacy.noise_multiplier.map_or("?".into(), |z| format!("{z:.4}")),
            r.privacy.sampling_rate.map_or("?".into(), |q| format!("{q:.4}")),
            if r.privacy.secure_aggregation { ", secure aggregation" } else { "" },
            100.0 * c
        );
    }
    if !r.privacy.snr.is_empty() {
        let _ = writeln!(
            s,
            "**Signal-to-noise per round** (the DP noise's expected norm on the round's mean against a signal of at most C, the clip norm; measured: √max(0, ‖released mean‖² − expected noise²) over the expected noise, per committed round in `rounds.jsonl`):\n"
        );
        for (name, x) in &r.privacy.snr {
            let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
            let _ = writeln!(
                s,
                "- {name}: expected {:.4}; measured median {}, last {} ({} rounds)",
                x.expected,
                fmt(x.median),
                fmt(x.last),
                x.rounds
            );
        }
        let _ = writeln!(s);
    }
    if !r.methods.is_empty() {
        let _ = writeln!(
            s,
            "## Held-out users (few-shot personalization)\n\nEvery method ends as a device does, with the never-harm check: the newest tenth of the support lines is held out (the fine-tuned methods train on the rest), and the device serves whichever of the base model, the method's starting adapter and its result has the lowest loss there. Mean over users of what was served, ± the 95% interval (Student t). Keyboard figures, on the first keystrokes of each user's query text: next word top-1 / top-3 (at each word's start, the best, or one of the three, suggestions of a 4-wide beam over the model's decoding up to the next space is the word), and keystrokes saved (the user taps a correct suggestion as soon as one of the three shows it). Helped / hurt: the share of users above / below the base model on next-word top-1 (accuracy hurt: on next-byte accuracy); served: how many users got base / the start / the method's result. The check serves an adapter only when it beats base on that slice at 95% confidence (a paired t-test over its windows); \"lowest loss\": the same with the plain lowest-loss rule; unchecked: the method's adapter as it is.\n"
        );
        let _ = writeln!(
            s,
            "| method | accuracy % | bits/byte | next word top-1 % | top-3 % | keystrokes saved % | helped / hurt % | accuracy hurt % | served base/start/own | lowest loss: accuracy %, accuracy hurt % | unchecked: accuracy %, top-1 %, hurt % | users |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        for m in Method::ALL {
            if let Some(x) = r.methods.get(m.name()) {
                let _ = writeln!(
                    s,
                    "| {m} | {} ± {} | {:.4} ± {:.4} | {} ± {} | {} ± {} | {} ± {} | {:.0} / {:.0} | {:.0} | {}/{}/{} | {}, {:.0} | {} ± {}, {}, {:.0} | {} |",
                    pct(x.accuracy),
                    pct(x.accuracy_ci95),
                    x.bits_per_byte,
                    x.bits_per_byte_ci95,
                    pct(x.next_word_top1),
                    pct(x.next_word_top1_ci95),
                    pct(x.next_word_top3),
                    pct(x.next_word_top3_ci95),
                    pct(x.keystroke_savings),
                    pct(x.keystroke_savings_ci95),
                    100.0 * x.helped_share,
                    100.0 * x.hurt_share,
                    100.0 * x.accuracy_hurt_share,
                    x.served_base,
                    x.served_start,
                    x.served_personal,
                    pct(x.lowest_loss_accuracy),
                    100.0 * x.lowest_loss_accuracy_hurt_share,
                    pct(x.unchecked_accuracy),
                    pct(x.unchecked_accuracy_ci95),
                    pct(x.unchecked_next_word_top1),
                    100.0 * x.unchecked_hurt_share,
                    x.users
                );
            }
        }
        let _ = writeln!(s);
        if !r.comparisons.is_empty() {
            comparisons_tables(&mut s, &r.comparisons);
        }
        if let (Some(a), Some(m)) = (&r.adaptive, r.methods.get(Method::AdaptiveFinetune.name())) {
            let _ = writeln!(
                s,
                "`adaptive_finetune`: each held-out user's support lines replayed as interactions (one a day; the FedAvg adapter suggests a continuation of each line's context; feedback from the suggestion's character similarity to the real line: ≥ 0.6 accepted, ≥ 0.3 edited, else rejected — here {} / {} / {}), then adaptation weighted by feedback and recency with steps and learning rate from the profile and early stopping on the newest 10% of the lines: {:.1} steps on average (early stop for {:.0}% of users), mean learning rate {:.2e}; then the never-harm check on those newest lines served the personal adapter to {}, the global adapter to {} and the base model to {} users. The plain arm is `fedavg_finetune` (uniform weights, fixed steps), from the same adapter.\n",
                a.accepted,
                a.edited,
                a.rejected,
                a.mean_steps,
                100.0 * a.stopped_early,
                a.mean_lr,
                m.served_personal,
                m.served_start,
                m.served_base
            );
        }
        let steps: std::collections::BTreeSet<usize> = r
            .methods
            .values()
            .flat_map(|m| m.accuracy_by_steps.keys().copied())
            .collect();
        if steps.len() > 1 {
            let _ = writeln!(s, "Accuracy % by local fine-tuning steps:\n");
            let _ = write!(s, "| method |");
            for st in &steps {
                let _ = write!(s, " {st} |");
            }
            let _ = writeln!(s);
            let _ = writeln!(s, "|---|{}", "---|".repeat(steps.len()));
            for m in [
                Method::LocalOnly,
                Method::FedavgFinetune,
                Method::MetaFinetune,
            ] {
                if let Some(x) = r.methods.get(m.name()) {
                    let _ = write!(s, "| {m} |");
                    for st in &steps {
                        let _ = write!(
                            s,
                            " {} |",
                            x.accuracy_by_steps
                                .get(st)
                                .map_or("-".to_string(), |a| pct(*a))
                        );
                    }
                    let _ = writeln!(s);
                }
            }
            let _ = writeln!(s);
        }
    }
    if !r.few_shot.is_empty() {
        few_shot_table(&mut s, &r.few_shot);
    }
    let _ = writeln!(
        s,
        "Per-round figures: `rounds.jsonl`; plots: `accuracy_vs_round.svg`, `accuracy_vs_steps.svg`{}.\n",
        if r.few_shot.is_empty() {
            ""
        } else {
            ", `few_shot.svg`"
        }
    );
    let _ = writeln!(s, "## Settings\n\n```json");
    let _ = writeln!(
        s,
        "{}",
        serde_json::to_string_pretty(&r.settings).unwrap_or_default()
    );
    let _ = writeln!(s, "```");
    s
}
