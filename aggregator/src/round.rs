//! The round state machine: assign checked-in devices to the open round (with over-selection),
//! accept validated uploads into a running sum until the round has its reports or its deadline
//! passes, then commit (server step, new version, journal) or abandon, and open the next round.
//!
//! Lifecycle of round r: opened (journal row `open`, no deadline) → the first assignment fixes
//! the deadline → uploads → closing (no more uploads) → committed or abandoned → round r+1
//! opens. Uploads of a round that was open at a crash are discarded at restart (the round is
//! abandoned; its devices take part in the next one), so no update is ever counted twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fedpersona_model::lora::LoraAdapter;
use fedpersona_privacy::accountant::Accountant;
use fedpersona_privacy::codec::{self, DecodeLimits};
use fedpersona_privacy::mode;
use fedpersona_privacy::secagg::{self, EncryptedShare, Phase, Reveal};
use tokio::sync::{watch, Notify};

use crate::aggregate::{RunningSum, UpdateSpec};
use crate::auth::{now_ms, DeviceId};
use crate::config::{Config, PrivacyMode, Weighting};
use crate::error::{FedError, Kind};
use crate::meta::MetaState;
use crate::metrics::Metrics;
use crate::secure::{Advance, Peer, Reply, SecureRound};
use crate::store::{Charge, Store};
use crate::versions::{sha256, Published, Versions};

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

/// An upload whose header passed every check; its data follows.
#[derive(Debug)]
pub struct UploadTicket {
    device: DeviceId,
    round: u64,
    nonce: Vec<u8>,
    total_bytes: u64,
    sha256: Vec<u8>,
    num_examples: u32,
}

impl UploadTicket {
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }
}

/// The header fields of an upload.
#[derive(Debug, Clone)]
pub struct UploadHeader {
    pub round: u64,
    pub nonce: Vec<u8>,
    pub total_bytes: u64,
    pub sha256: Vec<u8>,
    pub num_examples: u32,
}

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
    /// Secure aggregation of this round's updates, when the config enables it.
    secure: Option<SecureRound>,
}

/// A device's part in one phase of secure aggregation.
#[derive(Debug)]
pub enum SecureStep {
    Advertise {
        c_pk: [u8; 32],
        s_pk: [u8; 32],
        signature: Vec<u8>,
    },
    Shares(Vec<EncryptedShare>),
    Masked(Vec<u32>),
    Reveals(Vec<Reveal>),
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
}

/// Privacy spent so far against the budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivacySpent {
    pub epsilon: f64,
    pub delta: f64,
    pub budget: f64,
    pub rounds_charged: u64,
}

impl PrivacySpent {
    pub fn of(
        accountant: &Accountant,
        budget: crate::config::Budget,
    ) -> Result<Self, fedpersona_privacy::accountant::AccountantError> {
        Ok(PrivacySpent {
            epsilon: accountant.epsilon(budget.delta)?.0,
            delta: budget.delta,
            budget: budget.epsilon,
            rounds_charged: accountant.rounds(),
        })
    }
}

