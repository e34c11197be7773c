//! The user profile, computed from the interaction store on the device: how often and how
//! recently the user interacts, how they receive suggestions, what contexts they write in,
//! how much text there is, and drift (the current adapter's loss on recent text against
//! older text). It stays on the device: nothing on the upload path accepts it (uploads take
//! only `privacy::Privatized`).

use std::collections::BTreeMap;

use fedpersona_model::train::Example;
use serde::Serialize;

use crate::user::store::{Feedback, Stored};

const DAY_MS: f64 = 86_400_000.0;

/// Scores examples with the current adapter: mean loss in nats per token.
pub type Scorer<'a> = &'a dyn Fn(&[Example]) -> anyhow::Result<f64>;

/// Drift of the user's text against the current adapter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Drift {
    /// Mean loss (nats per token) on the most recent fifth of the interactions.
    pub recent_loss: f64,
    /// Mean loss on the older ones.
    pub older_loss: f64,
    /// `recent_loss − older_loss`: above 0, the user's recent text fits the adapter worse.
    pub shift: f64,
}

/// What the device knows about how its user writes and responds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Profile {
    pub interactions: u64,
    pub first_ms: Option<i64>,
    pub last_ms: Option<i64>,
    /// Interactions per day over the last 7 and 30 days.
    pub per_day_7d: f64,
    pub per_day_30d: f64,
    /// Days since the last interaction.
    pub days_since_last: Option<f64>,
    /// Interactions where the model suggested something.
    pub with_suggestion: u64,
    /// Shares of accepted / edited / rejected among suggestions that got that feedback.
    pub acceptance_rate: Option<f64>,
    pub edit_rate: Option<f64>,
    pub rejection_rate: Option<f64>,
    pub ratings: u64,
    pub mean_rating: Option<f64>,
    /// Interactions per `app/kind`.
    pub context_mix: BTreeMap<String, u64>,
    /// Bytes the user wrote (the data volume for adaptation).
    pub text_bytes: u64,
    pub drift: Option<Drift>,
}

/// The user's own text as training examples, oldest first (context → what they wrote).
pub fn examples(items: &[Stored]) -> Vec<Example> {
    items
        .iter()
        .map(|s| Example::new(s.interaction.context.clone(), s.interaction.text.clone()))
        .collect()
}

impl Profile {
    /// Computes the profile of `items` (oldest first) at time `now_ms`. `loss` scores
    /// examples with the current adapter (mean nats per token); drift needs at least 10
    /// interactions.
    pub fn compute(
        items: &[Stored],
        now_ms: i64,
        loss: Option<Scorer<'_>>,
    ) -> anyhow::Result<Profile> {
        let n = items.len() as u64;
        let in_last = |days: f64| {
            items
                .iter()
                .filter(|s| (now_ms - s.interaction.time_ms) as f64 <= days * DAY_MS)
                .count() as f64
                / days
        };
        let (mut accepted, mut edited, mut rejected, mut ratings, mut rating_sum) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        let mut with_suggestion = 0;
        let mut context_mix = BTreeMap::new();
        let mut text_bytes = 0u64;
        for s in items {
            let i = &s.interaction;
            if i.suggestion.is_some() {
                with_suggestion += 1;
                match i.feedback {
                    Feedback::Accepted => accepted += 1,
                    Feedback::Edited => edited += 1,
                    Feedback::Rejected => rejected += 1,
                    _ => {}
                }
            }
            if let Feedback::Rating(r) = i.feedback {
                ratings += 1;
                rating_sum += u64::from(r);
            }
            *context_mix
                .entry(format!("{}/{}", i.app, i.kind))
                .or_default() += 1;
            text_bytes += i.text.len() as u64;
        }
        let judged = accepted + edited + rejected;
        let share = |k: u64| (judged > 0).then(|| k as f64 / judged as f64);
        let drift = match loss {
            Some(loss) if items.len() >= 10 => {
                let all = examples(items);
                let cut = all.len() - all.len() / 5;
                let (older, recent) = all.split_at(cut);
                let (older_loss, recent_loss) = (loss(older)?, loss(recent)?);
                Some(Drift {
                    recent_loss,
                    older_loss,
                    shift: recent_loss - older_loss,
                })
            }
            _ => None,
        };
        Ok(Profile {
            interactions: n,
            first_ms: items.first().map(|s| s.interaction.time_ms),
            last_ms: items.last().map(|s| s.interaction.time_ms),
            per_day_7d: in_last(7.0),
            per_day_30d: in_last(30.0),
            days_since_last: items
                .last()
                .map(|s| (now_ms - s.interaction.time_ms) as f64 / DAY_MS),
            with_suggestion,
            acceptance_rate: share(accepted),
            edit_rate: share(edited),
            rejection_rate: share(rejected),
            ratings,
            mean_rating: (ratings > 0).then(|| rating_sum as f64 / ratings as f64),
            context_mix,
            text_bytes,
            drift,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::user::store::Interaction;

    fn item(id: i64, days_ago: f64, feedback: Feedback, app: &str, now: i64) -> Stored {
        Stored {
            id,
            interaction: Interaction {
                time_ms: now - (days_ago * DAY_MS) as i64,
                context: Some("ctx".into()),
                suggestion: (!matches!(feedback, Feedback::None)).then(|| "sugg".into()),
                text: format!("text {id}"),
                feedback,
                app: app.into(),
                kind: "reply".into(),
            },
        }
    }

    #[test]
    fn rates_mix_volume_and_drift() {
        let now = 100 * DAY_MS as i64;
        let mut items = Vec::new();
        // 20 interactions, one a day over the last 20 days (oldest first).
        for d in 0..20 {
            let fb = match d % 4 {
                0 => Feedback::Accepted,
                1 => Feedback::Edited,
                2 => Feedback::Rejected,
                _ => Feedback::Rating(4),
            };
            let app = if d < 5 { "notes" } else { "mail" };
            items.push(item(d, 19.5 - d as f64, fb, app, now));
        }
        // Loss grows with the text's id: the recent fifth scores worse.
        let loss = |ex: &[Example]| -> anyhow::Result<f64> {
            Ok(ex
                .iter()
                .map(|e| e.text[5..].parse::<f64>().unwrap())
                .sum::<f64>()
                / ex.len() as f64)
        };
        let p = Profile::compute(&items, now, Some(&loss)).unwrap();
        assert_eq!(p.interactions, 20);
        assert!((p.per_day_7d - 7.0 / 7.0).abs() < 1e-9, "{}", p.per_day_7d);
        assert!((p.per_day_30d - 20.0 / 30.0).abs() < 1e-9);
        assert!((p.days_since_last.unwrap() - 0.5).abs() < 1e-6);
        assert_eq!(p.with_suggestion, 20);
        // 15 judged (5 each), 5 ratings.
        assert!((p.acceptance_rate.unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(p.ratings, 5);
        assert_eq!(p.mean_rating, Some(4.0));
        assert_eq!(p.context_mix["mail/reply"], 15);
        assert_eq!(p.context_mix["notes/reply"], 5);
        assert_eq!(
            p.text_bytes,
            (0..20)
                .map(|i| format!("text {i}").len() as u64)
                .sum::<u64>()
        );
        let d = p.drift.unwrap();
        assert!((d.older_loss - 7.5).abs() < 1e-12 && (d.recent_loss - 17.5).abs() < 1e-12);
        assert!(d.shift > 0.0);
        // No data: nothing made up.
        let empty = Profile::compute(&[], now, Some(&loss)).unwrap();
        assert_eq!(empty.interactions, 0);
        assert!(empty.acceptance_rate.is_none() && empty.drift.is_none());
    }
}
