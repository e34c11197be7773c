//! The round state machine: assign checked-in devices to the open round (with over-selection),
//! accept validated uploads into a running sum until the round has its reports or its deadline
//! passes, then commit (server step, new version, journal) or abandon, and open the next round.
//!
//! Lifecycle of round r: opened (journal row `open`, no deadline) → the first assignment fixes
//! the deadline → uploads → closing (no more uploads) → committed or abandoned → round r+1
//! opens. Uploads of a round that was open at a crash are discarded at restart (the round is
//! abandoned; its devices take part in the next one), so no update is ever counted twice.
//!
//! This module holds the [`Coordinator`], its locked state and the [`RoundView`] it publishes;
//! each phase lives in its own file: `assign` (check-in), `upload`, `secure` (SecAgg+ steps),
//! `close` (driver, commit, next round) and `budget` (privacy ledger and budget).

mod assign;
mod budget;
mod close;
mod secure;
#[cfg(test)]
mod testing;
mod upload;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use fedpersona_model::lora::LoraAdapter;
use fedpersona_privacy::accountant::Accountant;
use fedpersona_privacy::adaptive_clip::{self, RoundClip};
use fedpersona_privacy::secagg::Phase;
use tokio::sync::{watch, Notify};

use crate::aggregate::{RunningSum, UpdateSpec};
use crate::auth::{now_ms, DeviceId};
use crate::config::{Config, RoundPolicy, Sampling};
use crate::meta::MetaState;
use crate::metrics::Metrics;
use crate::secure::SecureRound;
use crate::store::Store;
use crate::versions::{Published, Versions};

pub use assign::{Assignment, CheckIn};
pub use budget::{ledger_accountant, PrivacySpent};
pub use close::{Outcome, Release};
pub use secure::SecureStep;
pub use upload::{UploadHeader, UploadTicket};

/// Where the federation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundPhase {
    Open,
    Closing,
    /// No round open now; one may open later.
    Idle,
    /// The configured number of rounds is done.
    Finished,
    /// The privacy budget is spent: no round will open again.
    BudgetExhausted,
}

impl RoundPhase {
    /// The label people read (`aggregator status`, `RoundStatus.state`).
    pub fn as_str(self) -> &'static str {
        match self {
            RoundPhase::Open => "open",
            RoundPhase::Closing => "closing",
            RoundPhase::Idle => "idle",
            RoundPhase::Finished => "finished",
            RoundPhase::BudgetExhausted => "budget_exhausted",
        }
    }
}

/// The public view of the current round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundView {
    pub round: u64,
    pub phase: RoundPhase,
    pub version: u64,
    pub reports: u32,
    pub target_reports: u32,
    /// Devices assigned to the round.
    pub joined: u32,
    /// Key adverts of a secure round (0 otherwise).
    pub adverts: u32,
    pub deadline: Option<SystemTime>,
    pub rounds_committed: u64,
}

#[derive(Debug)]
struct OpenRound {
    id: u64,
    opened: Instant,
    /// Set by the first assignment.
    deadline: Option<(Instant, SystemTime)>,
    /// Assigned devices and whether they reported.
    cohort: HashMap<DeviceId, bool>,
    sum: RunningSum,
    closing: bool,
    /// Poisson sampling: no device joins any more ([`Coordinator::close_joins`]).
    joins_closed: bool,
    /// Poisson sampling: when joins close by themselves, the join window after opening.
    joins_close_at: Option<Instant>,
    /// Poisson sampling: more devices drew themselves in than the round is built for; it is
    /// abandoned.
    oversubscribed: bool,
    /// Secure aggregation of this round's updates, when the config enables it.
    secure: Option<SecureRound>,
    /// Adaptive clipping: this round's clip norm, count scale and extended bound.
    clip: Option<RoundClip>,
}

#[derive(Debug)]
struct State {
    meta: MetaState,
    published: Published,
    round: Option<OpenRound>,
    rounds_committed: u64,
    finished: bool,
    /// The privacy ledger, composed (empty without DP).
    accountant: Accountant,
    /// Set when the next round would exceed the privacy budget.
    exhausted: Option<String>,
    /// The last committed round's release norms.
    last_release: Option<close::Release>,
}

/// The aggregator's round logic over its journal and adapter versions.
#[derive(Debug)]
pub struct Coordinator {
    config: Arc<Config>,
    store: Arc<Store>,
    versions: Versions,
    spec: UpdateSpec,
    metrics: Metrics,
    state: Mutex<State>,
    /// Woken when the open round has its target reports.
    round_full: Notify,
    /// Woken whenever a round's deadline is first set.
    deadline_set: Notify,
    /// The current [`RoundView`], republished whenever the state changes it: tests and the
    /// simulation await events on it instead of polling.
    views: watch::Sender<RoundView>,
}

/// The state, locked; on release the view is republished if the holder changed it.
struct Locked<'a> {
    guard: std::sync::MutexGuard<'a, State>,
    coordinator: &'a Coordinator,
}

