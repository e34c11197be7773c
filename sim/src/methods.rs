//! The evaluated methods: where each one's score for a held-out user comes from, and the
//! per-method figures and paired per-user differences the report prints.

use std::collections::BTreeMap;
use std::fmt;

use fedpersona_model::keyboard::KeyboardReport;
use fedpersona_model::train::EvalReport;
use serde::Serialize;

use crate::evaluation::{Checked, Curve, Point, UserScores};
use crate::settings::FederationKind;
use crate::stats::interval;
use device_agent::adapt::Served;

/// A way to serve a held-out user, scored on the user's own later lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// The base model, no adapter.
    Base,
    /// A fresh adapter fine-tuned on the user's support lines only.
    LocalOnly,
    /// The FedAvg global adapter as it is.
    Global,
    /// The FedAvg adapter fine-tuned on the support lines.
    FedavgFinetune,
    /// The meta-learned initialization fine-tuned on the support lines.
    MetaFinetune,
    /// The device's profile-driven adaptation from the FedAvg adapter.
    AdaptiveFinetune,
    /// The same with rejected suggestions pushed down by an unlikelihood term.
    AdaptiveUnlikelihoodFinetune,
    /// Private runs only: FedAvg trained without DP in the same run, the cost's reference.
    GlobalNonprivate,
    /// Private runs only: that adapter fine-tuned on the support lines.
    FedavgFinetuneNonprivate,
    /// Private runs only: the meta-learned initialization trained without DP, fine-tuned.
    MetaFinetuneNonprivate,
}

/// Where a method's score is read: the base model, or a curve at a point.
enum Source {
    Base,
    At(Point),
}

/// A model's figures on a user's query text: next-byte, and as a keyboard.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    pub report: EvalReport,
    pub keyboard: KeyboardReport,
}

/// A per-user figure methods are compared on (higher is better).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Next-byte accuracy.
    Accuracy,
    /// The best suggestion at a word's start is the word.
    NextWordTop1,
    /// The word is among the three suggestions at its start.
    NextWordTop3,
    /// The share of keystrokes a user tapping correct suggestions saves.
    KeystrokeSavings,
}

