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
