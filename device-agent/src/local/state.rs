//! What the local API works on: the agent's folder, its store and the base model; forgetting,
//! and the schedule on which the personal adapter is trained.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use candle_core::Device;
use fedpersona_model::{BaseModel, LoraAdapter};

use crate::adapt::{
    adapt_on_interactions, Cancel, Gate, Outcome, Personalized, RunLimits, Served, Settings,
};
use crate::fs::StateDir;
use crate::local::{now_ms, LocalError};
use crate::user::consent::Consent;
use crate::user::profile::Profile;
use crate::user::store::{Feedback, Interaction, InteractionStore};

/// What the local API works on: the agent's folder, its store and the base model.
#[derive(Debug)]
pub struct LocalState {
    pub(super) dir: StateDir,
    store: Mutex<InteractionStore>,
    pub(super) base: Arc<BaseModel>,
    /// When an app last called the API (the device counts as idle after a while).
    last_call: Mutex<std::time::Instant>,
    /// One adaptation at a time. The blocking task that runs it holds the lock until it is
    /// done (even if the caller went away), so [`LocalState::forget`] can wait for it.
    adapting: tokio::sync::Mutex<()>,
    /// `forget` calls under way: a running adaptation gives up at its next step, and none
    /// starts.
    forgetting: AtomicUsize,
    /// See [`LocalState::on_event`].
    events: Mutex<Option<EventHook>>,
}

/// What a test can see of the local state's background work ([`LocalState::on_event`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An adaptation is between two training steps; it checks for cancellation next.
    AdaptationStep,
    /// A `forget` has asked any running adaptation to stop and now waits for it.
    ForgetRequested,
}

#[derive(Clone)]
struct EventHook(Arc<dyn Fn(Event) + Send + Sync>);

impl std::fmt::Debug for EventHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventHook(..)")
    }
}

/// What [`LocalState::forget`] erased.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forgotten {
    pub interactions: u64,
    /// Whether a personal adapter, an adaptation checkpoint or a half-swapped adapter existed.
    pub adapter: bool,
    pub left_federation: bool,
}

/// When the personal adapter is trained: after `min_new` new interactions, once the API has
/// been idle for `idle`, within a time budget (a cut run resumes next time) and a memory
/// budget (tokens per batch).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Schedule {
    /// New interactions since the last adaptation that make it due.
    #[arg(long, default_value_t = 20)]
    pub min_new: u64,
    /// Seconds without an API call before the device counts as idle.
    #[arg(long, default_value_t = 120.0)]
    pub idle_s: f64,
    /// Seconds between checks.
    #[arg(long, default_value_t = 60.0)]
    pub check_s: f64,
    /// Longest one adaptation may run, in seconds (it resumes at the next chance).
    #[arg(long, default_value_t = 300.0)]
    pub time_budget_s: f64,
    /// Memory budget: tokens in one training batch (batch size × sequence length).
    #[arg(long, default_value_t = 1024)]
    pub max_batch_tokens: usize,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            min_new: 20,
            idle_s: 120.0,
            check_s: 60.0,
            time_budget_s: 300.0,
            max_batch_tokens: 1024,
        }
    }
}

impl Schedule {
    pub(super) fn validate(&self) -> anyhow::Result<()> {
        for (v, what) in [
            (self.idle_s, "idle"),
            (self.check_s, "check"),
            (self.time_budget_s, "time budget"),
        ] {
            anyhow::ensure!(
                v.is_finite() && (0.0..1e7).contains(&v),
                "the {what} seconds must be a non-negative number"
            );
        }
        anyhow::ensure!(self.min_new >= 1, "min_new must be at least 1");
        anyhow::ensure!(
            self.max_batch_tokens >= 64,
            "max_batch_tokens must be at least 64"
        );
        Ok(())
    }
}

/// What the last finished adaptation covered and what the never-harm check chose
/// (`personal/state.json`). `personal/` holds the adapter served: the trained one, a copy of
/// the global one, or none (the base model).
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct AdaptedState {
    pub interactions: u64,
    pub adapted_ms: i64,
    pub steps: usize,
    /// None in files written before the check existed.
    #[serde(default)]
    pub gate: Option<Gate>,
}

