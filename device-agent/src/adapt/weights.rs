//! How the user's interactions weigh in training: feedback says where the model was wrong,
//! so text the user wrote after editing or rejecting a suggestion counts more than text that
//! only accepted it; explicit ratings likewise (a low rating: the suggestion missed). Older
//! text counts less (exponential decay with a half-life, floored). Rejected suggestions can
//! be pushed down by an unlikelihood term ([`crate::adapt::Plan::unlikelihood`]).

use fedpersona_model::train::Example;
use serde::Serialize;

use crate::user::store::{Feedback, Stored};

const DAY_MS: f64 = 86_400_000.0;

/// How examples are weighted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Weights {
    pub no_suggestion: f32,
    pub accepted: f32,
    pub edited: f32,
    pub rejected: f32,
    /// Rating r (1..=5) weighs `rating_1 + (rating_5 - rating_1)·(r - 1)/4`.
    pub rating_1: f32,
    pub rating_5: f32,
    /// Age at which an example's weight halves.
    pub half_life_days: f64,
    /// The least an old example weighs (before feedback).
    pub min_recency: f32,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            no_suggestion: 1.0,
            accepted: 0.75,
            edited: 1.5,
            rejected: 1.25,
            rating_1: 1.5,
            rating_5: 0.5,
            half_life_days: 30.0,
            min_recency: 0.1,
        }
    }
}

impl Weights {
    /// Uniform weights: the plain adaptation the ablation compares against.
    pub fn uniform() -> Self {
        Weights {
            no_suggestion: 1.0,
            accepted: 1.0,
            edited: 1.0,
            rejected: 1.0,
            rating_1: 1.0,
            rating_5: 1.0,
            half_life_days: f64::INFINITY,
            min_recency: 1.0,
        }
    }

    pub fn of(&self, s: &Stored, now_ms: i64) -> f32 {
        let i = &s.interaction;
        let feedback = match i.feedback {
            Feedback::None => self.no_suggestion,
            Feedback::Accepted => self.accepted,
            Feedback::Edited => self.edited,
            Feedback::Rejected => self.rejected,
            Feedback::Rating(r) => {
                self.rating_1 + (self.rating_5 - self.rating_1) * f32::from(r - 1) / 4.0
            }
        };
        let age_days = ((now_ms - i.time_ms).max(0) as f64) / DAY_MS;
        let recency = (0.5f64.powf(age_days / self.half_life_days) as f32).max(self.min_recency);
        feedback * recency
    }

    /// The suggestions the user rejected, in their contexts, weighted by recency: what an
    /// unlikelihood term pushes down.
    pub fn negatives(&self, items: &[Stored], now_ms: i64) -> Vec<Example> {
        items
            .iter()
            .filter(|s| s.interaction.feedback == Feedback::Rejected)
            .filter_map(|s| {
                let text = s.interaction.suggestion.clone().filter(|t| !t.is_empty())?;
                let mut e = Example::new(s.interaction.context.clone(), text);
                let age_days = ((now_ms - s.interaction.time_ms).max(0) as f64) / DAY_MS;
                e.weight =
                    (0.5f64.powf(age_days / self.half_life_days) as f32).max(self.min_recency);
                Some(e)
            })
            .collect()
    }

    /// The interactions as weighted training examples, oldest first.
    pub fn examples(&self, items: &[Stored], now_ms: i64) -> Vec<Example> {
        items
            .iter()
            .map(|s| {
                let mut e = Example::new(s.interaction.context.clone(), s.interaction.text.clone());
                e.weight = self.of(s, now_ms);
                e
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::user::store::Interaction;

    fn stored(time_ms: i64, feedback: Feedback) -> Stored {
        Stored {
            id: 1,
            interaction: Interaction {
                time_ms,
                context: None,
                suggestion: None,
                text: "t".into(),
                feedback,
                app: "a".into(),
                kind: "k".into(),
            },
        }
    }

    #[test]
    fn weights_follow_feedback_and_recency() {
        let w = Weights::default();
        let now = 100 * DAY_MS as i64;
        let fresh = |f| w.of(&stored(now, f), now);
        assert!(fresh(Feedback::Edited) > fresh(Feedback::Rejected));
        assert!(fresh(Feedback::Rejected) > fresh(Feedback::None));
        assert!(fresh(Feedback::None) > fresh(Feedback::Accepted));
        assert!(fresh(Feedback::Rating(1)) > fresh(Feedback::Rating(5)));
        assert_eq!(fresh(Feedback::Rating(3)), 1.0);
        let month_old = w.of(&stored(now - 30 * DAY_MS as i64, Feedback::None), now);
        assert!((month_old - 0.5).abs() < 1e-6);
        let ancient = w.of(&stored(0, Feedback::None), now);
        assert_eq!(ancient, 0.1);
        let u = Weights::uniform();
        assert_eq!(u.of(&stored(0, Feedback::Edited), now), 1.0);
    }
}
