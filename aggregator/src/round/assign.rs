//! Check-in: assigning a device to the open round, the first assignment fixing the round's
//! deadline, and what a device that cannot join is told. First come, the round takes devices
//! up to `max_assigned` (over-selection); with Poisson sampling it asks each device to draw,
//! takes every device that drew itself in until joins close, and abandons a round that
//! outgrows `max_assigned`.

use std::time::{Duration, Instant, SystemTime};

use fedpersona_privacy::adaptive_clip::RoundClip;
use fedpersona_privacy::secagg::Phase;

use super::Coordinator;
use crate::auth::DeviceId;
use crate::config::Sampling;

/// What a checked-in device is told.
#[derive(Debug, Clone)]
pub enum CheckIn {
    Task(Assignment),
    Later {
        retry_after: Duration,
        reason: &'static str,
    },
    /// Poisson sampling: draw for `round` with probability `rate`, and check in again with
    /// the round if drawn in; otherwise come back after `retry_after`.
    Sample {
        round: u64,
        rate: f64,
        retry_after: Duration,
    },
    /// The privacy budget cannot pay for another round: no round will open again.
    BudgetSpent(String),
}

/// A device's part in a round.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub round: u64,
    pub version: u64,
    pub adapter_sha256: [u8; 32],
    pub adapter_bytes: u64,
    pub deadline: SystemTime,
    /// Adaptive clipping: the round's clip norm and count scale (else the config's clip).
    pub clip: Option<RoundClip>,
}

impl Coordinator {
    /// Assigns the device to the open round if there is room and time; `sampled_round` is
    /// the round the device says it drew itself into (0: none). A device's claim is taken
    /// on trust: the draw protects that device's own user, so a device that claims every
    /// round only spends its own privacy.
    pub fn check_in(&self, device: &DeviceId, sampled_round: u64) -> CheckIn {
        let policy = &self.config.rounds;
        let mut st = self.lock();
        let later = |reason| CheckIn::Later {
            retry_after: policy.retry_after,
            reason,
        };
        if st.finished {
            return later("training finished");
        }
        if let Some(why) = &st.exhausted {
            return CheckIn::BudgetSpent(why.clone());
        }
        let (version, sha, len) = (
            st.published.version,
            st.published.sha256,
            st.published.bytes.len() as u64,
        );
        let Some(round) = st.round.as_mut() else {
            return later("no round open");
        };
        if round.closing {
            return later("round closing");
        }
        let deadline = match round.cohort.get(device) {
            Some(true) => {
                return CheckIn::Later {
                    retry_after: round
                        .deadline
                        .map_or(policy.retry_after, |d| {
                            d.0.saturating_duration_since(Instant::now())
                        })
                        .max(Duration::from_millis(100)),
                    reason: "already reported in this round",
                }
            }
            // Assigned before (e.g. the device restarted): the same task again.
            Some(false) => round.deadline.expect("set at the first assignment"),
            None => {
                let time_left = |d: (Instant, SystemTime)| {
                    d.0.saturating_duration_since(Instant::now()) >= policy.min_task_time
                };
                if round.deadline.is_some_and(|d| !time_left(d)) {
                    return later("too little time left in this round");
                }
                match policy.sampling {
                    Sampling::FirstCome => {
                        if round.cohort.len() >= policy.max_assigned.get() as usize {
                            return later("cohort full");
                        }
                    }
                    Sampling::Poisson { rate, .. } => {
                        if round.joins_closed {
                            return later("joins closed for this round");
                        }
                        if sampled_round != round.id {
                            return CheckIn::Sample {
                                round: round.id,
                                rate,
                                retry_after: policy.retry_after,
                            };
                        }
                        if round.cohort.len() >= policy.max_assigned.get() as usize {
                            round.oversubscribed = true;
                            round.closing = true;
                            self.round_full.notify_one();
                            return later("round over its largest cohort: abandoned");
                        }
                    }
                }
                let deadline = *round.deadline.get_or_insert_with(|| {
                    (
                        Instant::now() + policy.round_timeout,
                        SystemTime::now() + policy.round_timeout,
                    )
                });
                if round.cohort.is_empty() {
                    self.deadline_set.notify_one();
                }
                round.cohort.insert(device.clone(), false);
                deadline
            }
        };
        CheckIn::Task(Assignment {
            round: round.id,
            version,
            adapter_sha256: sha,
            adapter_bytes: len,
            deadline: deadline.1,
            clip: round.clip,
        })
    }