impl Metric {
    pub const ALL: [Metric; 4] = [
        Metric::Accuracy,
        Metric::NextWordTop1,
        Metric::NextWordTop3,
        Metric::KeystrokeSavings,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::NextWordTop1 => "next_word_top1",
            Metric::NextWordTop3 => "next_word_top3",
            Metric::KeystrokeSavings => "keystroke_savings",
        }
    }

    pub fn of(self, s: &Scores) -> f64 {
        match self {
            Metric::Accuracy => s.report.accuracy,
            Metric::NextWordTop1 => s.keyboard.next_word_top1(),
            Metric::NextWordTop3 => s.keyboard.next_word_top3(),
            Metric::KeystrokeSavings => s.keyboard.keystroke_savings(),
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl Method {
    /// Every method, in the order tables list them.
    pub const ALL: [Method; 10] = [
        Method::Base,
        Method::LocalOnly,
        Method::Global,
        Method::FedavgFinetune,
        Method::MetaFinetune,
        Method::AdaptiveFinetune,
        Method::AdaptiveUnlikelihoodFinetune,
        Method::GlobalNonprivate,
        Method::FedavgFinetuneNonprivate,
        Method::MetaFinetuneNonprivate,
    ];

    /// The name in the report's tables and `report.json`.
    pub fn name(self) -> &'static str {
        match self {
            Method::Base => "base",
            Method::LocalOnly => "local_only",
            Method::Global => "global",
            Method::FedavgFinetune => "fedavg_finetune",
            Method::MetaFinetune => "meta_finetune",
            Method::AdaptiveFinetune => "adaptive_finetune",
            Method::AdaptiveUnlikelihoodFinetune => "adaptive_unlikelihood_finetune",
            Method::GlobalNonprivate => "global_nonprivate",
            Method::FedavgFinetuneNonprivate => "fedavg_finetune_nonprivate",
            Method::MetaFinetuneNonprivate => "meta_finetune_nonprivate",
        }
    }

    fn source(self) -> Source {
        use FederationKind::{Fedavg, FedavgNonprivate, Meta, MetaNonprivate};
        use Point::{Budget, Start};
        Source::At(match self {
            Method::Base => return Source::Base,
            Method::LocalOnly => Budget(Curve::LocalOnly),
            Method::Global => Start(Curve::From(Fedavg)),
            Method::FedavgFinetune => Budget(Curve::From(Fedavg)),
            Method::MetaFinetune => Budget(Curve::From(Meta)),
            Method::AdaptiveFinetune => Budget(Curve::Adaptive),
            Method::AdaptiveUnlikelihoodFinetune => Budget(Curve::AdaptiveUnlikelihood),
            Method::GlobalNonprivate => Start(Curve::From(FedavgNonprivate)),
            Method::FedavgFinetuneNonprivate => Budget(Curve::From(FedavgNonprivate)),
            Method::MetaFinetuneNonprivate => Budget(Curve::From(MetaNonprivate)),
        })
    }

    /// The fine-tuning curve whose steps the method's accuracy-vs-steps row shows (None for
    /// the methods without local steps, and for the adaptive runs, scored at one point).
    fn steps_curve(self) -> Option<Curve> {
        match self.source() {
            Source::At(Point::Budget(c @ (Curve::LocalOnly | Curve::From(_)))) => Some(c),
            _ => None,
        }
    }

    /// A user's scores under this method after `budget` fine-tuning steps, the adapter as
    /// trained (before the never-harm check); None where the method did not run.
    fn unchecked(self, s: &UserScores, budget: usize) -> Option<Scores> {
        let (point, step) = match self.source() {
            Source::Base => {
                return Some(Scores {
                    report: s.base,
                    keyboard: s.base_keyboard,
                })
            }
            Source::At(p @ Point::Start(_)) => (p, 0),
            Source::At(p @ Point::Budget(_)) => (p, budget),
        };
        let (Point::Start(curve) | Point::Budget(curve)) = point;
        let report = s
            .curves
            .get(&curve)?
            .iter()
            .find(|(k, _)| *k == step)
            .map(|(_, r)| *r)?;
        Some(Scores {
            report,
            keyboard: *s.keyboard.get(&point)?,
        })
    }

    /// What a user is served under this method after the never-harm check, and its scores.
    fn checked(self, s: &UserScores) -> Option<Checked> {
        match self.source() {
            Source::Base => Some(Checked {
                served: Served::Base,
                report: s.base,
                keyboard: s.base_keyboard,
                lowest_loss: Served::Base,
                lowest_loss_report: s.base,
            }),
            Source::At(p) => s.checked.get(&p).copied(),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// One method's figures on the held-out users: what the device serves after its never-harm
/// check, and the same method's adapter unchecked. Means over users, each with its 95%
/// interval; keyboard figures are fractions in [0, 1].
#[derive(Debug, Clone, Serialize)]
pub struct MethodResult {
    pub accuracy: f64,
    pub accuracy_ci95: f64,
    pub bits_per_byte: f64,
    pub bits_per_byte_ci95: f64,
    pub next_word_top1: f64,
    pub next_word_top1_ci95: f64,
    pub next_word_top3: f64,
    pub next_word_top3_ci95: f64,
    pub keystroke_savings: f64,
    pub keystroke_savings_ci95: f64,
    pub users: usize,
    /// Shares of users above and below the base model on next-word top-1 (on their own query
    /// lines).
    pub helped_share: f64,
    pub hurt_share: f64,
    /// The same on next-byte accuracy.
    pub accuracy_helped_share: f64,
    pub accuracy_hurt_share: f64,
    /// How many users the check served each candidate: the base model, the method's starting
    /// adapter (a federation's), the method's own result.
    pub served_base: usize,
    pub served_start: usize,
    pub served_personal: usize,
    /// Under the plain lowest-held-out-loss rule instead of the check's confident one.
    pub lowest_loss_accuracy: f64,
    pub lowest_loss_accuracy_hurt_share: f64,
    /// The same figures for the method's adapter as it is, before the check.
    pub unchecked_accuracy: f64,
    pub unchecked_accuracy_ci95: f64,
    pub unchecked_next_word_top1: f64,
    pub unchecked_keystroke_savings: f64,
    pub unchecked_helped_share: f64,
    pub unchecked_hurt_share: f64,
    pub unchecked_accuracy_helped_share: f64,
    pub unchecked_accuracy_hurt_share: f64,
    /// Mean accuracy after each number of local steps (the accuracy-vs-steps curve, of the
    /// adapters as trained).
    pub accuracy_by_steps: BTreeMap<usize, f64>,
}

/// `better − worse` on `metric`, paired by user, of what the never-harm check served, and of
/// the two methods' adapters unchecked; `support_lines` is the users' support size (None: all
/// of each user's support lines).
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub better: Method,
    pub worse: Method,
    pub metric: Metric,
    pub support_lines: Option<usize>,
    pub mean_difference: f64,
    pub ci95: f64,
    pub users: usize,
    pub unchecked_mean_difference: f64,
    pub unchecked_ci95: f64,
}

/// The benchmark's ordering as paired differences on every [`Metric`]: meta_finetune −
/// fedavg_finetune, fedavg_finetune − global, global − base, fedavg_finetune − base and
/// local_only − base; then the profile ablations and, in private runs, privacy's cost. Pairs
/// with no user are left out.
pub fn comparisons(
    scores: &[UserScores],
    budget: usize,
    support_lines: Option<usize>,
) -> Vec<Comparison> {
    use Method::*;
    let pairs = [
        (MetaFinetune, FedavgFinetune),
        (FedavgFinetune, Global),
        (Global, Base),
        (FedavgFinetune, Base),
        (LocalOnly, Base),
        // The profile ablation: profile-weighted, profile-scheduled adaptation against the plain
        // one (uniform weights, fixed steps), both from the FedAvg adapter.
        (AdaptiveFinetune, FedavgFinetune),
        // Rejected suggestions as negatives (unlikelihood) or left out.
        (AdaptiveUnlikelihoodFinetune, AdaptiveFinetune),
        // Privacy's cost on held-out users (private runs).
        (Global, GlobalNonprivate),
        (FedavgFinetune, FedavgFinetuneNonprivate),
        (MetaFinetune, MetaFinetuneNonprivate),
    ];
    let mut out = Vec::new();
    for (better, worse) in pairs {
        for metric in Metric::ALL {
            let (checked, unchecked): (Vec<f64>, Vec<f64>) = scores
                .iter()
                .filter_map(|s| {
                    let served = metric.of(&better.checked(s)?.scores())
                        - metric.of(&worse.checked(s)?.scores());
                    let as_trained = metric.of(&better.unchecked(s, budget)?)
                        - metric.of(&worse.unchecked(s, budget)?);
                    Some((served, as_trained))
                })
                .unzip();
            if checked.is_empty() {
                continue;
            }
            let (i, u) = (interval(&checked), interval(&unchecked));
            out.push(Comparison {
                better,
                worse,
                metric,
                support_lines,
                mean_difference: i.mean,
                ci95: i.ci95,
                users: i.n,
                unchecked_mean_difference: u.mean,
                unchecked_ci95: u.ci95,
            });
        }
    }
    out
}

impl Checked {
    /// The served model's scores.
    pub fn scores(&self) -> Scores {
        Scores {
            report: self.report,
            keyboard: self.keyboard,
        }
    }
}

/// Per-method means and intervals over the evaluated users, keyed by the method's name;
/// methods no user ran are left out.
pub fn results(scores: &[UserScores], budget: usize) -> BTreeMap<&'static str, MethodResult> {
    let mut out = BTreeMap::new();
    for method in Method::ALL {
        // (served, unchecked, base) per user that ran the method.
        let rows: Vec<(Checked, Scores, Scores)> = scores
            .iter()
            .filter_map(|s| {
                let base = Method::Base.unchecked(s, budget)?;
                Some((method.checked(s)?, method.unchecked(s, budget)?, base))
            })
            .collect();
        if rows.is_empty() {
            continue;
        }
        let n = rows.len() as f64;
        // The share of users whose `pick` is above (or below) base's on `metric`.
        let share =
            |pick: &dyn Fn(&(Checked, Scores, Scores)) -> Scores, metric: Metric, above: bool| {
                rows.iter()
                    .filter(|r| {
                        let (a, b) = (metric.of(&pick(r)), metric.of(&r.2));
                        if above {
                            a > b
                        } else {
                            a < b
                        }
                    })
                    .count() as f64
                    / n
            };
        let served = |r: &(Checked, Scores, Scores)| r.0.scores();
        let unchecked = |r: &(Checked, Scores, Scores)| r.1;
        let lowest_loss = |r: &(Checked, Scores, Scores)| Scores {
            report: r.0.lowest_loss_report,
            ..r.1
        };
        let mean = |pick: &dyn Fn(&(Checked, Scores, Scores)) -> Scores, metric: Metric| {
            interval(&rows.iter().map(|r| metric.of(&pick(r))).collect::<Vec<_>>())
        };
        let count = |s: Served| rows.iter().filter(|r| r.0.served == s).count();
        let a = mean(&served, Metric::Accuracy);
        let b = interval(
            &rows
                .iter()
                .map(|r| r.0.report.bits_per_byte)
                .collect::<Vec<_>>(),
        );
        let top1 = mean(&served, Metric::NextWordTop1);
        let top3 = mean(&served, Metric::NextWordTop3);
        let saved = mean(&served, Metric::KeystrokeSavings);
        let u = mean(&unchecked, Metric::Accuracy);
        let accuracy_by_steps = match method.steps_curve() {
            Some(curve) => {
                let mut sums: BTreeMap<usize, (f64, usize)> = BTreeMap::new();
                for (step, r) in scores.iter().filter_map(|s| s.curves.get(&curve)).flatten() {
                    let e = sums.entry(*step).or_default();
                    e.0 += r.accuracy;
                    e.1 += 1;
                }
                sums.into_iter()
                    .map(|(k, (s, n))| (k, s / n as f64))
                    .collect()
            }
            None => BTreeMap::from([(0, u.mean)]),
        };
        use Metric::{Accuracy, KeystrokeSavings, NextWordTop1};
        out.insert(
            method.name(),
            MethodResult {
                accuracy: a.mean,
                accuracy_ci95: a.ci95,
                bits_per_byte: b.mean,
                bits_per_byte_ci95: b.ci95,
                next_word_top1: top1.mean,
                next_word_top1_ci95: top1.ci95,
                next_word_top3: top3.mean,
                next_word_top3_ci95: top3.ci95,
                keystroke_savings: saved.mean,
                keystroke_savings_ci95: saved.ci95,
                users: a.n,
                helped_share: share(&served, NextWordTop1, true),
                hurt_share: share(&served, NextWordTop1, false),
                accuracy_helped_share: share(&served, Accuracy, true),
                accuracy_hurt_share: share(&served, Accuracy, false),
                served_base: count(Served::Base),
                served_start: count(Served::Global),
                served_personal: count(Served::Personal),
                lowest_loss_accuracy: mean(&lowest_loss, Accuracy).mean,
                lowest_loss_accuracy_hurt_share: share(&lowest_loss, Accuracy, false),
                unchecked_accuracy: u.mean,
                unchecked_accuracy_ci95: u.ci95,
                unchecked_next_word_top1: mean(&unchecked, NextWordTop1).mean,
                unchecked_keystroke_savings: mean(&unchecked, KeystrokeSavings).mean,
                unchecked_helped_share: share(&unchecked, NextWordTop1, true),
                unchecked_hurt_share: share(&unchecked, NextWordTop1, false),
                unchecked_accuracy_helped_share: share(&unchecked, Accuracy, true),
                unchecked_accuracy_hurt_share: share(&unchecked, Accuracy, false),
                accuracy_by_steps,
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(accuracy: f64) -> EvalReport {
        EvalReport {
            loss: 1.0,
            bits_per_byte: 1.0,
            accuracy,
            tokens: 10,
        }
    }

    /// Keyboard figures of `top1` right words out of 10 (and as many in the top three, and
    /// saved keystrokes out of 10).
    fn kb(top1: usize) -> KeyboardReport {
        KeyboardReport {
            words: 10,
            top1,
            top3: top1,
            keystrokes: 10,
            saved: top1,
        }
    }

    fn checked(served: Served, accuracy: f64, top1: usize) -> Checked {
        Checked {
            served,
            report: report(accuracy),
            keyboard: kb(top1),
            lowest_loss: served,
            lowest_loss_report: report(accuracy),
        }
    }

    /// One user: base 0.40; FedAvg's curve 0.50 at its start, 0.60 after 2 steps; local-only
    /// 0.45 after 2 steps; no meta, no adaptive run. The check serves what was trained. Top-1
    /// words: base 2, FedAvg 3 then 4, local-only 2 (one more each with `better_words`).
    fn user(shift: f64) -> UserScores {
        user_with(shift, 0)
    }

    fn user_with(shift: f64, better_words: usize) -> UserScores {
        let fedavg = Curve::From(FederationKind::Fedavg);
        let w = better_words;
        UserScores {
            base: report(0.40 + shift),
            base_keyboard: kb(2),
            keyboard: BTreeMap::from([
                (Point::Start(fedavg), kb(3 + w)),
                (Point::Budget(fedavg), kb(4 + w)),
                (Point::Budget(Curve::LocalOnly), kb(2 + w)),
            ]),
            curves: BTreeMap::from([
                (
                    fedavg,
                    vec![(0, report(0.50 + shift)), (2, report(0.60 + shift))],
                ),
                (
                    Curve::LocalOnly,
                    vec![(0, report(0.40 + shift)), (2, report(0.45 + shift))],
                ),
            ]),
            checked: BTreeMap::from([
                (
                    Point::Start(fedavg),
                    checked(Served::Global, 0.50 + shift, 3 + w),
                ),
                (
                    Point::Budget(fedavg),
                    checked(Served::Personal, 0.60 + shift, 4 + w),
                ),
                (
                    Point::Budget(Curve::LocalOnly),
                    checked(Served::Personal, 0.45 + shift, 2 + w),
                ),
            ]),
            adaptive: None,
        }
    }

    #[test]
    fn each_method_reads_its_curve_at_its_point() {
        let u = user(0.0);
        let at = |m: Method| m.unchecked(&u, 2).map(|r| r.report.accuracy);
        assert_eq!(at(Method::Base), Some(0.40));
        assert_eq!(at(Method::Global), Some(0.50));
        assert_eq!(at(Method::FedavgFinetune), Some(0.60));
        assert_eq!(at(Method::LocalOnly), Some(0.45));
        assert_eq!(at(Method::MetaFinetune), None);
        assert_eq!(at(Method::AdaptiveFinetune), None);
        assert_eq!(at(Method::GlobalNonprivate), None);
        let words = |m: Method| m.unchecked(&u, 2).map(|r| r.keyboard.top1);
        assert_eq!(words(Method::Base), Some(2));
        assert_eq!(words(Method::Global), Some(3));
        assert_eq!(words(Method::FedavgFinetune), Some(4));
    }

    #[test]
    fn results_and_comparisons_cover_the_methods_that_ran() {
        let scores = [user(0.0), user(0.1)];
        let r = results(&scores, 2);
        assert_eq!(
            r.keys().copied().collect::<Vec<_>>(),
            ["base", "fedavg_finetune", "global", "local_only"]
        );
        assert!((r["fedavg_finetune"].accuracy - 0.65).abs() < 1e-12);
        // A fine-tuned method shows its curve; the others one point.
        assert_eq!(r["local_only"].accuracy_by_steps.len(), 2);
        assert_eq!(r["global"].accuracy_by_steps.len(), 1);
        assert!((r["fedavg_finetune"].next_word_top1 - 0.4).abs() < 1e-12);
        assert!((r["global"].keystroke_savings - 0.3).abs() < 1e-12);
        let c = comparisons(&scores, 2, Some(16));
        let pairs: Vec<_> = c
            .iter()
            .filter(|c| c.metric == Metric::Accuracy)
            .map(|c| (c.better, c.worse))
            .collect();
        assert_eq!(
            pairs,
            [
                (Method::FedavgFinetune, Method::Global),
                (Method::Global, Method::Base),
                (Method::FedavgFinetune, Method::Base),
                (Method::LocalOnly, Method::Base),
            ]
        );
        // Every pair on every metric, at the users' support size.
        assert_eq!(c.len(), 4 * Metric::ALL.len());
        assert!(c.iter().all(|c| c.support_lines == Some(16)));
        // Paired: both users gain exactly 0.10, so the interval is empty.
        assert!((c[0].mean_difference - 0.10).abs() < 1e-12 && c[0].ci95.abs() < 1e-12);
        let top1 = |better, worse| {
            c.iter()
                .find(|c| (c.better, c.worse, c.metric) == (better, worse, Metric::NextWordTop1))
                .unwrap()
                .mean_difference
        };
        assert!((top1(Method::FedavgFinetune, Method::Global) - 0.1).abs() < 1e-12);
        assert!((top1(Method::LocalOnly, Method::Base)).abs() < 1e-12);
    }

    #[test]
    fn helped_and_hurt_shares_count_users_against_base() {
        // Three users: local-only helps the first two and hurts the third (0.35 < 0.40);
        // base itself is neither.
        let mut hurt = user(0.0);
        hurt.curves
            .insert(Curve::LocalOnly, vec![(0, report(0.40)), (2, report(0.35))]);
        hurt.checked.insert(
            Point::Budget(Curve::LocalOnly),
            checked(Served::Personal, 0.35, 1),
        );
        hurt.keyboard.insert(Point::Budget(Curve::LocalOnly), kb(1));
        // On words: local-only ties base for the first user, helps the second, hurts the third.
        let r = results(&[user(0.0), user_with(0.1, 1), hurt], 2);
        let local = &r["local_only"];
        assert!((local.accuracy_helped_share - 2.0 / 3.0).abs() < 1e-12);
        assert!((local.accuracy_hurt_share - 1.0 / 3.0).abs() < 1e-12);
        assert!((local.helped_share - 1.0 / 3.0).abs() < 1e-12);
        assert!((local.hurt_share - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!((r["base"].helped_share, r["base"].hurt_share), (0.0, 0.0));
        assert_eq!(r["fedavg_finetune"].hurt_share, 0.0);
        assert_eq!(r["fedavg_finetune"].accuracy_hurt_share, 0.0);
    }

    #[test]
    fn the_served_model_is_scored_and_the_unchecked_kept_beside_it() {
        // The check caught the third user's local-only run and served base instead.
        let mut caught = user(0.0);
        caught
            .curves
            .insert(Curve::LocalOnly, vec![(0, report(0.40)), (2, report(0.35))]);
        caught.checked.insert(
            Point::Budget(Curve::LocalOnly),
            checked(Served::Base, 0.40, 2),
        );
        caught
            .keyboard
            .insert(Point::Budget(Curve::LocalOnly), kb(1));
        let scores = [user(0.0), user(0.1), caught];
        let local = &results(&scores, 2)["local_only"];
        assert_eq!(local.hurt_share, 0.0, "served: base is not worse than base");
        assert_eq!(local.accuracy_hurt_share, 0.0);
        assert!((local.unchecked_accuracy_hurt_share - 1.0 / 3.0).abs() < 1e-12);
        assert!((local.unchecked_hurt_share - 1.0 / 3.0).abs() < 1e-12);
        assert!((local.accuracy - (0.45 + 0.55 + 0.40) / 3.0).abs() < 1e-12);
        assert!((local.unchecked_accuracy - (0.45 + 0.55 + 0.35) / 3.0).abs() < 1e-12);
        assert_eq!(
            (local.served_base, local.served_start, local.served_personal),
            (1, 0, 2)
        );
        let c = comparisons(&scores, 2, Some(16));
        let lb = c
            .iter()
            .find(|c| {
                (c.better, c.worse, c.metric) == (Method::LocalOnly, Method::Base, Metric::Accuracy)
            })
            .unwrap();
        assert!((lb.mean_difference - 0.10 / 3.0).abs() < 1e-12);
        assert!((lb.unchecked_mean_difference - 0.05 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn names_are_the_reports_keys() {
        for m in Method::ALL {
            assert_eq!(serde_json::to_value(m).unwrap(), m.name());
            assert_eq!(format!("{m:>3}"), m.name(), "names are longer than 3");
        }
        for m in Metric::ALL {
            assert_eq!(serde_json::to_value(m).unwrap(), m.name());
        }
    }
}
