//! The evaluated methods: where each one's score for a held-out user comes from, and the
//! per-method figures and paired per-user differences the report prints.

use std::collections::BTreeMap;
use std::fmt;

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

    /// A user's report under this method after `budget` fine-tuning steps, the adapter as
    /// trained (before the never-harm check); None where the method did not run.
    fn unchecked(self, s: &UserScores, budget: usize) -> Option<&EvalReport> {
        let (curve, step) = match self.source() {
            Source::Base => return Some(&s.base),
            Source::At(Point::Start(c)) => (c, 0),
            Source::At(Point::Budget(c)) => (c, budget),
        };
        s.curves
            .get(&curve)?
            .iter()
            .find(|(k, _)| *k == step)
            .map(|(_, r)| r)
    }

    /// What a user is served under this method after the never-harm check, and its report.
    fn checked(self, s: &UserScores) -> Option<Checked> {
        match self.source() {
            Source::Base => Some(Checked {
                served: Served::Base,
                report: s.base,
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
/// check, and the same method's adapter unchecked.
#[derive(Debug, Clone, Serialize)]
pub struct MethodResult {
    pub accuracy: f64,
    pub accuracy_ci95: f64,
    pub bits_per_byte: f64,
    pub bits_per_byte_ci95: f64,
    pub users: usize,
    /// Shares of users above and below the base model (accuracy on their own query lines).
    pub helped_share: f64,
    pub hurt_share: f64,
    /// How many users the check served each candidate: the base model, the method's starting
    /// adapter (a federation's), the method's own result.
    pub served_base: usize,
    pub served_start: usize,
    pub served_personal: usize,
    /// Under the plain lowest-held-out-loss rule instead of the check's confident one.
    pub lowest_loss_accuracy: f64,
    pub lowest_loss_hurt_share: f64,
    /// The same figures for the method's adapter as it is, before the check.
    pub unchecked_accuracy: f64,
    pub unchecked_accuracy_ci95: f64,
    pub unchecked_helped_share: f64,
    pub unchecked_hurt_share: f64,
    /// Mean accuracy after each number of local steps (the accuracy-vs-steps curve, of the
    /// adapters as trained).
    pub accuracy_by_steps: BTreeMap<usize, f64>,
}

/// `better − worse` in accuracy, paired by user, of what the never-harm check served, and of
/// the two methods' adapters unchecked.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub better: Method,
    pub worse: Method,
    pub mean_difference: f64,
    pub ci95: f64,
    pub users: usize,
    pub unchecked_mean_difference: f64,
    pub unchecked_ci95: f64,
}

/// The benchmark's ordering as paired differences: meta_finetune − fedavg_finetune,
/// fedavg_finetune − global, global − base, fedavg_finetune − base and local_only − base; then the profile
/// ablations and, in private runs, privacy's cost. Pairs with no user are left out.
pub fn comparisons(scores: &[UserScores], budget: usize) -> Vec<Comparison> {
    use Method::*;
    [
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
    ]
    .into_iter()
    .filter_map(|(better, worse)| {
        let (checked, unchecked): (Vec<f64>, Vec<f64>) = scores
            .iter()
            .filter_map(|s| {
                let served = better.checked(s)?.report.accuracy - worse.checked(s)?.report.accuracy;
                let as_trained =
                    better.unchecked(s, budget)?.accuracy - worse.unchecked(s, budget)?.accuracy;
                Some((served, as_trained))
            })
            .unzip();
        (!checked.is_empty()).then(|| {
            let (i, u) = (interval(&checked), interval(&unchecked));
            Comparison {
                better,
                worse,
                mean_difference: i.mean,
                ci95: i.ci95,
                users: i.n,
                unchecked_mean_difference: u.mean,
                unchecked_ci95: u.ci95,
            }
        })
    })
    .collect()
}

/// Per-method means and intervals over the evaluated users, keyed by the method's name;
/// methods no user ran are left out.
pub fn results(scores: &[UserScores], budget: usize) -> BTreeMap<&'static str, MethodResult> {
    let mut out = BTreeMap::new();
    for method in Method::ALL {
        // (served, unchecked, base) per user that ran the method.
        let rows: Vec<(Checked, &EvalReport, &EvalReport)> = scores
            .iter()
            .filter_map(|s| Some((method.checked(s)?, method.unchecked(s, budget)?, &s.base)))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let share = |pick: fn(&(Checked, &EvalReport, &EvalReport)) -> f64, above: bool| {
            let n = rows
                .iter()
                .filter(|r| {
                    let (a, b) = (pick(r), r.2.accuracy);
                    if above {
                        a > b
                    } else {
                        a < b
                    }
                })
                .count();
            n as f64 / rows.len() as f64
        };
        let served = |s: Served| rows.iter().filter(|r| r.0.served == s).count();
        let a = interval(&rows.iter().map(|r| r.0.report.accuracy).collect::<Vec<_>>());
        let b = interval(
            &rows
                .iter()
                .map(|r| r.0.report.bits_per_byte)
                .collect::<Vec<_>>(),
        );
        let u = interval(&rows.iter().map(|r| r.1.accuracy).collect::<Vec<_>>());
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
        out.insert(
            method.name(),
            MethodResult {
                accuracy: a.mean,
                accuracy_ci95: a.ci95,
                bits_per_byte: b.mean,
                bits_per_byte_ci95: b.ci95,
                users: a.n,
                helped_share: share(|r| r.0.report.accuracy, true),
                hurt_share: share(|r| r.0.report.accuracy, false),
                served_base: served(Served::Base),
                served_start: served(Served::Global),
                served_personal: served(Served::Personal),
                lowest_loss_accuracy: interval(
                    &rows
                        .iter()
                        .map(|r| r.0.lowest_loss_report.accuracy)
                        .collect::<Vec<_>>(),
                )
                .mean,
                lowest_loss_hurt_share: share(|r| r.0.lowest_loss_report.accuracy, false),
                unchecked_accuracy: u.mean,
                unchecked_accuracy_ci95: u.ci95,
                unchecked_helped_share: share(|r| r.1.accuracy, true),
                unchecked_hurt_share: share(|r| r.1.accuracy, false),
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

    fn checked(served: Served, accuracy: f64) -> Checked {
        Checked {
            served,
            report: report(accuracy),
            lowest_loss: served,
            lowest_loss_report: report(accuracy),
        }
    }

    /// One user: base 0.40; FedAvg's curve 0.50 at its start, 0.60 after 2 steps; local-only
    /// 0.45 after 2 steps; no meta, no adaptive run. The check serves what was trained.
    fn user(shift: f64) -> UserScores {
        let fedavg = Curve::From(FederationKind::Fedavg);
        UserScores {
            base: report(0.40 + shift),
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
                (Point::Start(fedavg), checked(Served::Global, 0.50 + shift)),
                (
                    Point::Budget(fedavg),
                    checked(Served::Personal, 0.60 + shift),
                ),
                (
                    Point::Budget(Curve::LocalOnly),
                    checked(Served::Personal, 0.45 + shift),
                ),
            ]),
            adaptive: None,
        }
    }

    #[test]
    fn each_method_reads_its_curve_at_its_point() {
        let u = user(0.0);
        let at = |m: Method| m.unchecked(&u, 2).map(|r| r.accuracy);
        assert_eq!(at(Method::Base), Some(0.40));
        assert_eq!(at(Method::Global), Some(0.50));
        assert_eq!(at(Method::FedavgFinetune), Some(0.60));
        assert_eq!(at(Method::LocalOnly), Some(0.45));
        assert_eq!(at(Method::MetaFinetune), None);
        assert_eq!(at(Method::AdaptiveFinetune), None);
        assert_eq!(at(Method::GlobalNonprivate), None);
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
        let c = comparisons(&scores, 2);
        let pairs: Vec<_> = c.iter().map(|c| (c.better, c.worse)).collect();
        assert_eq!(
            pairs,
            [
                (Method::FedavgFinetune, Method::Global),
                (Method::Global, Method::Base),
                (Method::FedavgFinetune, Method::Base),
                (Method::LocalOnly, Method::Base),
            ]
        );
        // Paired: both users gain exactly 0.10, so the interval is empty.
        assert!((c[0].mean_difference - 0.10).abs() < 1e-12 && c[0].ci95.abs() < 1e-12);
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
            checked(Served::Personal, 0.35),
        );
        let r = results(&[user(0.0), user(0.1), hurt], 2);
        let local = &r["local_only"];
        assert!((local.helped_share - 2.0 / 3.0).abs() < 1e-12);
        assert!((local.hurt_share - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!((r["base"].helped_share, r["base"].hurt_share), (0.0, 0.0));
        assert_eq!(r["fedavg_finetune"].hurt_share, 0.0);
    }

    #[test]
    fn the_served_model_is_scored_and_the_unchecked_kept_beside_it() {
        // The check caught the third user's local-only run and served base instead.
        let mut caught = user(0.0);
        caught
            .curves
            .insert(Curve::LocalOnly, vec![(0, report(0.40)), (2, report(0.35))]);
        caught
            .checked
            .insert(Point::Budget(Curve::LocalOnly), checked(Served::Base, 0.40));
        let scores = [user(0.0), user(0.1), caught];
        let local = &results(&scores, 2)["local_only"];
        assert_eq!(local.hurt_share, 0.0, "served: base is not worse than base");
        assert!((local.unchecked_hurt_share - 1.0 / 3.0).abs() < 1e-12);
        assert!((local.accuracy - (0.45 + 0.55 + 0.40) / 3.0).abs() < 1e-12);
        assert!((local.unchecked_accuracy - (0.45 + 0.55 + 0.35) / 3.0).abs() < 1e-12);
        assert_eq!(
            (local.served_base, local.served_start, local.served_personal),
            (1, 0, 2)
        );
        let c = comparisons(&scores, 2);
        let lb = c
            .iter()
            .find(|c| (c.better, c.worse) == (Method::LocalOnly, Method::Base))
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
    }
}