    /// Poisson sampling: no more devices join the open round; it closes once every device
    /// that joined has reported (or at its deadline). For an operator who will not wait for
    /// late check-ins, and for the simulation once every device has drawn. Returns whether a
    /// round was open.
    pub fn close_joins(&self) -> bool {
        let mut st = self.lock();
        let Some(r) = st.round.as_mut() else {
            return false;
        };
        r.close_joins(&self.config.rounds);
        drop(st);
        self.round_full.notify_one();
        true
    }

    /// Closes the key advertising of secure round `round` now, with the devices that have
    /// advertised (those that joined and vanished are left out); false if that round is
    /// not open or is past advertising.
    pub fn close_advertising(&self, round: u64) -> bool {
        let mut st = self.lock();
        let Some(r) = st.round.as_mut().filter(|r| r.id == round) else {
            return false;
        };
        if !r
            .secure
            .as_ref()
            .is_some_and(|s| s.phase() == Phase::Advertise)
        {
            return false;
        }
        r.closing = true;
        drop(st);
        self.round_full.notify_one();
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::CheckIn;
    use crate::round::testing::{device, report, start};
    use crate::round::{Outcome, RoundPhase};

    fn task(c: CheckIn) -> super::Assignment {
        match c {
            CheckIn::Task(t) => t,
            other => panic!("no task: {other:?}"),
        }
    }

    fn later(c: CheckIn) -> (Duration, &'static str) {
        match c {
            CheckIn::Later {
                retry_after,
                reason,
            } => (retry_after, reason),
            other => panic!("not told to come later: {other:?}"),
        }
    }

    #[test]
    fn the_first_assignment_fixes_the_deadline_and_a_repeat_gets_the_same_task() {
        let f = start(2, 1, |_| {});
        let c = &f.coordinator;
        let published = c.published();
        let first = task(c.check_in(&device(1), 0));
        assert_eq!((first.round, first.version), (1, 0));
        assert_eq!(first.adapter_sha256, published.sha256);
        assert_eq!(first.adapter_bytes, published.bytes.len() as u64);
        assert_eq!(c.view().deadline, Some(first.deadline));
        let again = task(c.check_in(&device(1), 0));
        assert_eq!((again.round, again.deadline), (1, first.deadline));
        let other = task(c.check_in(&device(2), 0));
        assert_eq!(other.deadline, first.deadline);
    }

    #[test]
    fn a_full_cohort_turns_devices_away() {
        // 2 reports with 30 % over-selection: 3 devices are assigned.
        let f = start(2, 1, |_| {});
        let c = &f.coordinator;
        for n in 1..=3 {
            task(c.check_in(&device(n), 0));
        }
        assert_eq!(
            later(c.check_in(&device(4), 0)),
            (Duration::from_secs(30), "cohort full")
        );
        // Those already assigned still get their task.
        assert_eq!(task(c.check_in(&device(3), 0)).round, 1);
    }

    #[test]
    fn a_device_that_reported_is_told_to_come_back_later() {
        let f = start(2, 1, |_| {});
        let c = &f.coordinator;
        task(c.check_in(&device(1), 0));
        assert_eq!(report(c, &device(1), 1, 1).unwrap(), 1);
        let (retry, reason) = later(c.check_in(&device(1), 0));
        assert_eq!(reason, "already reported in this round");
        assert!(retry >= Duration::from_millis(100) && retry <= Duration::from_secs(600));
    }

    #[test]
    fn no_task_while_the_round_closes_or_after_the_last_round() {
        let f = start(2, 1, |f| f.rounds.max_rounds = 1);
        let c = &f.coordinator;
        task(c.check_in(&device(1), 0));
        report(c, &device(1), 1, 1).unwrap();
        assert!(c.close_early());
        assert_eq!(later(c.check_in(&device(2), 0)).1, "round closing");
        c.close_round().unwrap();
        assert_eq!(later(c.check_in(&device(2), 0)).1, "training finished");
    }

    fn poisson(population: u64) -> impl FnOnce(&mut crate::config::file::ConfigFile) {
        move |f| {
            f.rounds.sampling = crate::config::file::SamplingFile::Poisson;
            f.privacy.population = population;
        }
    }

    #[test]
    fn a_poisson_round_asks_each_device_to_draw_and_takes_every_one_drawn_in() {
        // 2 expected of 10: q = 0.2; five draw themselves in, more than the expected cohort.
        let f = start(2, 1, poisson(10));
        let c = &f.coordinator;
        match c.check_in(&device(1), 0) {
            CheckIn::Sample { round, rate, .. } => assert_eq!((round, rate), (1, 0.2)),
            other => panic!("not asked to draw: {other:?}"),
        }
        // A claim for another round is a request to draw for this one.
        assert!(matches!(c.check_in(&device(1), 7), CheckIn::Sample { .. }));
        let first = task(c.check_in(&device(1), 1));
        for n in 2..=5 {
            assert_eq!(task(c.check_in(&device(n), 1)).deadline, first.deadline);
        }
        assert_eq!(c.view().joined, 5);
        // Reports do not close the round while devices may still join.
        for n in 1..=2 {
            report(c, &device(n), 1, n as u8).unwrap();
        }
        assert_eq!(c.view().phase, RoundPhase::Open);
        assert!(c.close_joins());
        assert_eq!(
            later(c.check_in(&device(6), 1)).1,
            "joins closed for this round"
        );
        assert_eq!(c.view().phase, RoundPhase::Open);
        for n in 3..=5 {
            report(c, &device(n), 1, n as u8).unwrap();
        }
        // Every device that joined has reported: the round closes, and commits all five.
        assert_eq!(c.view().phase, RoundPhase::Closing);
        assert_eq!(
            c.close_round().unwrap(),
            Outcome::Committed {
                round: 1,
                version: 1,
                reports: 5
            }
        );
    }

    #[test]
    fn a_round_that_outgrows_its_largest_cohort_is_abandoned() {
        // 2 expected of 1000 (q = 0.002): the round is built for a few more, not for all.
        let f = start(2, 1, poisson(1000));
        let c = &f.coordinator;
        let cap = c.config().rounds.max_assigned.get();
        assert!((3..40).contains(&cap), "{cap}");
        for n in 1..=cap {
            task(c.check_in(&device(n), 1));
            report(c, &device(n), 1, n as u8).unwrap();
        }
        assert_eq!(c.view().phase, RoundPhase::Open);
        let (_, why) = later(c.check_in(&device(cap + 1), 1));
        assert_eq!(why, "round over its largest cohort: abandoned");
        assert_eq!(c.view().phase, RoundPhase::Closing);
        assert_eq!(
            c.close_round().unwrap(),
            Outcome::Abandoned {
                round: 1,
                reports: u64::from(cap)
            }
        );
    }

    #[test]
    fn a_round_nobody_joins_closes_with_its_joins() {
        let f = start(2, 1, poisson(10));
        let c = &f.coordinator;
        assert!(matches!(c.check_in(&device(1), 0), CheckIn::Sample { .. }));
        c.close_joins();
        assert_eq!(c.view().phase, RoundPhase::Closing);
        assert_eq!(
            c.close_round().unwrap(),
            Outcome::Abandoned {
                round: 1,
                reports: 0
            }
        );
    }
}
