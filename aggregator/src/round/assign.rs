//! Check-in: assigning a device to the open round (over-selection up to `max_assigned`), the
//! first assignment fixing the round's deadline, and what a device that cannot join is told.

use std::time::{Duration, Instant, SystemTime};

use super::Coordinator;
use crate::auth::DeviceId;

/// What a checked-in device is told.
#[derive(Debug, Clone)]
pub enum CheckIn {
    Task(Assignment),
    Later {
        retry_after: Duration,
        reason: &'static str,
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
}

impl Coordinator {
    /// Assigns the device to the open round if there is room and time.
    pub fn check_in(&self, device: &DeviceId) -> CheckIn {
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
                if round.cohort.len() >= policy.max_assigned.get() as usize {
                    return later("cohort full");
                }
                let deadline = *round.deadline.get_or_insert_with(|| {
                    (
                        Instant::now() + policy.round_timeout,
                        SystemTime::now() + policy.round_timeout,
                    )
                });
                if deadline.0.saturating_duration_since(Instant::now()) < policy.min_task_time {
                    return later("too little time left in this round");
                }
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
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::CheckIn;
    use crate::round::testing::{device, report, start};

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
        let first = task(c.check_in(&device(1)));
        assert_eq!((first.round, first.version), (1, 0));
        assert_eq!(first.adapter_sha256, published.sha256);
        assert_eq!(first.adapter_bytes, published.bytes.len() as u64);
        assert_eq!(c.view().deadline, Some(first.deadline));
        let again = task(c.check_in(&device(1)));
        assert_eq!((again.round, again.deadline), (1, first.deadline));
        let other = task(c.check_in(&device(2)));
        assert_eq!(other.deadline, first.deadline);
    }

    #[test]
    fn a_full_cohort_turns_devices_away() {
        // 2 reports with 30 % over-selection: 3 devices are assigned.
        let f = start(2, 1, |_| {});
        let c = &f.coordinator;
        for n in 1..=3 {
            task(c.check_in(&device(n)));
        }
        assert_eq!(
            later(c.check_in(&device(4))),
            (Duration::from_secs(30), "cohort full")
        );
        // Those already assigned still get their task.
        assert_eq!(task(c.check_in(&device(3))).round, 1);
    }

    #[test]
    fn a_device_that_reported_is_told_to_come_back_later() {
        let f = start(2, 1, |_| {});
        let c = &f.coordinator;
        task(c.check_in(&device(1)));
        assert_eq!(report(c, &device(1), 1, 1).unwrap(), 1);
        let (retry, reason) = later(c.check_in(&device(1)));
        assert_eq!(reason, "already reported in this round");
        assert!(retry >= Duration::from_millis(100) && retry <= Duration::from_secs(600));
    }

    #[test]
    fn no_task_while_the_round_closes_or_after_the_last_round() {
        let f = start(2, 1, |f| f.rounds.max_rounds = 1);
        let c = &f.coordinator;
        task(c.check_in(&device(1)));
        report(c, &device(1), 1, 1).unwrap();
        assert!(c.close_early());
        assert_eq!(later(c.check_in(&device(2))).1, "round closing");
        c.close_round().unwrap();
        assert_eq!(later(c.check_in(&device(2))).1, "training finished");
    }
}
