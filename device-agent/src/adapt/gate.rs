//! The never-harm check. Before a device serves a new adapter it scores the candidates — the
//! base model alone, the federation's global adapter, the new personal adapter — on the
//! user's own held-out interactions. It runs on the device, on text that never leaves it, and
//! costs no privacy.
//!
//! An adapter is served only when the held-out slice shows it beats the base model with
//! confidence: a one-sided paired t-test over the slice's windows (each window's mean loss
//! under base minus under the candidate) at 95%. Among the candidates that pass, the lowest
//! mean loss is served; when none passes, the base model. A slice of a handful of lines rarely
//! separates small differences, so this errs towards base: a user gets an adapter only where
//! their own text says it helps. The plain rule — the lowest mean loss, confident or not — is
//! recorded beside it ([`Gate::lowest_loss`]) so that the two can be compared.
//!
//! The held-out slice is the one the adaptation stops early on, so the personal adapter's
//! score is slightly optimistic (it was picked on that slice); base and global are scored
//! without that bias. Ties go to the simpler candidate (base, then global). Without a
//! held-out slice (fewer than 10 interactions) nothing can be checked, and the base model is
//! served.

use fedpersona_model::train::{evaluate_each, Window};
use fedpersona_model::{BaseModel, LoraAdapter};
use serde::{Deserialize, Serialize};

/// Which model a device serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Served {
    /// The base model without an adapter.
    #[default]
    Base,
    /// The federation's global adapter, untouched.
    Global,
    /// The adapter trained on the user's own text.
    Personal,
}

/// What the check measured and chose.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    /// What the device serves: the confident rule.
    pub served: Served,
    /// What the lowest mean held-out loss alone would serve (base in a `state.json` written
    /// before it was recorded).
    #[serde(default)]
    pub lowest_loss: Served,
    /// Mean held-out loss of each candidate (None: not a candidate, or no held-out slice).
    pub base_loss: Option<f64>,
    pub global_loss: Option<f64>,
    pub personal_loss: Option<f64>,
}

/// The one-sided confidence at which a candidate must beat the base model.
pub const CONFIDENCE: f64 = 0.95;

impl Gate {
    /// Scores the candidates on `held_out` and picks one (see the module's rules).
    pub fn check(
        base: &BaseModel,
        held_out: &[Window],
        global: Option<&LoraAdapter>,
        personal: &LoraAdapter,
    ) -> anyhow::Result<Gate> {
        let score = |a: Option<&LoraAdapter>| window_losses(base, a, held_out);
        let base_losses = score(None)?;
        let global_losses = global.map(|g| score(Some(g))).transpose()?;
        let personal_losses = score(Some(personal))?;
        Ok(Gate::of_losses(
            &base_losses,
            global_losses.as_deref(),
            Some(&personal_losses),
        ))
    }

    /// The choice among candidates already scored on the held-out slice, one mean loss per
    /// window in the same order for each (None: not a candidate), by the module's rules.
    pub fn of_losses(base: &[f64], global: Option<&[f64]>, personal: Option<&[f64]>) -> Gate {
        if base.is_empty() {
            return Gate::unchecked();
        }
        let candidates = [(Served::Global, global), (Served::Personal, personal)];
        let mut served = (Served::Base, mean(base));
        let mut lowest = served;
        for (candidate, losses) in candidates {
            let Some(losses) = losses.filter(|l| l.len() == base.len()) else {
                continue;
            };
            let loss = mean(losses);
            if loss < lowest.1 {
                lowest = (candidate, loss);
            }
            if loss < served.1 && confidently_better(base, losses) {
                served = (candidate, loss);
            }
        }
        Gate {
            served: served.0,
            lowest_loss: lowest.0,
            base_loss: Some(mean(base)),
            global_loss: global.map(mean),
            personal_loss: personal.map(mean),
        }
    }

    /// The check without a held-out slice: nothing can be compared, so the base model.
    pub fn unchecked() -> Gate {
        Gate {
            served: Served::Base,
            lowest_loss: Served::Base,
            base_loss: None,
            global_loss: None,
            personal_loss: None,
        }
    }
}

