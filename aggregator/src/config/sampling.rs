//! Validation of `rounds.sampling`: first-come cohorts (no privacy claim rests on them) or
//! device-side Poisson sampling, its rate, and the largest cohort a Poisson round is built
//! for.

use std::num::NonZeroU32;
use std::time::Duration;

use anyhow::{ensure, Context};
use fedpersona_privacy::{mode, sampling};

use super::file::{ConfigFile, SamplingFile};
use super::Sampling;

/// Over-selection of first-come cohorts when the file names none.
const DEFAULT_OVER_SELECTION: f64 = 0.3;
/// Check-in intervals in the join window when the file names none.
const JOIN_WINDOW_CHECK_INS: f64 = 3.0;
/// Largest population a Poisson config may name.
const MAX_POPULATION: u64 = 1_000_000_000;
/// Without DP, the chance per round that a Poisson cohort outgrows its cap.
const NON_PRIVATE_TAIL: f64 = 1e-9;
/// Rounds the cap is sized for when `rounds.max_rounds` sets no limit.
const UNLIMITED_ROUNDS: u64 = 100_000;

/// The sampling and the most devices a round takes.
pub(super) fn sampling_policy(
    f: &ConfigFile,
    cohort: NonZeroU32,
) -> anyhow::Result<(Sampling, NonZeroU32)> {
    let (r, p) = (&f.rounds, &f.privacy);
    let cohort = u64::from(cohort.get());
    let (sampling, most) = match r.sampling {
        SamplingFile::FirstCome => {
            ensure!(
                p.mode == "none",
                "rounds.sampling must be \"poisson\" with privacy.mode {:?}: the accountant \
                 assumes each device joins a round independently with probability q, which only \
                 devices drawing their own participation enforce (a first-come cohort takes \
                 whoever checks in first, however often)",
                p.mode
            );
            ensure!(
                r.join_window_s.is_none(),
                "rounds.join_window_s is for rounds.sampling = \"poisson\": a first-come \
                 cohort fills as devices check in"
            );
            let over = r.over_selection.unwrap_or(DEFAULT_OVER_SELECTION);
            ensure!(
                over.is_finite() && (0.0..=10.0).contains(&over),
                "rounds.over_selection must be in [0, 10]"
            );
            (Sampling::FirstCome, mode::assigned_per_round(cohort, over))
        }
        SamplingFile::Poisson => {
            ensure!(
                r.over_selection.is_none(),
                "rounds.over_selection is for first-come cohorts: with rounds.sampling = \
                 \"poisson\" the aggregator takes every device that drew itself in"
            );
            let n = p.population;
            ensure!(
                (cohort..=MAX_POPULATION).contains(&n),
                "privacy.population ({n}) must be between rounds.cohort_size ({cohort}) and \
                 {MAX_POPULATION} with rounds.sampling = \"poisson\": it is the number of eligible \
                 devices, and q = cohort_size / population"
            );
            let rate = sampling::poisson_rate(cohort, n);
            let private = p.mode != "none";
            let rounds = match r.max_rounds {
                0 => UNLIMITED_ROUNDS,
                m => m,
            };
            // An unusable δ or ε is refused with the privacy section; size for the strictest.
            let tail = if !private {
                NON_PRIVATE_TAIL
            } else if p.delta > 0.0 && p.epsilon_budget.is_finite() && p.epsilon_budget > 0.0 {
                sampling::oversubscription_tail(p.delta, p.epsilon_budget, rounds)
            } else {
                0.0
            };
            let cap = sampling::cohort_cap(n, rate, tail).max(cohort);
            let window = r
                .join_window_s
                .unwrap_or((JOIN_WINDOW_CHECK_INS * r.retry_after_s).min(r.round_timeout_s / 2.0));
            ensure!(
                window.is_finite() && window >= r.retry_after_s && window < r.round_timeout_s,
                "rounds.join_window_s ({window}) must be at least rounds.retry_after_s ({}), so \
                 that a waiting device checks in and draws within it, and less than \
                 rounds.round_timeout_s ({})",
                r.retry_after_s,
                r.round_timeout_s
            );
            let join_window = Duration::from_secs_f64(window);
            (Sampling::Poisson { rate, join_window }, cap)
        }
    };
    let most = NonZeroU32::new(most.min(u64::from(u32::MAX)) as u32)
        .context("rounds: cohort too large")?;
    Ok((sampling, most))
}
