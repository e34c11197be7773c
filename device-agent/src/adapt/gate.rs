//! The never-harm check. Before a device serves a new adapter it scores the candidates — the
//! base model alone, the federation's global adapter, the new personal adapter — on the
//! user's own held-out interactions and serves the one with the lowest loss. It runs on the
//! device, on text that never leaves it, and costs no privacy.
//!
//! The held-out slice is the one the adaptation stops early on, so the personal adapter's
//! score is slightly optimistic (it was picked on that slice); base and global are scored
//! without that bias. Ties go to the simpler candidate (base, then global). Without a
//! held-out slice (fewer than 10 interactions) nothing can be checked, and the base model is
//! served.

use fedpersona_model::train::{evaluate, Window};
use fedpersona_model::{BaseModel, LoraAdapter};
use serde::{Deserialize, Serialize};

/// Which model a device serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Served {
    /// The base model without an adapter.
    Base,
    /// The federation's global adapter, untouched.
    Global,
    /// The adapter trained on the user's own text.
    Personal,
}

/// What the check measured and chose.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    pub served: Served,
    /// Held-out loss of each candidate (None: not a candidate, or no held-out slice).
    pub base_loss: Option<f64>,
    pub global_loss: Option<f64>,
    pub personal_loss: Option<f64>,
}

impl Gate {
    /// Scores the candidates on `held_out` and picks the best (see the module's rules).
    pub fn check(
        base: &BaseModel,
        held_out: &[Window],
        global: Option<&LoraAdapter>,
        personal: &LoraAdapter,
    ) -> anyhow::Result<Gate> {
        if held_out.is_empty() {
            return Ok(Gate {
                served: Served::Base,
                base_loss: None,
                global_loss: None,
                personal_loss: None,
            });
        }
        let score = |a: Option<&LoraAdapter>| -> anyhow::Result<f64> {
            Ok(evaluate(&base.model, a, &base.tokenizer, held_out, 16)?.loss)
        };
        let base_loss = score(None)?;
        let global_loss = global.map(|g| score(Some(g))).transpose()?;
        let personal_loss = score(Some(personal))?;
        Ok(Gate {
            served: choose(base_loss, global_loss, personal_loss),
            base_loss: Some(base_loss),
            global_loss,
            personal_loss: Some(personal_loss),
        })
    }
}

/// The candidate with the lowest loss; a tie (or a NaN) keeps the simpler one.
fn choose(base: f64, global: Option<f64>, personal: f64) -> Served {
    let mut best = (Served::Base, base);
    for (served, loss) in [(Served::Global, global), (Served::Personal, Some(personal))] {
        if let Some(loss) = loss.filter(|l| *l < best.1) {
            best = (served, loss);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_loss_is_served_and_ties_keep_the_simpler() {
        assert_eq!(choose(2.0, Some(1.9), 1.8), Served::Personal);
        assert_eq!(choose(2.0, Some(1.7), 1.8), Served::Global);
        assert_eq!(choose(1.5, Some(1.7), 1.8), Served::Base);
        assert_eq!(choose(2.0, None, 2.1), Served::Base);
        assert_eq!(choose(2.0, None, 1.9), Served::Personal);
        // Ties and NaN never promote a more complex candidate.
        assert_eq!(choose(2.0, Some(2.0), 2.0), Served::Base);
        assert_eq!(choose(2.0, Some(f64::NAN), f64::NAN), Served::Base);
        assert_eq!(choose(2.0, Some(1.5), 1.5), Served::Global);
    }
}