/// Each held-out window's mean loss under `adapter` (None: the base model alone).
pub fn window_losses(
    base: &BaseModel,
    adapter: Option<&LoraAdapter>,
    held_out: &[Window],
) -> anyhow::Result<Vec<f64>> {
    Ok(
        evaluate_each(&base.model, adapter, &base.tokenizer, held_out, 16)?
            .iter()
            .map(|r| r.loss)
            .collect(),
    )
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// Whether `candidate`'s per-window losses are below `base`'s at [`CONFIDENCE`]: the lower
/// one-sided bound of the paired differences' mean (Student t, n − 1 degrees of freedom) is
/// above zero. Needs two windows; NaN never passes.
fn confidently_better(base: &[f64], candidate: &[f64]) -> bool {
    use statrs::distribution::{ContinuousCDF, StudentsT};
    let n = base.len();
    if n < 2 {
        return false;
    }
    let d: Vec<f64> = base.iter().zip(candidate).map(|(b, c)| b - c).collect();
    let m = mean(&d);
    let var = d.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64;
    let Ok(t) = StudentsT::new(0.0, 1.0, (n - 1) as f64) else {
        return false;
    };
    let bound = m - t.inverse_cdf(CONFIDENCE) * (var / n as f64).sqrt();
    bound > 0.0
}

/// How many of `examples` (the newest) are held out at `share`, for early stopping and for
/// this check: at least 2, none below 10 examples (or at a zero share).
pub fn held_out_len(examples: usize, share: f64) -> usize {
    if share > 0.0 && examples >= 10 {
        ((examples as f64 * share).ceil() as usize).max(2)
    } else {
        0
    }
}

/// The share of its newest examples a device holds out.
pub const HOLDOUT_SHARE: f64 = 0.1;

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(base: &[f64], global: Option<&[f64]>, personal: Option<&[f64]>) -> (Served, Served) {
        let g = Gate::of_losses(base, global, personal);
        (g.served, g.lowest_loss)
    }

    #[test]
    fn a_consistent_gain_is_served_and_a_noisy_one_is_not() {
        use Served::{Base, Global, Personal};
        let base = [2.0, 2.2, 1.8, 2.1, 1.9];
        // Lower on every window by about 0.1: confident.
        let better = [1.9, 2.1, 1.69, 2.0, 1.81];
        assert_eq!(gate(&base, None, Some(&better)), (Personal, Personal));
        assert_eq!(gate(&base, Some(&better), None), (Global, Global));
        // Lower on average, but by a wide spread across windows: only the plain rule takes it.
        let noisy = [1.3, 2.6, 1.2, 2.5, 1.8];
        assert!(mean(&noisy) < mean(&better));
        assert_eq!(gate(&base, None, Some(&noisy)), (Base, Personal));
        // Among confident candidates the lowest mean wins; a noisy lower one does not.
        let best = [1.7, 1.9, 1.5, 1.8, 1.6];
        assert_eq!(
            gate(&base, Some(&better), Some(&best)),
            (Personal, Personal)
        );
        assert_eq!(gate(&base, Some(&better), Some(&noisy)).0, Global);
        // Worse, tied, NaN, or a slice of one window: base.
        let worse = [2.1, 2.3, 1.9, 2.2, 2.0];
        assert_eq!(gate(&base, Some(&worse), Some(&base)), (Base, Base));
        let nan = [f64::NAN; 5];
        assert_eq!(gate(&base, Some(&nan), Some(&nan)), (Base, Base));
        assert_eq!(gate(&[2.0], None, Some(&[1.0])), (Base, Personal));
        assert_eq!(gate(&[], None, Some(&[])), (Base, Base));
    }

    #[test]
    fn the_test_is_students_t_at_95_percent() {
        // d = (0.1, 0.3): mean 0.2, sd 0.1414, se 0.1; t(0.95, 1) = 6.3138: bound −0.43.
        assert!(!confidently_better(&[1.1, 1.3], &[1.0, 1.0]));
        // d = (0.2, 0.2 ± ε) over 10 windows: a bound just below 0.2.
        let base: Vec<f64> = (0..10).map(|i| 1.2 + 1e-3 * i as f64).collect();
        assert!(confidently_better(&base, &[1.0; 10]));
        // Mean 0.05, sd ~0.0527 over 10 windows: t(0.95, 9) = 1.8331, se 0.01667, bound +0.0194.
        let d = [0.1, 0.0, 0.1, 0.0, 0.1, 0.0, 0.1, 0.0, 0.1, 0.0];
        let base: Vec<f64> = d.iter().map(|x| 1.0 + x).collect();
        assert!(confidently_better(&base, &[1.0; 10]));
        // The same spread around a mean of 0.01: the bound is below zero.
        let base: Vec<f64> = d.iter().map(|x| 1.0 + x - 0.04).collect();
        assert!(!confidently_better(&base, &[1.0; 10]));
    }

    #[test]
    fn a_check_recorded_before_the_lowest_loss_rule_still_reads() {
        let old = r#"{"served":"personal","base_loss":2.0,"global_loss":null,"personal_loss":1.5}"#;
        let g: Gate = serde_json::from_str(old).unwrap();
        assert_eq!((g.served, g.lowest_loss), (Served::Personal, Served::Base));
    }

    #[test]
    fn a_tenth_is_held_out_from_ten_examples_on() {
        assert_eq!(held_out_len(9, HOLDOUT_SHARE), 0);
        assert_eq!(held_out_len(10, HOLDOUT_SHARE), 2);
        assert_eq!(held_out_len(21, HOLDOUT_SHARE), 3);
        assert_eq!(held_out_len(64, HOLDOUT_SHARE), 7);
        assert_eq!(held_out_len(64, 0.0), 0);
    }
}
