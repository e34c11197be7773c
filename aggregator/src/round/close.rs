//! Closing: the driver that closes a round when it is full or past its deadline (and moves a
//! secure round's phases on), the commit or abandonment, the release and its measured
//! signal-to-noise ratio, and the next opening.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use fedpersona_privacy::secagg::{self, Phase};
use fedpersona_privacy::snr;
use fedpersona_privacy::{adaptive_clip, mode};

use super::budget::open_round;
use super::{round_clip, Coordinator, OpenRound};
use crate::aggregate::RunningSum;
use crate::auth::now_ms;
use crate::config::PrivacyMode;
use crate::secure::Advance;

/// How a closed round ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Committed {
        round: u64,
        version: u64,
        reports: u64,
    },
    Abandoned {
        round: u64,
        reports: u64,
    },
}

/// What a committed round released, as norms (never its values): the norm of the noised
/// mean, the noise the config puts on it, and the SNR estimated from the two
/// ([`snr::Measured`]: post-processing of the release, so it costs no privacy).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Release {
    pub round: u64,
    pub norms: snr::Measured,
}

impl Coordinator {
    /// The last committed round's release (None before the first commit of this process).
    pub fn last_release(&self) -> Option<Release> {
        self.lock().last_release
    }

    /// Closes the open round if it is due (full, closing or past its deadline), or moves its
    /// secure aggregation on.
    fn close_if_due(&self) -> anyhow::Result<Option<Outcome>> {
        let due = {
            let mut st = self.lock();
            if let Some(r) = st.round.as_mut() {
                if r.joins_due().is_some_and(|at| Instant::now() >= at) {
                    r.close_joins(&self.config.rounds);
                }
            }
            match st.round.as_mut() {
                Some(r) if r.secure.is_some() => None,
                Some(r) if r.closing || r.deadline.is_some_and(|d| Instant::now() >= d.0) => {
                    r.closing = true;
                    Some(true)
                }
                _ => Some(false),
            }
        };
        match due {
            None => self.advance_secure(),
            Some(true) => self.close_round().map(Some),
            Some(false) => Ok(None),
        }
    }