/// The journal's privacy ledger, composed.
pub fn ledger_accountant(store: &Store) -> anyhow::Result<Accountant> {
    let mut accountant = Accountant::default();
    for c in store.ledger()? {
        accountant.compose(c.sampling_rate, c.noise_multiplier, 1)?;
    }
    Ok(accountant)
}

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
            deadline: None,
            rounds_committed: st.rounds_committed,
        },
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> FedError {
    FedError::internal(what, e)
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
        let rec = store.recover(now_ms())?;
        if !rec.abandoned.is_empty() {
            tracing::warn!(rounds = ?rec.abandoned, "abandoned rounds left open by the previous run; their uploads are discarded");
        }
        let (meta, published) = match &rec.latest {
            Some(v) => versions
                .load(v.version, &v.sha256)
                .with_context(|| format!("loading committed adapter version {}", v.version))?,
            None => {
                let meta = versions.initial()?;
                let published = versions.save(0, &meta)?;
                store.record_initial_version(&published.sha256, now_ms())?;
                (meta, published)
            }
        };
        let shapes = LoraAdapter::trained_shapes(&config.model, &config.adapter);
        let values = shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let spec = UpdateSpec::new(shapes, norm_bound(&config, values));
        let finished = config
            .rounds
            .max_rounds
            .is_some_and(|m| rec.rounds_committed >= m);
        let mut accountant = ledger_accountant(&store)?;
        let (round, exhausted) = if finished {
            (None, None)
        } else {
            match open_round(
                &config,
                &store,
                &mut accountant,
                rec.next_round,
                published.version,
            )? {
                Ok(()) => (
                    Some(OpenRound::new(rec.next_round, spec.clone(), &config)),
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
            metrics.set_epsilon_spent(accountant.epsilon(b.delta)?.0);
        }
        let state = State {
            meta,
            published,
            round,
            rounds_committed: rec.rounds_committed,
            finished,
            accountant,
            exhausted,
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

    /// ε spent (at the budget's δ) by every round charged so far; None without DP.
    pub fn privacy_spent(&self) -> Option<PrivacySpent> {
        let budget = self.config.privacy.budget?;
        Some(PrivacySpent::of(&self.lock().accountant, budget).expect("the config validated delta"))
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

    /// Checks an upload's header against the round before any data is read.
    pub fn begin_upload(
        &self,
        device: DeviceId,
        h: UploadHeader,
    ) -> Result<UploadTicket, FedError> {
        let wrong = |reason, msg: String| FedError::new(Kind::WrongRound, reason, msg);
        if h.nonce.len() != fedpersona_proto::auth::NONCE_LEN {
            return Err(FedError::invalid(
                "bad_header",
                "upload nonce must be 16 bytes",
            ));
        }
        if h.sha256.len() != 32 {
            return Err(FedError::invalid(
                "bad_header",
                "upload sha256 must be 32 bytes",
            ));
        }
        if h.total_bytes == 0 {
            return Err(FedError::invalid("bad_header", "upload is empty"));
        }
        if h.total_bytes > self.config.update.max_upload_bytes {
            return Err(FedError::invalid(
                "oversized",
                format!(
                    "upload of {} bytes exceeds the limit of {} bytes",
                    h.total_bytes, self.config.update.max_upload_bytes
                ),
            ));
        }
        if self.config.secure_aggregation.is_some() {
            return Err(wrong(
                "secagg_only",
                "this aggregator takes updates only through secure aggregation".into(),
            ));
        }
        {
            let st = self.lock();
            self.check_round(&st, &device, h.round)
                .map_err(|(reason, msg)| wrong(reason, msg))?;
        }
        if self.store.nonce_seen(&h.nonce)? {
            return Err(FedError::new(
                Kind::Duplicate,
                "replay",
                "upload nonce was already used",
            ));
        }
        Ok(UploadTicket {
            device,
            round: h.round,
            nonce: h.nonce,
            total_bytes: h.total_bytes,
            sha256: h.sha256,
            num_examples: h.num_examples,
        })
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

    /// Validates the upload's bytes and adds them to the round's sum. On any error nothing
    /// changed.
    pub fn finish_upload(&self, t: UploadTicket, bytes: &[u8]) -> Result<u32, FedError> {
        if bytes.len() as u64 != t.total_bytes {
            return Err(FedError::invalid(
                "truncated",
                format!(
                    "upload has {} bytes, header declared {}",
                    bytes.len(),
                    t.total_bytes
                ),
            ));
        }
        if sha256(bytes).as_slice() != t.sha256.as_slice() {
            return Err(FedError::invalid(
                "hash",
                "upload SHA-256 does not match its header",
            ));
        }
        let limits = DecodeLimits {
            max_tensors: self.spec.shapes().len(),
            max_values: self.spec.num_values(),
        };
        let update = codec::decode(bytes, &limits)
            .map_err(|e| FedError::invalid("malformed", format!("update does not decode: {e}")))?;
        self.spec
            .check(&update)
            .map_err(|e| FedError::invalid(rejection_reason(&e), e.to_string()))?;
        let weight = match self.config.update.weighting {
            Weighting::Uniform => 1.0,
            Weighting::Examples { cap } => {
                if t.num_examples == 0 {
                    return Err(FedError::invalid(
                        "bad_header",
                        "num_examples must be positive",
                    ));
                }
                f64::from(t.num_examples.min(cap))
            }
        };
        let mut st = self.lock();
        self.check_round(&st, &t.device, t.round)
            .map_err(|(reason, msg)| FedError::new(Kind::WrongRound, reason, msg))?;
        // Journal first: a replay or a second report is refused before the sum changes.
        match self
            .store
            .record_upload(&t.nonce, t.round, &t.device.0, t.total_bytes, now_ms())?
        {
            Ok(()) => {}
            Err(crate::store::UploadConflict::Replay) => {
                return Err(FedError::new(
                    Kind::Duplicate,
                    "replay",
                    "upload nonce was already used",
                ))
            }
            Err(crate::store::UploadConflict::AlreadyReported) => {
                return Err(FedError::new(
                    Kind::Duplicate,
                    "already_reported",
                    format!("device already reported in round {}", t.round),
                ))
            }
        }
        let round = st.round.as_mut().expect("checked above");
        round
            .sum
            .add(&update, weight)
            .map_err(|e| internal("adding a checked update", e))?;
        *round.cohort.get_mut(&t.device).expect("checked above") = true;
        let reports = round.sum.count() as u32;
        if reports >= self.config.rounds.target_reports.get() {
            round.closing = true;
            self.round_full.notify_one();
        }
        drop(st);
        self.metrics.report(bytes.len());
        Ok(reports)
    }

    /// Records a device's part in the current phase of secure aggregation. Returns the phase
    /// it was part of and a receiver that changes when a phase closes; [`Self::secure_reply`]
    /// then has the device's answer.
    pub fn secure_submit(
        &self,
        device: &DeviceId,
        round: u64,
        step: SecureStep,
    ) -> Result<(Phase, watch::Receiver<u64>), FedError> {
        let wrong = |(reason, msg)| FedError::new(Kind::WrongRound, reason, msg);
        let device_key = match &step {
            SecureStep::Advertise { .. } => Some(
                self.store
                    .device(&device.0)?
                    .ok_or_else(|| FedError::internal("secagg", "enrolled device vanished"))?
                    .0,
            ),
            _ => None,
        };
        let mut st = self.lock();
        if matches!(step, SecureStep::Advertise { .. }) {
            self.check_round(&st, device, round).map_err(wrong)?;
        }
        let target = self.config.rounds.target_reports.get() as usize;
        let r = st.round.as_mut();
        let secure = OpenRound::secure_of(r, round)?;
        let phase = secure.phase();
        let mut full = false;
        let mut masked_bytes = None;
        match step {
            SecureStep::Advertise {
                c_pk,
                s_pk,
                signature,
            } => {
                let peer = Peer {
                    c_pk,
                    s_pk,
                    signature,
                    device_key: device_key.expect("looked up above"),
                };
                full = secure.advertise(device, round, peer)? >= target;
            }
            SecureStep::Shares(shares) => secure.submit_shares(device, shares)?,
            SecureStep::Masked(values) => {
                secure.check_masked(device, values.len())?;
                // Journal first: a second report of this device is refused durably.
                let mut nonce = [0u8; 16];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
                    .map_err(|_| FedError::internal("secagg", "no system randomness"))?;
                let bytes = values.len() * 4;
                match self
                    .store
                    .record_upload(&nonce, round, &device.0, bytes as u64, now_ms())?
                {
                    Ok(()) => {}
                    Err(_) => {
                        return Err(FedError::new(
                            Kind::Duplicate,
                            "already_reported",
                            format!("device already reported in round {round}"),
                        ))
                    }
                }
                secure.submit_masked(device, values)?;
                masked_bytes = Some(bytes);
            }
            SecureStep::Reveals(reveals) => secure.submit_reveals(device, reveals)?,
        }
        let rx = secure.subscribe();
        let round = st.round.as_mut().expect("checked above");
        if let Some(bytes) = masked_bytes {
            round.cohort.insert(device.clone(), true);
            self.metrics.report(bytes);
        }
        if full {
            round.closing = true;
        }
        drop(st);
        // The driver re-checks whether the phase can close.
        self.round_full.notify_one();
        Ok((phase, rx))
    }

    /// The device's answer once `after`, a phase it took part in, has closed (None while it
    /// is still open).
    pub fn secure_reply(
        &self,
        device: &DeviceId,
        round: u64,
        after: Phase,
    ) -> Result<Option<Reply>, FedError> {
        let mut st = self.lock();
        let secure = OpenRound::secure_of(st.round.as_mut(), round)?;
        if secure.phase() == after {
            return Ok(None);
        }
        secure.reply(device, after).map(Some)
    }

    /// Closes the open round if it is due (full, closing or past its deadline), or moves its
    /// secure aggregation on.
    fn close_if_due(&self) -> anyhow::Result<Option<Outcome>> {
        let due = {
            let mut st = self.lock();
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
                        Some((Phase::Advertise, _)) | None => r.deadline.map(|d| d.0),
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
        let (id, sum, opened, meta, base_version) = {
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
            )
        };
        let reports = sum.count();
        let min = u64::from(self.config.rounds.min_reports.get());
        let mut committed = None;
        let outcome = if reports >= min {
            let mean = self.release(&sum)?;
            let mut next = meta;
            next.apply(self.config.meta, &mean)?;
            let version = base_version + 1;
            let published = self.versions.save(version, &next)?;
            self.store
                .commit_round(id, version, &published.sha256, now_ms())?;
            committed = Some((next, published));
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
        if let Some((next, published)) = committed {
            st.meta = next;
            st.published = published;
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
                Ok(()) => st.round = Some(OpenRound::new(id + 1, self.spec.clone(), &self.config)),
                Err(why) => {
                    tracing::warn!(reason = %why, "no further rounds: the privacy budget is spent");
                    st.exhausted = Some(why);
                }
            }
        }
        self.metrics.set_round(id + 1, st.published.version);
        if let Some(b) = self.config.privacy.budget {
            self.metrics
                .set_epsilon_spent(st.accountant.epsilon(b.delta)?.0);
        }
        drop(st);
        if let Outcome::Committed { .. } = outcome {
            self.prune();
        }
        Ok(outcome)
    }

    /// What the round publishes: the mean of its reports, with the central noise where the
    /// aggregator adds it. With DP the divisor is the target cohort size, not the count.
    fn release(&self, sum: &RunningSum) -> anyhow::Result<fedpersona_privacy::AdapterTensors> {
        let p = &self.config.privacy;
        let c = f64::from(self.config.update.clip_norm);
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

/// The L2 bound uploads are held to: the clip norm, or with local noise the clip norm plus
/// a bound on the noise's norm (σ·(√d + 10), over ten standard deviations of a χ_d above its
/// mean) and the 8-bit encoding's rounding.
fn norm_bound(config: &Config, values: usize) -> f64 {
    let c = f64::from(config.update.clip_norm);
    if config.privacy.mode != PrivacyMode::Local {
        return c;
    }
    mode::local_upload_norm_bound(c, config.privacy.noise_multiplier, values)
}

/// Opens round `id` if the privacy budget can pay for it (charging it in the same journal
/// transaction); `Ok(Err(why))` when it cannot.
fn open_round(
    config: &Config,
    store: &Store,
    accountant: &mut Accountant,
    id: u64,
    base_version: u64,
) -> anyhow::Result<Result<(), String>> {
    let p = &config.privacy;
    let Some(budget) = p.budget else {
        store.open_round(id, base_version, None, now_ms())?;
        return Ok(Ok(()));
    };
    let mut next = accountant.clone();
    next.compose(p.sampling_rate, p.noise_multiplier, 1)?;
    let (after, _) = next.epsilon(budget.delta)?;
    if after > budget.epsilon {
        let (spent, _) = accountant.epsilon(budget.delta)?;
        return Ok(Err(format!(
            "privacy budget exhausted: epsilon {spent:.4} spent of {} at delta {}; round {id} would bring it to {after:.4}",
            budget.epsilon, budget.delta
        )));
    }
    let charge = Charge {
        noise_multiplier: p.noise_multiplier,
        sampling_rate: p.sampling_rate,
    };
    store.open_round(id, base_version, Some((p.mode.name(), charge)), now_ms())?;
    *accountant = next;
    Ok(Ok(()))
}

impl OpenRound {
    fn new(id: u64, spec: UpdateSpec, config: &Config) -> Self {
        let secure = config
            .secure_aggregation
            .map(|p| SecureRound::new(id, spec.num_values(), p));
        OpenRound {
            id,
            opened: Instant::now(),
            deadline: None,
            cohort: HashMap::new(),
            sum: RunningSum::new(spec),
            closing: false,
            secure,
        }
    }

    /// The secure-aggregation state of round `id`, if that round is open and secure.
    fn secure_of(round: Option<&mut OpenRound>, id: u64) -> Result<&mut SecureRound, FedError> {
        let Some(r) = round.filter(|r| r.id == id) else {
            return Err(FedError::new(
                Kind::WrongRound,
                "wrong_round",
                format!("round {id} is not open"),
            ));
        };
        r.secure.as_mut().ok_or_else(|| {
            FedError::new(
                Kind::WrongRound,
                "no_secagg",
                "this round does not use secure aggregation",
            )
        })
    }
}

fn rejection_reason(e: &crate::aggregate::UpdateRejection) -> &'static str {
    use crate::aggregate::UpdateRejection as R;
    match e {
        R::UnexpectedTensor(_) | R::MissingTensor(_) | R::WrongShape { .. } => "shape",
        R::NonFinite(_) => "non_finite",
        R::NormTooLarge { .. } => "norm",
    }
}

/// Milliseconds since the epoch of a wall-clock time.
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