impl LocalState {
    /// Opens (creating) the store in `dir` with its key file.
    pub fn open(dir: StateDir, base: Arc<BaseModel>) -> anyhow::Result<LocalState> {
        dir.create()?;
        let store = InteractionStore::open_with_key_file(&dir.store(), &dir.store_key())?;
        Ok(LocalState {
            dir,
            store: Mutex::new(store),
            base,
            last_call: Mutex::new(std::time::Instant::now()),
            adapting: tokio::sync::Mutex::new(()),
            forgetting: AtomicUsize::new(0),
            events: Mutex::new(None),
        })
    }

    /// Calls `hook` at every [`Event`], on the thread where it happens (tests use it to
    /// place a `forget` inside a running adaptation without timing).
    #[doc(hidden)]
    pub fn on_event(&self, hook: impl Fn(Event) + Send + Sync + 'static) {
        *self.events.lock().unwrap_or_else(|e| e.into_inner()) = Some(EventHook(Arc::new(hook)));
    }

    fn emit(&self, event: Event) {
        // Not called under the lock: a hook may block.
        let hook = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(hook) = hook {
            (hook.0)(event);
        }
    }

    fn forget_pending(&self) -> bool {
        self.forgetting.load(Ordering::SeqCst) > 0
    }

    /// Erases the user's data: every interaction, and everything derived from them (the
    /// personal adapter, the checkpoint of a cut adaptation, a half-swapped adapter). A
    /// running adaptation is told to stop and waited for first, so nothing trained on the
    /// erased text is published afterwards. With `leave_federation`, also the federation
    /// credentials, and consent is recorded as off.
    pub async fn forget(&self, leave_federation: bool) -> Result<Forgotten, LocalError> {
        /// Counts a forget under way until it ends, however it ends (a dropped call too).
        struct Pending<'a>(&'a AtomicUsize);
        impl Drop for Pending<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.forgetting.fetch_add(1, Ordering::SeqCst);
        let _pending = Pending(&self.forgetting);
        self.emit(Event::ForgetRequested);
        // A running adaptation stops at its next step and releases this; none starts while
        // it is held.
        let _no_adaptation = self.adapting.lock().await;
        let interactions = {
            let store = self.store();
            let n = store.count()?;
            store.forget()?;
            n
        };
        let mut adapter = false;
        for path in self.dir.derived_from_text() {
            adapter |= crate::fs::remove(&path)
                .map_err(|e| LocalError::internal("erasing the personal adapter", e))?;
        }
        if leave_federation {
            Consent::set(&self.dir, false, now_ms())
                .map_err(|e| LocalError::internal("recording consent", e))?;
            for path in self.dir.federation_credentials() {
                crate::fs::remove(&path)
                    .map_err(|e| LocalError::internal("leaving the federation", e))?;
            }
        }
        Ok(Forgotten {
            interactions,
            adapter,
            left_federation: leave_federation,
        })
    }

    /// Logs a note (no suggestion, no feedback) without going through the socket.
    pub fn log_note(&self, text: &str, context: Option<&str>) -> anyhow::Result<i64> {
        Ok(self.store().log(&Interaction {
            time_ms: now_ms(),
            context: context.map(String::from),
            suggestion: None,
            text: text.into(),
            feedback: Feedback::None,
            app: "test".into(),
            kind: "note".into(),
        })?)
    }

    pub(super) fn touch(&self) {
        *self.last_call.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
    }

    fn idle_for(&self) -> std::time::Duration {
        self.last_call
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    fn adapted_state(&self) -> AdaptedState {
        std::fs::read(StateDir::adapted_state_in(&self.dir.personal()))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Trains the personal adapter if the schedule says it is due: enough new interactions
    /// and the API idle. Returns what the run did (None: not due).
    pub async fn adapt_if_due(
        self: &Arc<Self>,
        schedule: &Schedule,
    ) -> anyhow::Result<Option<Outcome>> {
        let this = self.clone();
        let schedule = *schedule;
        tokio::task::spawn_blocking(move || {
            // Held by this task for the whole run, even if the caller's future is dropped.
            let Ok(_one) = this.adapting.try_lock() else {
                return Ok(None);
            };
            if this.forget_pending() {
                return Ok(None);
            }
            let count = this.store().count()?;
            let new = count.saturating_sub(this.adapted_state().interactions);
            if new < schedule.min_new
                || this.idle_for() < std::time::Duration::from_secs_f64(schedule.idle_s)
            {
                return Ok(None);
            }
            this.adapt_now(&schedule).map(Some)
        })
        .await
        .context("adaptation task")?
    }

    /// One adaptation of the personal adapter on every stored interaction (profile-weighted,
    /// profile-planned, early-stopped), within the schedule's budgets, then the never-harm
    /// check: `personal/` is replaced by what it serves (the new adapter, the global one, or
    /// none) only when the run finishes and no `forget` began meanwhile. The caller holds
    /// `adapting`.
    fn adapt_now(&self, schedule: &Schedule) -> anyhow::Result<Outcome> {
        let items = self.store().all()?;
        let now = now_ms();
        let global = self.global_adapter();
        let mut adapter = match self.personal_adapter()? {
            Some(a) => a,
            None => match &global {
                Some(g) => LoraAdapter::from_tensors(
                    self.base.model.config(),
                    g.config().clone(),
                    &g.to_tensors()?,
                    &Device::Cpu,
                )?,
                None => LoraAdapter::new(
                    self.base.model.config(),
                    fedpersona_model::LoraConfig::default(),
                    &Device::Cpu,
                )?,
            },
        };
        let progress = self.dir.adaptation_progress();
        std::fs::create_dir_all(&progress)?;
        let cancel = || {
            self.emit(Event::AdaptationStep);
            self.forget_pending()
        };
        let budget = RunLimits {
            checkpoint: Some(&progress),
            deadline: Some(
                std::time::Instant::now()
                    + std::time::Duration::from_secs_f64(schedule.time_budget_s),
            ),
            cancel: Some(Cancel(&cancel)),
        };
        let settings = Settings::device(&self.base, schedule.max_batch_tokens);
        let Personalized { outcome, gate, .. } = adapt_on_interactions(
            &self.base,
            &mut adapter,
            global.as_ref(),
            &items,
            now,
            &settings,
            rand::random(),
            budget,
        )?;
        if outcome.cancelled || self.forget_pending() {
            // The forget that asked for this erases what the run left behind.
            tracing::info!("adaptation given up: the user's data is being forgotten");
            return Ok(Outcome {
                finished: false,
                cancelled: true,
                ..outcome
            });
        }
        if let (true, Some(gate)) = (outcome.finished, gate) {
            // Written beside, then swapped in: `Generate` never sees half an adapter.
            let fresh = self.dir.personal_fresh();
            let _ = std::fs::remove_dir_all(&fresh);
            std::fs::create_dir_all(&fresh)?;
            match (gate.served, &global) {
                (Served::Personal, _) => adapter.save(&fresh)?,
                (Served::Global, Some(global)) => global.save(&fresh)?,
                (Served::Global, None) => unreachable!("global is served only when there is one"),
                (Served::Base, _) => {}
            }
            let state = AdaptedState {
                interactions: items.len() as u64,
                adapted_ms: now,
                steps: outcome.steps,
                gate: Some(gate),
            };
            crate::fs::write_private(
                &StateDir::adapted_state_in(&fresh),
                &serde_json::to_vec(&state).expect("plain struct"),
            )?;
            crate::fs::restrict(&fresh)?;
            crate::fs::replace_dir(&fresh, &self.dir.personal())?;
            let _ = std::fs::remove_dir_all(&progress);
            tracing::info!(steps = outcome.steps, served = ?gate.served, "adaptation checked and served");
        }
        Ok(outcome)
    }

    pub(super) fn store(&self) -> std::sync::MutexGuard<'_, InteractionStore> {
        // SQLite transactions keep the file whole even if a holder panicked.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn personal_adapter(&self) -> anyhow::Result<Option<LoraAdapter>> {
        let dir = self.dir.personal();
        if !dir.join("adapter_config.json").exists() {
            return Ok(None);
        }
        LoraAdapter::load(&dir, self.base.model.config(), &Device::Cpu)
            .map(Some)
            .with_context(|| format!("loading the personal adapter {}", dir.display()))
    }

    /// The federation's global adapter when `run` has downloaded one: where a first
    /// adaptation starts, and a candidate of the never-harm check. An unreadable or
    /// unfitting one is logged and left out.
    fn global_adapter(&self) -> Option<LoraAdapter> {
        let global = self.dir.global();
        if !global.join("adapter_config.json").exists() {
            return None;
        }
        match LoraAdapter::load(&global, self.base.model.config(), &Device::Cpu) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(error = %e, "the saved global adapter is unusable: left out");
                None
            }
        }
    }

    pub(super) fn profile(&self) -> Result<Profile, LocalError> {
        let items = self.store().all()?;
        Profile::compute(&items, now_ms(), None)
            .map_err(|e| LocalError::internal("computing the profile", e))
    }
}
