//! The evaluated methods: where each one's score for a held-out user comes from, and the
//! per-method figures and paired per-user differences the report prints.

use std::collections::BTreeMap;
use std::fmt;

use fedpersona_model::train::EvalReport;
use serde::Serialize;

use crate::evaluation::{Curve, UserScores};
use crate::settings::FederationKind;
use crate::stats::interval;

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
    /// The curve's first point: the start adapter, untouched.
    Start(Curve),
    /// The curve after the scored number of fine-tuning steps.
    Budget(Curve),
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
        match self {
            Method::Base => Source::Base,
            Method::LocalOnly => Source::Budget(Curve::LocalOnly),
            Method::Global => Source::Start(Curve::From(Fedavg)),
            Method::FedavgFinetune => Source::Budget(Curve::From(Fedavg)),
            Method::MetaFinetune => Source::Budget(Curve::From(Meta)),
            Method::AdaptiveFinetune => Source::Budget(Curve::Adaptive),
            Method::AdaptiveUnlikelihoodFinetune => Source::Budget(Curve::AdaptiveUnlikelihood),
            Method::GlobalNonprivate => Source::Start(Curve::From(FedavgNonprivate)),
            Method::FedavgFinetuneNonprivate => Source::Budget(Curve::From(FedavgNonprivate)),
            Method::MetaFinetuneNonprivate => Source::Budget(Curve::From(MetaNonprivate)),
        }
    }

    /// The fine-tuning curve whose steps the method's accuracy-vs-steps row shows (None for
    /// the methods without local steps, and for the adaptive runs, scored at one point).
    fn steps_curve(self) -> Option<Curve> {
        match self.source() {
            Source::Budget(c @ (Curve::LocalOnly | Curve::From(_))) => Some(c),
            _ => None,
        }
    }

    /// A user's report under this method after `budget` fine-tuning steps; None where the
    /// method did not run.
    fn report(self, s: &UserScores, budget: usize) -> Option<&EvalReport> {
        let (curve, step) = match self.source() {
            Source::Base => return Some(&s.base),
            Source::Start(c) => (c, 0),
            Source::Budget(c) => (c, budget),
        };
        s.curves
            .get(&curve)?
            .iter()
            .find(|(k, _)| *k == step)
            .map(|(_, r)| r)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// One method's figures on the held-out users.
#[derive(Debug, Clone, Serialize)]
pub struct MethodResult {
    pub accuracy: f64,
    pub accuracy_ci95: f64,
    pub bits_per_byte: f64,
    pub bits_per_byte_ci95: f64,
    pub users: usize,
    /// Shares of users above and below the base model (accuracy on their own query lines).
    /// The adaptive methods' are after the device's never-harm check; the other methods
    /// serve their adapter unchecked.
    pub helped_share: f64,
    pub hurt_share: f64,
    /// Mean accuracy after each number of local steps (the accuracy-vs-steps curve).
    pub accuracy_by_steps: BTreeMap<usize, f64>,
}

/// `better − worse` in accuracy, paired by user.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub better: Method,
    pub worse: Method,
    pub mean_difference: f64,
    pub ci95: f64,
    pub users: usize,
}

/// The benchmark's ordering as paired differences: meta_finetune − fedavg_finetune,
/// fedavg_finetune − global, global − base, and local_only − base; then the profile
/// ablations and, in private runs, privacy's cost. Pairs with no user are left out.
pub fn comparisons(scores: &[UserScores], budget: usize) -> Vec<Comparison> {
    use Method::*;
    [
        (MetaFinetune, FedavgFinetune),
        (FedavgFinetune, Global),
        (Global, Base),
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
        let d: Vec<f64> = scores
            .iter()
            .filter_map(|s| {
                Some(better.report(s, budget)?.accuracy - worse.report(s, budget)?.accuracy)
            })
            .collect();
        (!d.is_empty()).then(|| {
            let i = interval(&d);
            Comparison {
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

/// Per-method means and intervals over the evaluated users, keyed by the method's name;
/// methods no user ran are left out.
pub fn results(scores: &[UserScores], budget: usize) -> BTreeMap<&'static str, MethodResult> {
    let mut out = BTreeMap::new();
    for method in Method::ALL {
        let paired: Vec<_> = scores
            .iter()
            .filter_map(|s| Some((method.report(s, budget)?, &s.base)))
            .collect();
        if paired.is_empty() {
            continue;
        }
        let share = |f: fn(f64, f64) -> bool| {
            let n = paired
                .iter()
                .filter(|(r, b)| f(r.accuracy, b.accuracy))
                .count();
            n as f64 / paired.len() as f64
        };
        let (helped_share, hurt_share) = (share(|r, b| r > b), share(|r, b| r < b));
        let picked: Vec<_> = paired.iter().map(|(r, _)| *r).collect();
        let a = interval(&picked.iter().map(|r| r.accuracy).collect::<Vec<_>>());
        let b = interval(&picked.iter().map(|r| r.bits_per_byte).collect::<Vec<_>>());
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
            None => BTreeMap::from([(0, a.mean)]),
        };
        out.insert(
            method.name(),
            MethodResult {
                accuracy: a.mean,
                accuracy_ci95: a.ci95,
                bits_per_byte: b.mean,
                bits_per_byte_ci95: b.ci95,
                users: a.n,
                helped_share,
                hurt_share,
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

    /// One user: base 0.40; FedAvg's curve 0.50 at its start, 0.60 after 2 steps; local-only
    /// 0.45 after 2 steps; no meta, no adaptive run.
    fn user(shift: f64) -> UserScores {
        UserScores {
            base: report(0.40 + shift),
            curves: BTreeMap::from([
                (
                    Curve::From(FederationKind::Fedavg),
                    vec![(0, report(0.50 + shift)), (2, report(0.60 + shift))],
                ),
                (
                    Curve::LocalOnly,
                    vec![(0, report(0.40 + shift)), (2, report(0.45 + shift))],
                ),
            ]),
            adaptive: None,
        }
    }

    #[test]
    fn each_method_reads_its_curve_at_its_point() {
        let u = user(0.0);
        let at = |m: Method| m.report(&u, 2).map(|r| r.accuracy);
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
        let r = results(&[user(0.0), user(0.1), hurt], 2);
        let local = &r["local_only"];
        assert!((local.helped_share - 2.0 / 3.0).abs() < 1e-12);
        assert!((local.hurt_share - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!((r["base"].helped_share, r["base"].hurt_share), (0.0, 0.0));
        assert_eq!(r["fedavg_finetune"].hurt_share, 0.0);
    }

    #[test]
    fn names_are_the_reports_keys() {
        for m in Method::ALL {
            assert_eq!(serde_json::to_value(m).unwrap(), m.name());
            assert_eq!(format!("{m:>3}"), m.name(), "names are longer than 3");
        }
    }
}