impl std::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.guard
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.guard
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let view = view_of(
            &self.guard,
            self.coordinator.config.rounds.target_reports.get(),
        );
        self.coordinator.views.send_if_modified(|v| {
            let changed = *v != view;
            *v = view;
            changed
        });
    }
}

fn view_of(st: &State, target: u32) -> RoundView {
    match &st.round {
        Some(r) => RoundView {
            round: r.id,
            phase: if r.closing {
                RoundPhase::Closing
            } else {
                RoundPhase::Open
            },
            version: st.published.version,
            reports: r.sum.count() as u32,
            target_reports: target,
            joined: r.cohort.len() as u32,
            adverts: r.secure.as_ref().map_or(0, |s| s.adverts() as u32),
            deadline: r.deadline.map(|d| d.1),
            rounds_committed: st.rounds_committed,
        },
        None => RoundView {
            round: 0,
            phase: if st.finished {
                RoundPhase::Finished
            } else if st.exhausted.is_some() {
                RoundPhase::BudgetExhausted
            } else {
                RoundPhase::Idle
            },
            version: st.published.version,
            reports: 0,
            target_reports: target,
            joined: 0,
            adverts: 0,
            deadline: None,
            rounds_committed: st.rounds_committed,
        },
    }
}

impl Coordinator {
    /// Recovers from the journal (abandoning a round left open by a crash), loads the latest
    /// committed adapter (or creates version 0) and opens the next round.
    pub fn start(config: Arc<Config>, store: Arc<Store>, metrics: Metrics) -> anyhow::Result<Self> {
        use anyhow::Context;
        let versions = Versions::new(
            &config.state_dir,
            config.model.clone(),
            config.adapter.clone(),
        );
        // The latest version is loaded and checked before recovery writes anything: a start
        // refused for a changed file leaves the journal as it was.
        let loaded = match store.latest()? {
            Some(v) => Some(
                versions
                    .load(v.version, &v.sha256, v.state_sha256.as_deref())
                    .with_context(|| format!("loading committed adapter version {}", v.version))?,
            ),
            None => None,
        };
        let rec = store.recover(now_ms())?;
        if !rec.abandoned.is_empty() {
            tracing::warn!(rounds = ?rec.abandoned, "abandoned rounds left open by the previous run; their uploads are discarded");
        }
        let (meta, published) = match loaded {
            Some(loaded) => loaded,
            None => {
                let meta = versions.initial()?;
                let published = versions.save(0, &meta)?;
                store.record_initial_version(
                    &published.sha256,
                    &published.state_sha256,
                    now_ms(),
                )?;
                (meta, published)
            }
        };
        let mut shapes = LoraAdapter::trained_shapes(&config.model, &config.adapter);
        if config.update.adaptive.is_some() {
            shapes.push((adaptive_clip::COUNT_TENSOR.to_string(), vec![1]));
        }
        let values = shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let spec = UpdateSpec::new(shapes, upload::norm_bound(&config, values));
        let finished = config
            .rounds
            .max_rounds
            .is_some_and(|m| rec.rounds_committed >= m);
        let mut accountant = ledger_accountant(&store, config.privacy.accountant)?;
        let (round, exhausted) = if finished {
            (None, None)
        } else {
            match budget::open_round(
                &config,
                &store,
                &mut accountant,
                rec.next_round,
                published.version,
            )? {
                Ok(()) => (
                    Some(OpenRound::new(
                        rec.next_round,
                        spec.clone(),
                        &config,
                        round_clip(&config, &meta),
                    )),
                    None,
                ),
                Err(why) => (None, Some(why)),
            }
        };
        tracing::info!(
            version = published.version,
            round = rec.next_round,
            committed = rec.rounds_committed,
            "aggregator state recovered"
        );
        metrics.set_round(rec.next_round, published.version);
        if let Some(b) = config.privacy.budget {
            metrics.set_epsilon_spent(accountant.epsilon(b.delta)?);
        }
        let state = State {
            meta,
            published,
            round,
            rounds_committed: rec.rounds_committed,
            finished,
            accountant,
            exhausted,
            last_release: None,
        };
        let (views, _) = watch::channel(view_of(&state, config.rounds.target_reports.get()));
        Ok(Coordinator {
            config,
            store,
            versions,
            spec,
            metrics,
            views,
            state: Mutex::new(state),
            round_full: Notify::new(),
            deadline_set: Notify::new(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn spec(&self) -> &UpdateSpec {
        &self.spec
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn lock(&self) -> Locked<'_> {
        Locked {
            guard: self.state.lock().unwrap_or_else(|e| e.into_inner()),
            coordinator: self,
        }
    }

    /// The currently published global adapter.
    pub fn published(&self) -> Published {
        self.lock().published.clone()
    }

    /// θ as the server holds it now.
    pub fn theta(&self) -> MetaState {
        self.lock().meta.clone()
    }

    pub fn view(&self) -> RoundView {
        self.views.borrow().clone()
    }

    /// The view as it changes: every change of round, phase, reports or version is sent.
    pub fn watch(&self) -> watch::Receiver<RoundView> {
        self.views.subscribe()
    }

    /// Resolves once the view satisfies `until` (at once if it already does).
    pub async fn wait_for(&self, until: impl FnMut(&RoundView) -> bool) -> RoundView {
        let mut rx = self.watch();
        let view = match rx.wait_for(until).await {
            Ok(v) => v.clone(),
            Err(_) => unreachable!("the sender lives as long as the coordinator"),
        };
        view
    }

    fn check_round(
        &self,
        st: &State,
        device: &DeviceId,
        round_id: u64,
    ) -> Result<(), (&'static str, String)> {
        let Some(round) = st.round.as_ref().filter(|r| r.id == round_id) else {
            let current = st.round.as_ref().map_or(0, |r| r.id);
            return Err((
                "wrong_round",
                format!("round {round_id} is not open (current round: {current})"),
            ));
        };
        if round.closing {
            return Err(("round_closed", format!("round {round_id} is closing")));
        }
        if let Some((at, _)) = round.deadline {
            if Instant::now() > at {
                return Err(("late", format!("round {round_id} deadline has passed")));
            }
        }
        match round.cohort.get(device) {
            None => Err((
                "not_in_cohort",
                format!("device is not in the cohort of round {round_id}"),
            )),
            Some(true) => Err((
                "already_reported",
                format!("device already reported in round {round_id}"),
            )),
            Some(false) => Ok(()),
        }
    }
}

impl OpenRound {
    fn new(id: u64, spec: UpdateSpec, config: &Config, clip: Option<RoundClip>) -> Self {
        let secure = config
            .secure_aggregation
            .map(|p| SecureRound::new(id, spec.num_values(), p));
        let opened = Instant::now();
        let joins_close_at = match config.rounds.sampling {
            Sampling::FirstCome => None,
            Sampling::Poisson { join_window, .. } => Some(opened + join_window),
        };
        OpenRound {
            id,
            opened,
            deadline: None,
            cohort: HashMap::new(),
            sum: RunningSum::new(spec),
            closing: false,
            joins_closed: false,
            joins_close_at,
            oversubscribed: false,
            secure,
            clip,
        }
    }

    /// The L2 bound of this round's uploads (before noise).
    fn upload_bound(&self, spec: &UpdateSpec) -> f64 {
        self.clip.map_or(spec.clip_norm(), |c| c.extended_norm)
    }

    /// Closes joins; the round closes too if that leaves it full while still advertising.
    fn close_joins(&mut self, policy: &RoundPolicy) {
        self.joins_closed = true;
        let advertising = self
            .secure
            .as_ref()
            .is_none_or(|s| s.phase() == Phase::Advertise);
        if advertising && self.full(policy) {
            self.closing = true;
        }
    }

    /// When joins close by themselves, if they are still open.
    fn joins_due(&self) -> Option<Instant> {
        self.joins_close_at.filter(|_| !self.joins_closed)
    }

    /// Whether the round has everything it waits for: first come, its target of reports
    /// (of key adverts under secure aggregation); Poisson, once joins are closed, those of
    /// every device that joined.
    fn full(&self, policy: &RoundPolicy) -> bool {
        let have = match &self.secure {
            Some(s) => s.adverts(),
            None => self.sum.count() as usize,
        };
        match policy.sampling {
            Sampling::FirstCome => have >= policy.target_reports.get() as usize,
            Sampling::Poisson { .. } => self.joins_closed && have >= self.cohort.len(),
        }
    }
}

/// Milliseconds since the epoch of a wall-clock time.
/// A round's clip under adaptive clipping: the clip norm saved with the adapter version (or
/// the initial one), its count scale and the extended bound.
fn round_clip(config: &Config, meta: &MetaState) -> Option<RoundClip> {
    let a = config.update.adaptive?;
    let c = meta.clip_norm.unwrap_or(a.initial).clamp(a.min, a.max);
    let clip = adaptive_clip::round_clip(c, config.privacy.noise_multiplier, a.count_stddev);
    debug_assert!(clip.is_some(), "the config checked the split");
    clip
}

pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::testing::{device, start};
    use super::{CheckIn, RoundPhase};

    #[test]
    fn the_view_is_republished_when_an_assignment_sets_the_deadline() {
        let f = start(2, 1, |_| {});
        let c = &f.coordinator;
        let mut rx = c.watch();
        let before = rx.borrow_and_update().clone();
        assert_eq!((before.round, before.phase), (1, RoundPhase::Open));
        assert_eq!(
            (before.version, before.reports, before.target_reports),
            (0, 0, 2)
        );
        assert_eq!(before.deadline, None);
        let CheckIn::Task(task) = c.check_in(&device(1), 0) else {
            panic!("no task");
        };
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().deadline, Some(task.deadline));
        // The same device again changes nothing, so nothing is sent.
        c.check_in(&device(1), 0);
        assert!(!rx.has_changed().unwrap());
    }
}