    /// Moves the open round's secure aggregation on if its phase is due: closes the phase,
    /// or unmasks the sum and closes the round, or abandons it when too few devices are left.
    fn advance_secure(&self) -> anyhow::Result<Option<Outcome>> {
        let advance = {
            let mut st = self.lock();
            let Some(r) = st.round.as_mut() else {
                return Ok(None);
            };
            let deadline_passed = r.deadline.is_some_and(|d| Instant::now() >= d.0);
            let Some(secure) = r.secure.as_mut() else {
                return Ok(None);
            };
            let due = match secure.phase() {
                Phase::Advertise => r.closing || deadline_passed,
                Phase::Aborted => true,
                _ => secure.phase_due().is_some_and(|d| Instant::now() >= d),
            };
            if !due {
                return Ok(None);
            }
            r.closing = true;
            secure.advance()
        };
        match advance {
            Advance::Next => Ok(None),
            Advance::Aborted(why) => {
                tracing::warn!(reason = %why, "secure aggregation aborted; abandoning the round");
                self.close_round().map(Some)
            }
            Advance::Finish(server) => {
                match server.finish() {
                    Ok(agg) => {
                        let g = self
                            .config
                            .secure_aggregation
                            .expect("secure rounds have a policy")
                            .granularity;
                        let flat: Vec<f64> = secagg::to_signed(&agg.sum)
                            .into_iter()
                            .map(|v| f64::from(v) * g)
                            .collect();
                        let mut st = self.lock();
                        let r = st.round.as_mut().expect("the round being finished");
                        r.sum
                            .add_sum(&flat, agg.contributors.len() as u64)
                            .map_err(|e| anyhow::anyhow!("adding the secure sum: {e}"))?;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "unmasking failed; abandoning the round");
                        let mut st = self.lock();
                        if let Some(s) = st.round.as_mut().and_then(|r| r.secure.as_mut()) {
                            s.abort(e.to_string());
                        }
                    }
                }
                self.close_round().map(Some)
            }
        }
    }

    /// Closes the open round now, as if its deadline had passed: it commits with at least
    /// `min_reports` reports, else it is abandoned. For an operator who will not wait, and for
    /// the simulation once every live device has answered. Returns whether a round was open.
    pub fn close_early(&self) -> bool {
        let mut st = self.lock();
        match st.round.as_mut() {
            Some(r) => {
                r.closing = true;
                drop(st);
                self.round_full.notify_one();
                true
            }
            None => false,
        }
    }

    /// Runs rounds until `shutdown` resolves: closes each round when it is full or its
    /// deadline passes.
    pub async fn drive(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let deadline = {
                let st = self.lock();
                let secure = st.round.as_ref().and_then(|r| r.secure.as_ref());
                let wake = match &st.round {
                    None => None,
                    Some(r) => match secure.map(|s| (s.phase(), s.phase_due())) {
                        Some((Phase::Advertise, _)) | None if r.closing => Some(Instant::now()),
                        Some((Phase::Advertise, _)) | None => {
                            let deadline = r.deadline.map(|d| d.0);
                            match (deadline, r.joins_due()) {
                                (Some(d), Some(j)) => Some(d.min(j)),
                                (d, j) => d.or(j),
                            }
                        }
                        Some((Phase::Aborted, _)) => Some(Instant::now()),
                        Some((_, due)) => due,
                    },
                };
                wake.map(tokio::time::Instant::from_std)
            };
            let wake = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut shutdown => return,
                _ = self.round_full.notified() => {}
                _ = self.deadline_set.notified() => continue,
                _ = wake => {}
            }
            let this = self.clone();
            match tokio::task::spawn_blocking(move || this.close_if_due()).await {
                Ok(Ok(Some(outcome))) => tracing::info!(?outcome, "round closed"),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "closing the round failed; stopping rounds");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "closing the round panicked; stopping rounds");
                    return;
                }
            }
        }
    }

    /// Closes the round (already marked closing): commit with enough reports, else abandon;
    /// then opens the next round unless the configured number is reached.
    pub fn close_round(&self) -> anyhow::Result<Outcome> {
        let (id, sum, opened, meta, base_version, oversubscribed, clip) = {
            let st = self.lock();
            let r = st
                .round
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("no round to close"))?;
            (
                r.id,
                r.sum.clone(),
                r.opened,
                st.meta.clone(),
                st.published.version,
                r.oversubscribed,
                r.clip,
            )
        };
        let reports = sum.count();
        let min = u64::from(self.config.rounds.min_reports.get());
        let mut committed = None;
        let outcome = if oversubscribed {
            self.store.abandon_round(
                id,
                &format!(
                    "more devices drew themselves in than the {} the round is built for",
                    self.config.rounds.max_assigned
                ),
                now_ms(),
            )?;
            Outcome::Abandoned { round: id, reports }
        } else if reports >= min {
            let bound = clip.map_or(self.spec.clip_norm(), |c| c.extended_norm);
            let mut mean = self.release(&sum, bound)?;
            let mut next = meta;
            if let (Some(c), Some(a)) = (clip, self.config.update.adaptive) {
                let count = mean
                    .remove(adaptive_clip::COUNT_TENSOR)
                    .context("the released mean lacks the unclipped count")?;
                let unclipped =
                    adaptive_clip::unclipped_share(f64::from(count.data[0]), c.count_scale);
                let clip_norm = adaptive_clip::next_clip_norm(
                    c.clip_norm,
                    unclipped,
                    a.target_quantile,
                    a.learning_rate,
                    (a.min, a.max),
                );
                tracing::info!(
                    round = id,
                    clip_norm = c.clip_norm,
                    unclipped_share = unclipped,
                    next_clip_norm = clip_norm,
                    "adaptive clipping stepped"
                );
                next.clip_norm = Some(clip_norm);
            }
            // The noise scales with the round's bound; the config's figure is at its own.
            let noise = match clip {
                Some(c) => {
                    self.config.release_noise_norm(reports) * c.extended_norm
                        / f64::from(self.config.update.clip_norm)
                }
                None => self.config.release_noise_norm(reports),
            };
            let norms = snr::Measured::of(mean.l2_norm(), noise);
            tracing::info!(
                round = id,
                update_norm = norms.update_norm,
                noise_norm_expected = norms.noise_norm_expected,
                snr = norms.snr,
                "round released"
            );
            self.metrics.round_released(&norms);
            next.apply(self.config.meta, &mean)?;
            let version = base_version + 1;
            let published = self.versions.save(version, &next)?;
            self.store.commit_round(
                id,
                version,
                &published.sha256,
                &published.state_sha256,
                now_ms(),
            )?;
            committed = Some((next, published, Release { round: id, norms }));
            Outcome::Committed {
                round: id,
                version,
                reports,
            }
        } else {
            self.store.abandon_round(
                id,
                &format!("{reports} reports by the deadline, {min} needed"),
                now_ms(),
            )?;
            Outcome::Abandoned { round: id, reports }
        };
        self.metrics.round_closed(
            matches!(outcome, Outcome::Committed { .. }),
            opened.elapsed(),
        );
        // The commit and the next round's opening change the state in one step, so that
        // no one sees the new version with the old round still closing.
        let mut st = self.lock();
        if let Some((next, published, release)) = committed {
            st.meta = next;
            st.published = published;
            st.last_release = Some(release);
            st.rounds_committed += 1;
        }
        let finished = self
            .config
            .rounds
            .max_rounds
            .is_some_and(|m| st.rounds_committed >= m);
        st.round = None;
        if finished {
            st.finished = true;
        } else {
            let version = st.published.version;
            match open_round(
                &self.config,
                &self.store,
                &mut st.accountant,
                id + 1,
                version,
            )? {
                Ok(()) => {
                    let clip = round_clip(&self.config, &st.meta);
                    st.round = Some(OpenRound::new(
                        id + 1,
                        self.spec.clone(),
                        &self.config,
                        clip,
                    ))
                }
                Err(why) => {
                    tracing::warn!(reason = %why, "no further rounds: the privacy budget is spent");
                    st.exhausted = Some(why);
                }
            }
        }
        self.metrics.set_round(id + 1, st.published.version);
        if let Some(b) = self.config.privacy.budget {
            self.metrics
                .set_epsilon_spent(st.accountant.epsilon(b.delta)?);
        }
        drop(st);
        if let Outcome::Committed { .. } = outcome {
            self.prune();
        }
        Ok(outcome)
    }

    /// What the round publishes: the mean of its reports, with the central noise where the
    /// aggregator adds it. With DP the divisor is the target cohort size, not the count.
    fn release(
        &self,
        sum: &RunningSum,
        bound: f64,
    ) -> anyhow::Result<fedpersona_privacy::AdapterTensors> {
        let p = &self.config.privacy;
        let c = bound;
        let denominator =
            mode::release_denominator(u64::from(self.config.rounds.target_reports.get()));
        let d = self.spec.num_values();
        let k = mode::grid_exponent(c, d);
        Ok(match p.mode {
            PrivacyMode::None | PrivacyMode::Local => sum.mean().expect("at least one report"),
            PrivacyMode::Distributed => sum.noised_mean(0.0, k, denominator)?,
            PrivacyMode::Central => sum.noised_mean(
                mode::central_sigma(p.noise_multiplier, c, k, d),
                k,
                denominator,
            )?,
        })
    }

    fn prune(&self) {
        match self.store.versions_to_prune(self.config.keep_versions) {
            Ok(old) => {
                for v in old {
                    if let Err(e) = self.versions.remove(v) {
                        tracing::warn!(version = v, error = %e, "could not remove an old adapter version");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not list old adapter versions"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Outcome;
    use crate::round::testing::{device, report, start};
    use crate::round::{CheckIn, RoundPhase};
    use crate::store::RoundState;

    #[test]
    fn a_round_with_enough_reports_commits_once_and_the_next_opens() {
        let f = start(3, 1, |_| {});
        let c = &f.coordinator;
        c.check_in(&device(1), 0);
        report(c, &device(1), 1, 1).unwrap();
        let theta = c.theta();
        assert!(c.close_early());
        assert_eq!(c.view().phase, RoundPhase::Closing);
        assert_eq!(
            c.close_round().unwrap(),
            Outcome::Committed {
                round: 1,
                version: 1,
                reports: 1
            }
        );
        let v = c.view();
        assert_eq!(
            (v.round, v.phase, v.version, v.rounds_committed),
            (2, RoundPhase::Open, 1, 1)
        );
        assert_eq!(c.published().version, 1);
        assert_ne!(c.theta(), theta);
        let row = c.store().round(1).unwrap().unwrap();
        assert_eq!((row.state, row.reports), (RoundState::Committed, 1));

        // Closing again closes round 2, empty: round 1 is not committed a second time.
        assert_eq!(
            c.close_round().unwrap(),
            Outcome::Abandoned {
                round: 2,
                reports: 0
            }
        );
        let v = c.view();
        assert_eq!((v.round, v.version, v.rounds_committed), (3, 1, 1));
        assert_eq!(c.store().summary().unwrap().latest_version, Some(1));
        let row = c.store().round(2).unwrap().unwrap();
        assert_eq!(row.state, RoundState::Abandoned);
        assert_eq!(
            row.reason.as_deref(),
            Some("0 reports by the deadline, 1 needed")
        );
    }

    #[test]
    fn too_few_reports_abandon_the_round() {
        let f = start(3, 2, |_| {});
        let c = &f.coordinator;
        c.check_in(&device(1), 0);
        report(c, &device(1), 1, 1).unwrap();
        let theta = c.theta();
        assert_eq!(
            c.close_round().unwrap(),
            Outcome::Abandoned {
                round: 1,
                reports: 1
            }
        );
        assert_eq!((c.view().round, c.view().version), (2, 0));
        assert_eq!(c.theta(), theta);
    }

    #[test]
    fn the_last_round_finishes_training() {
        let f = start(1, 1, |f| f.rounds.max_rounds = 1);
        let c = &f.coordinator;
        c.check_in(&device(1), 0);
        report(c, &device(1), 1, 1).unwrap();
        assert_eq!(c.view().phase, RoundPhase::Closing);
        assert!(matches!(
            c.close_round().unwrap(),
            Outcome::Committed { .. }
        ));
        assert_eq!(c.view().phase, RoundPhase::Finished);
        assert!(!c.close_early());
        assert_eq!(
            c.close_round().unwrap_err().to_string(),
            "no round to close"
        );
    }

    #[tokio::test]
    async fn the_driver_closes_a_round_once_it_is_full() {
        let f = start(1, 1, |_| {});
        let c = f.coordinator.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let driver = tokio::spawn(c.clone().drive(async {
            let _ = stopped.await;
        }));
        c.check_in(&device(1), 0);
        report(&c, &device(1), 1, 1).unwrap();
        let v = tokio::time::timeout(
            Duration::from_secs(30),
            c.wait_for(|v| v.rounds_committed == 1),
        )
        .await
        .expect("the driver commits the full round");
        assert_eq!((v.round, v.version, v.phase), (2, 1, RoundPhase::Open));
        stop.send(()).unwrap();
        driver.await.unwrap();
    }

    #[tokio::test]
    async fn the_driver_closes_a_poisson_rounds_joins_after_its_window() {
        let f = start(2, 1, |f| {
            f.rounds.sampling = crate::config::file::SamplingFile::Poisson;
            f.rounds.retry_after_s = 0.05;
            f.rounds.join_window_s = Some(0.1);
            f.privacy.population = 10;
        });
        let c = f.coordinator.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let driver = tokio::spawn(c.clone().drive(async {
            let _ = stopped.await;
        }));
        assert!(matches!(c.check_in(&device(1), 1), CheckIn::Task(_)));
        report(&c, &device(1), 1, 1).unwrap();
        // The one device that joined has reported, but others may still join: the round
        // stays open until the window ends, then commits without anyone closing it.
        assert_eq!(c.view().phase, RoundPhase::Open);
        let v = tokio::time::timeout(
            Duration::from_secs(30),
            c.wait_for(|v| v.rounds_committed == 1),
        )
        .await
        .expect("the driver closes joins and commits");
        assert_eq!((v.round, v.version), (2, 1));
        // The next round's window closes by itself too: nobody joins, it is abandoned.
        tokio::time::timeout(Duration::from_secs(30), c.wait_for(|v| v.round >= 3))
            .await
            .expect("the empty round closes at the end of its window");
        assert_eq!(c.store().summary().unwrap().rounds_committed, 1);
        stop.send(()).unwrap();
        driver.await.unwrap();
    }

    #[test]
    fn adaptive_clipping_steps_the_clip_from_the_count_and_saves_it_with_the_version() {
        use fedpersona_privacy::adaptive_clip::COUNT_TENSOR;
        use fedpersona_privacy::AdapterTensors;

        use crate::round::testing::{encode, header};

        let f = start(2, 2, |f| {
            f.update.adaptive_clipping = Some(crate::config::file::AdaptiveClippingFile::default());
        });
        let c = &f.coordinator;
        // Without noise κ = C and C' = C·√1.25: C starts at the largest clip whose extended
        // bound is update.clip_norm = 1.
        let task = |n| match c.check_in(&device(n), 0) {
            CheckIn::Task(t) => t.clip.expect("an adaptive round"),
            other => panic!("no task: {other:?}"),
        };
        let clip = task(1);
        assert_eq!(task(2), clip);
        let start = 1.25f64.sqrt().recip();
        assert!((clip.clip_norm - start).abs() < 1e-12);
        assert_eq!(clip.count_scale, clip.clip_norm);
        assert!((clip.extended_norm - 1.0).abs() < 1e-12);
        let upload = |n: u32, value: f32, count: f32| {
            let mut t = AdapterTensors::default();
            for (name, shape) in c.spec().shapes() {
                let len = shape.iter().product();
                let v = if name == COUNT_TENSOR { count } else { value };
                t.insert(name.clone(), shape.clone(), vec![v; len]);
            }
            let bytes = encode(&t);
            let ticket = c.begin_upload(device(n), header(1, n as u8, &bytes))?;
            c.finish_upload(ticket, &bytes)
        };
        let unclipped = (clip.count_scale / 2.0) as f32;
        // Over the extended bound: refused, and nothing changed.
        let (_, why) = crate::round::testing::refusal(upload(1, 1.0, unclipped));
        assert_eq!(why, "norm");
        // Both devices left alone by clipping: b̄ = 1 > γ = 0.5, so C shrinks by e^(−0.2·0.5).
        upload(1, 1e-3, unclipped).unwrap();
        upload(2, 1e-3, unclipped).unwrap();
        assert!(matches!(
            c.close_round().unwrap(),
            Outcome::Committed { .. }
        ));
        let next = c.theta().clip_norm.expect("saved with the version");
        assert!((next - start * (-0.1f64).exp()).abs() < 1e-9, "{next}");
        assert!(c.theta().theta.get(COUNT_TENSOR).is_none());
        assert!((task(3).clip_norm - next).abs() < 1e-12);
        // A restart reads it back from the committed version.
        let cfg = c.config();
        let versions =
            crate::versions::Versions::new(&cfg.state_dir, cfg.model.clone(), cfg.adapter.clone());
        let published = c.published();
        let (saved, _) = versions
            .load(
                published.version,
                &published.sha256,
                Some(&published.state_sha256),
            )
            .unwrap();
        assert_eq!(saved.clip_norm, Some(next));
    }
}
