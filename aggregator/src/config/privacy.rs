//! Validation of the `[privacy]` and `[secure_aggregation]` sections: the DP mode, its budget
//! and sampling rate, and the secure-aggregation grid sized for the devices' noise shares.

use std::time::Duration;

use anyhow::{bail, ensure, Context};
use fedpersona_privacy::accountant::{pld, Method};
use fedpersona_privacy::mode;

use super::file::ConfigFile;
use super::{
    Budget, PrivacyMode, PrivacyPolicy, RoundPolicy, SecAggPolicy, UpdatePolicy, Weighting,
};

pub(super) fn privacy_policy(
    f: &ConfigFile,
    rounds: &RoundPolicy,
    update: &UpdatePolicy,
) -> anyhow::Result<(PrivacyPolicy, Option<SecAggPolicy>)> {
    let p = &f.privacy;
    let mode = match p.mode.as_str() {
        "none" => PrivacyMode::None,
        "local" => PrivacyMode::Local,
        "distributed" => PrivacyMode::Distributed,
        "central" => PrivacyMode::Central,
        other => bail!("privacy.mode must be none, local, distributed or central, not {other:?}"),
    };
    let s = &f.secure_aggregation;
    let assigned = rounds.max_assigned.get();
    let policy = if mode == PrivacyMode::None {
        ensure!(
            p.noise_multiplier == 0.0 && p.epsilon_budget == 0.0,
            "privacy.noise_multiplier and privacy.epsilon_budget need a privacy.mode other than none"
        );
        ensure!(
            p.accountant == Method::default(),
            "privacy.accountant = {:?} needs a privacy.mode other than none",
            p.accountant.name()
        );
        PrivacyPolicy {
            mode,
            noise_multiplier: 0.0,
            sampling_rate: 0.0,
            budget: None,
            accountant: p.accountant,
        }
    } else {
        ensure!(
            p.noise_multiplier.is_finite() && p.noise_multiplier > 0.0 && p.noise_multiplier <= 1e3,
            "privacy.noise_multiplier must be in (0, 1000] with privacy.mode {:?}",
            p.mode
        );
        ensure!(
            p.accountant != Method::Pld || p.noise_multiplier >= pld::MIN_NOISE_MULTIPLIER,
            "privacy.noise_multiplier ({}) must be at least {} with privacy.accountant \"pld\" \
             (below it use \"rdp\")",
            p.noise_multiplier,
            pld::MIN_NOISE_MULTIPLIER
        );
        let sampling_rate = rounds
            .sampling
            .rate()
            .context("differential privacy needs rounds.sampling = \"poisson\"")?;
        ensure!(
            p.epsilon_budget.is_finite() && p.epsilon_budget > 0.0,
            "privacy.epsilon_budget must be positive with privacy.mode {:?}",
            p.mode
        );
        ensure!(
            p.delta > 0.0 && p.delta < 1e-2,
            "privacy.delta must be in (0, 0.01)"
        );
        ensure!(
            update.weighting == Weighting::Uniform,
            "update.weighting must be \"uniform\" with differential privacy: weights by reported \
             example counts change the sensitivity"
        );
        let policy = PrivacyPolicy {
            mode,
            noise_multiplier: p.noise_multiplier,
            sampling_rate,
            budget: Some(Budget {
                epsilon: p.epsilon_budget,
                delta: p.delta,
            }),
            accountant: p.accountant,
        };
        let one = policy
            .accountant
            .epsilon(policy.noise_multiplier, policy.sampling_rate, 1, p.delta)
            .with_context(|| {
                format!(
                    "privacy.accountant {:?} cannot account one round of privacy.noise_multiplier \
                     {} at sampling rate {}",
                    policy.accountant.name(),
                    policy.noise_multiplier,
                    policy.sampling_rate
                )
            })?;
        ensure!(
            one <= p.epsilon_budget,
            "privacy: a single round already costs epsilon {one:.3} ({} accountant), above \
             privacy.epsilon_budget {}: the budget cannot pay for any round",
            policy.accountant.name(),
            p.epsilon_budget
        );
        policy
    };
    if mode == PrivacyMode::Distributed {
        ensure!(
            s.enabled,
            "privacy.mode \"distributed\" needs [secure_aggregation] enabled = true: without it the \
             aggregator sees each device's under-noised update"
        );
    }
    let secagg = if s.enabled {
        ensure!(
            update.weighting == Weighting::Uniform,
            "secure aggregation sums updates unweighted: update.weighting must be \"uniform\""
        );
        ensure!(
            rounds.target_reports.get() >= 3,
            "secure aggregation needs rounds.cohort_size of at least 3"
        );
        ensure!(
            (2..=254).contains(&s.max_neighbours),
            "secure_aggregation.max_neighbours must be in [2, 254]"
        );
        ensure!(
            s.phase_timeout_s.is_finite() && s.phase_timeout_s >= 1.0 && s.phase_timeout_s < 1e5,
            "secure_aggregation.phase_timeout_s must be at least 1 second"
        );
        // Each device's noise share is z·B/√m: m = min_reports under distributed noise; a
        // local-noise device adds its whole z·B (m = 1); otherwise none.
        let (z, m) = match mode {
            PrivacyMode::Distributed => (policy.noise_multiplier, rounds.min_reports.get()),
            PrivacyMode::Local => (policy.noise_multiplier, 1),
            PrivacyMode::None | PrivacyMode::Central => (0.0, 1),
        };
        let grid = mode::secagg_grid(
            f64::from(update.clip_norm),
            u64::from(assigned),
            z,
            u64::from(m),
        );
        ensure!(
            grid.units >= mode::MIN_GRID_UNITS,
            "secure aggregation: {assigned} devices per round leave {} grid steps per clip norm; \
             fewer devices per round are needed",
            grid.units
        );
        Some(SecAggPolicy {
            max_neighbours: s.max_neighbours,
            phase_timeout: Duration::from_secs_f64(s.phase_timeout_s),
            granularity: grid.granularity,
        })
    } else {
        None
    };
    Ok((policy, secagg))
}
