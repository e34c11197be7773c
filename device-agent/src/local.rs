//! The local API: apps on the device talk to their user's agent through a gRPC service
//! (`fedpersona.local.v1.LocalAgent`) on a Unix domain socket of mode 0600, so only the
//! user's own processes can reach it and nothing is exposed on the network. It fronts the
//! encrypted interaction store, the profile, generation with the personal adapter, export,
//! forgetting and consent. `device-agent local serve` runs it; the other `device-agent
//! local` commands are its command-line client. Generated types stay in this module.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use candle_core::Device;
use fedpersona_model::generate::{generate, Sampling};
use fedpersona_model::{BaseModel, LoraAdapter};
use fedpersona_proto::local as pb;
use fedpersona_proto::local::local_agent_client::LocalAgentClient;
use fedpersona_proto::local::local_agent_server::{LocalAgent, LocalAgentServer};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::consent::Consent;
use crate::interactions::{Feedback, Interaction, InteractionStore, StoreError, StoreKey};
use crate::profile::Profile;

/// The interaction store in the agent's folder.
pub const STORE_FILE: &str = "interactions.sqlite";
/// Its key (mode 0600).
pub const STORE_KEY_FILE: &str = "store.key";
/// The personal adapter (PEFT layout) that `Generate` uses.
pub const PERSONAL_DIR: &str = "personal";
/// The federation's latest global adapter (PEFT layout), written by `run` at each download:
/// where the personal adapter starts when there is none yet, as the simulation measures.
/// Not derived from this user's text alone (it is the aggregator's release).
pub const GLOBAL_DIR: &str = "global";
/// The checkpoint of an adaptation cut by its time budget (an adapter trained on the text).
pub const PROGRESS_DIR: &str = "personal.progress";
/// Where a finished adaptation writes the new adapter before swapping it in.
const FRESH_DIR: &str = "personal.new";
/// Where the previous adapter waits during the swap (`fs::replace_dir`'s `<dest>.old`).
const OLD_DIR: &str = "personal.old";
/// Everything in the agent's folder derived from the user's text, besides the store.
const DERIVED_DIRS: [&str; 4] = [PERSONAL_DIR, PROGRESS_DIR, FRESH_DIR, OLD_DIR];
/// The socket, unless given elsewhere.
pub const SOCKET_FILE: &str = "local.sock";

/// Longest text a single field of an interaction may have.
const MAX_TEXT_BYTES: usize = 64 << 10;
/// Most tokens one `Generate` call may ask for.
const MAX_GENERATE_TOKENS: u32 = 4096;

#[derive(Debug, clap::Subcommand)]
pub enum LocalCommand {
    /// Serve the local API on a Unix socket (mode 0600) until Ctrl-C or SIGTERM.
    Serve {
        /// The agent's folder (store, key, personal adapter, consent).
        #[arg(long)]
        state_dir: PathBuf,
        /// Base model folder (default: the shipped model).
        #[arg(long)]
        base: Option<PathBuf>,
        /// Socket path (default: STATE_DIR/local.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        #[command(flatten)]
        schedule: Schedule,
    },
    /// Record an interaction; prints its id.
    Log {
        #[arg(long)]
        socket: PathBuf,
        /// What the user wrote or chose.
        #[arg(long)]
        text: String,
        /// What the user was responding to.
        #[arg(long)]
        context: Option<String>,
        /// The model's suggestion, if one was shown.
        #[arg(long)]
        suggestion: Option<String>,
        /// none, accepted, edited, rejected, or a rating 1 to 5.
        #[arg(long, default_value = "none")]
        feedback: String,
        #[arg(long, default_value = "cli")]
        app: String,
        #[arg(long, default_value = "note")]
        kind: String,
    },
    /// Set the feedback of a recorded interaction.
    Feedback {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        id: i64,
        /// none, accepted, edited, rejected, or a rating 1 to 5.
        #[arg(long)]
        feedback: String,
    },
    /// Continue a prompt with the personal adapter (streams the continuation).
    Generate {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 200)]
        max_tokens: u32,
        /// 0 is greedy decoding.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0.9)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Print the user's profile (JSON).
    Profile {
        #[arg(long)]
        socket: PathBuf,
    },
    /// Print everything stored about the user, decrypted (JSON).
    Export {
        #[arg(long)]
        socket: PathBuf,
    },
    /// Erase the interactions and personal adapters (and with --leave-federation, the
    /// device's federation credentials, with consent off).
    Forget {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        leave_federation: bool,
    },
    /// Federated participation: on or off.
    Consent {
        #[arg(long)]
        socket: PathBuf,
        #[arg(value_parser = ["on", "off"])]
        choice: String,
    },
}

/// Runs a `device-agent local` command; returns what to print.
pub async fn run(cmd: LocalCommand) -> anyhow::Result<String> {
    match cmd {
        LocalCommand::Serve {
            state_dir,
            base,
            socket,
            schedule,
        } => {
            let base_dir = base.unwrap_or_else(fedpersona_model::checkpoint::default_model_dir);
            let base = BaseModel::load(&base_dir, &Device::Cpu)
                .with_context(|| format!("loading base model {}", base_dir.display()))?;
            let socket = socket.unwrap_or_else(|| state_dir.join(SOCKET_FILE));
            let local = LocalState::open(&state_dir, Arc::new(base))?;
            tracing::info!(socket = %socket.display(), "local API serving");
            serve(local, schedule, &socket, crate::shutdown::shutdown_signal()).await?;
            Ok(String::new())
        }
        LocalCommand::Log {
            socket,
            text,
            context,
            suggestion,
            feedback,
            app,
            kind,
        } => {
            let r = connect(&socket)
                .await?
                .log_interaction(pb::LogInteractionRequest {
                    time_ms: 0,
                    context,
                    suggestion,
                    text,
                    feedback: Some(feedback_arg(&feedback)?),
                    app,
                    kind,
                })
                .await
                .map_err(refused)?;
            Ok(r.into_inner().id.to_string())
        }
        LocalCommand::Feedback {
            socket,
            id,
            feedback,
        } => {
            connect(&socket)
                .await?
                .feedback(pb::FeedbackRequest {
                    id,
                    feedback: Some(feedback_arg(&feedback)?),
                })
                .await
                .map_err(refused)?;
            Ok("feedback recorded".into())
        }
        LocalCommand::Generate {
            socket,
            prompt,
            max_tokens,
            temperature,
            top_p,
            seed,
        } => {
            use std::io::Write;
            let mut stream = connect(&socket)
                .await?
                .generate(pb::GenerateRequest {
                    prompt,
                    max_tokens,
                    temperature,
                    top_p,
                    seed,
                })
                .await
                .map_err(refused)?
                .into_inner();
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = stream.message().await.map_err(refused)? {
                out.write_all(chunk.text.as_bytes())?;
                out.flush()?;
            }
            Ok(String::new())
        }
        LocalCommand::Profile { socket } => Ok(connect(&socket)
            .await?
            .get_profile(pb::GetProfileRequest {})
            .await
            .map_err(refused)?
            .into_inner()
            .json),
        LocalCommand::Export { socket } => Ok(connect(&socket)
            .await?
            .export(pb::ExportRequest {})
            .await
            .map_err(refused)?
            .into_inner()
            .json),
        LocalCommand::Forget {
            socket,
            leave_federation,
        } => {
            let r = connect(&socket)
                .await?
                .forget(pb::ForgetRequest { leave_federation })
                .await
                .map_err(refused)?
                .into_inner();
            Ok(format!(
                "erased {} interactions{}{}",
                r.interactions_erased,
                if r.adapter_erased {
                    " and the personal adapter"
                } else {
                    ""
                },
                if r.left_federation {
                    "; left the federation"
                } else {
                    ""
                }
            ))
        }
        LocalCommand::Consent { socket, choice } => {
            let r = connect(&socket)
                .await?
                .set_consent(pb::SetConsentRequest {
                    federated: choice == "on",
                })
                .await
                .map_err(refused)?
                .into_inner();
            Ok(format!(
                "federated participation {}",
                if r.federated { "on" } else { "off" }
            ))
        }
    }
}

fn refused(s: Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}

fn feedback_arg(s: &str) -> anyhow::Result<pb::FeedbackValue> {
    use pb::FeedbackKind as K;
    let (kind, rating) = match s {
        "none" => (K::None, 0),
        "accepted" => (K::Accepted, 0),
        "edited" => (K::Edited, 0),
        "rejected" => (K::Rejected, 0),
        r => match r.parse::<u32>() {
            Ok(v @ 1..=5) => (K::Rating, v),
            _ => bail!(
                "feedback must be none, accepted, edited, rejected or a rating 1 to 5, not {s:?}"
            ),
        },
    };
    Ok(pb::FeedbackValue {
        kind: kind as i32,
        rating,
    })
}

/// A client of the local API on `socket`.
pub async fn connect(socket: &Path) -> anyhow::Result<LocalAgentClient<tonic::transport::Channel>> {
    let path = socket.to_path_buf();
    // The URI is unused: every connection goes to the socket.
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| format!("connecting to the local API at {}", socket.display()))?;
    Ok(LocalAgentClient::new(channel))
}

/// What the local API works on: the agent's folder, its store and the base model.
#[derive(Debug)]
pub struct LocalState {
    dir: PathBuf,
    store: Mutex<InteractionStore>,
    base: Arc<BaseModel>,
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
    fn validate(&self) -> anyhow::Result<()> {
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

/// What the last finished adaptation covered (`personal/state.json`).
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct AdaptedState {
    pub interactions: u64,
    pub adapted_ms: i64,
    pub steps: usize,
}

impl LocalState {
    /// Opens (creating) the store in `dir` with its key file.
    pub fn open(dir: &Path, base: Arc<BaseModel>) -> anyhow::Result<LocalState> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let key = StoreKey::load_or_create(&dir.join(STORE_KEY_FILE))?;
        let store = InteractionStore::open(&dir.join(STORE_FILE), key)?;
        Ok(LocalState {
            dir: dir.to_path_buf(),
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
    pub async fn forget(&self, leave_federation: bool) -> anyhow::Result<Forgotten> {
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
        for d in DERIVED_DIRS {
            let path = self.dir.join(d);
            match std::fs::remove_dir_all(&path) {
                Ok(()) => adapter = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("erasing {}", path.display())),
            }
        }
        if leave_federation {
            Consent::set(&self.dir, false, now_ms()).context("recording consent")?;
            for f in ["device.key", "agent.json"] {
                match std::fs::remove_file(self.dir.join(f)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).context("leaving the federation"),
                }
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

    fn touch(&self) {
        *self.last_call.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
    }

    fn idle_for(&self) -> std::time::Duration {
        self.last_call
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    fn adapted_state(&self) -> AdaptedState {
        std::fs::read(self.dir.join(PERSONAL_DIR).join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Trains the personal adapter if the schedule says it is due: enough new interactions
    /// and the API idle. Returns what the run did (None: not due).
    pub async fn adapt_if_due(
        self: &Arc<Self>,
        schedule: &Schedule,
    ) -> anyhow::Result<Option<crate::adaptation::Outcome>> {
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
    /// profile-planned, early-stopped), within the schedule's budgets. The new adapter
    /// replaces the old one only when the run finishes and no `forget` began meanwhile. The
    /// caller holds `adapting`.
    fn adapt_now(&self, schedule: &Schedule) -> anyhow::Result<crate::adaptation::Outcome> {
        use crate::adaptation::{adapt_on_interactions, Cancel, Personalized, RunLimits, Settings};
        let items = self.store().all()?;
        let now = now_ms();
        let mut adapter = match self.personal_adapter()? {
            Some(a) => a,
            None => self.start_adapter()?,
        };
        let progress = self.dir.join(PROGRESS_DIR);
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
        let Personalized { outcome, .. } = adapt_on_interactions(
            &self.base,
            &mut adapter,
            &items,
            now,
            &settings,
            rand::random(),
            budget,
        )?;
        if outcome.cancelled || self.forget_pending() {
            // The forget that asked for this erases what the run left behind.
            tracing::info!("adaptation given up: the user's data is being forgotten");
            return Ok(crate::adaptation::Outcome {
                finished: false,
                cancelled: true,
                ..outcome
            });
        }
        if outcome.finished {
            // Written beside, then swapped in: `Generate` never sees half an adapter.
            let fresh = self.dir.join(FRESH_DIR);
            let _ = std::fs::remove_dir_all(&fresh);
            adapter.save(&fresh)?;
            let state = AdaptedState {
                interactions: items.len() as u64,
                adapted_ms: now,
                steps: outcome.steps,
            };
            fedpersona_model::checkpoint::write_atomic(
                &fresh.join("state.json"),
                &serde_json::to_vec(&state).expect("plain struct"),
            )?;
            crate::fs::replace_dir(&fresh, &self.dir.join(PERSONAL_DIR))?;
            let _ = std::fs::remove_dir_all(&progress);
            tracing::info!(steps = outcome.steps, "personal adapter updated");
        }
        Ok(outcome)
    }

    fn store(&self) -> std::sync::MutexGuard<'_, InteractionStore> {
        // SQLite transactions keep the file whole even if a holder panicked.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn personal_adapter(&self) -> anyhow::Result<Option<LoraAdapter>> {
        let dir = self.dir.join(PERSONAL_DIR);
        if !dir.join("adapter_config.json").exists() {
            return Ok(None);
        }
        LoraAdapter::load(&dir, self.base.model.config(), &Device::Cpu)
            .map(Some)
            .with_context(|| format!("loading the personal adapter {}", dir.display()))
    }

    /// Where a first adaptation starts: the federation's global adapter when `run` has
    /// downloaded one (unreadable or unfitting ones are logged and skipped), else a fresh
    /// adapter.
    fn start_adapter(&self) -> anyhow::Result<LoraAdapter> {
        let global = self.dir.join(GLOBAL_DIR);
        if global.join("adapter_config.json").exists() {
            match LoraAdapter::load(&global, self.base.model.config(), &Device::Cpu) {
                Ok(a) => return Ok(a),
                Err(e) => {
                    tracing::warn!(error = %e, "the saved global adapter is unusable: starting fresh")
                }
            }
        }
        Ok(LoraAdapter::new(
            self.base.model.config(),
            fedpersona_model::LoraConfig::default(),
            &Device::Cpu,
        )?)
    }

    fn profile(&self) -> anyhow::Result<Profile> {
        let items = self.store().all()?;
        Profile::compute(&items, now_ms(), None)
    }
}

/// Serves the local API on `socket` (mode 0600) until `shutdown` resolves. A stale socket
/// file is replaced; any other file there is an error.
pub async fn serve(
    state: LocalState,
    schedule: Schedule,
    socket: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    schedule.validate()?;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(socket) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(socket)
            .with_context(|| format!("removing the stale socket {}", socket.display()))?,
        Ok(_) => bail!(
            "{} exists and is not a socket: refusing to replace it",
            socket.display()
        ),
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", socket.display()))?;
    let state = Arc::new(state);
    let scheduler = {
        let state = state.clone();
        tokio::spawn(async move {
            let every = std::time::Duration::from_secs_f64(schedule.check_s.max(0.01));
            loop {
                tokio::time::sleep(every).await;
                match state.adapt_if_due(&schedule).await {
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "adaptation failed"),
                }
            }
        })
    };
    let result = tonic::transport::Server::builder()
        .add_service(LocalAgentServer::new(LocalService {
            state: state.clone(),
        }))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await;
    scheduler.abort();
    let _ = std::fs::remove_file(socket);
    result.context("local API server")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The one mapping from the store's errors to gRPC status.
fn status(e: StoreError) -> Status {
    match e {
        StoreError::Invalid(m) => Status::invalid_argument(m),
        e @ StoreError::Tampered { .. } => Status::data_loss(e.to_string()),
        e => {
            tracing::error!(error = %e, "interaction store");
            Status::internal("interaction store error")
        }
    }
}

fn internal(what: &str, e: anyhow::Error) -> Status {
    tracing::error!(error = %format!("{e:#}"), "{what}");
    Status::internal(format!("{what} failed"))
}

fn feedback(v: Option<pb::FeedbackValue>) -> Result<Feedback, Status> {
    use pb::FeedbackKind as K;
    let v = v.unwrap_or_default();
    Ok(match K::try_from(v.kind) {
        Ok(K::None) | Ok(K::Unspecified) => Feedback::None,
        Ok(K::Accepted) => Feedback::Accepted,
        Ok(K::Edited) => Feedback::Edited,
        Ok(K::Rejected) => Feedback::Rejected,
        Ok(K::Rating) => match u8::try_from(v.rating) {
            Ok(r @ 1..=5) => Feedback::Rating(r),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "rating {} is not in 1..=5",
                    v.rating
                )))
            }
        },
        Err(_) => return Err(Status::invalid_argument("unknown feedback kind")),
    })
}

fn check_text(what: &str, s: &str) -> Result<(), Status> {
    if s.len() > MAX_TEXT_BYTES {
        return Err(Status::invalid_argument(format!(
            "{what} has {} bytes, more than {MAX_TEXT_BYTES}",
            s.len()
        )));
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct LocalService {
    state: Arc<LocalState>,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateChunk, Status>> + Send>>;

#[tonic::async_trait]
impl LocalAgent for LocalService {
    async fn log_interaction(
        &self,
        request: Request<pb::LogInteractionRequest>,
    ) -> Result<Response<pb::LogInteractionResponse>, Status> {
        self.state.touch();
        let r = request.into_inner();
        if r.text.is_empty() {
            return Err(Status::invalid_argument("text is empty"));
        }
        for (what, s) in [
            ("text", Some(&r.text)),
            ("context", r.context.as_ref()),
            ("suggestion", r.suggestion.as_ref()),
            ("app", Some(&r.app)),
            ("kind", Some(&r.kind)),
        ] {
            check_text(what, s.map_or("", |s| s.as_str()))?;
        }
        let interaction = Interaction {
            time_ms: if r.time_ms > 0 { r.time_ms } else { now_ms() },
            context: r.context,
            suggestion: r.suggestion,
            text: r.text,
            feedback: feedback(r.feedback)?,
            app: r.app,
            kind: r.kind,
        };
        let id = self.state.store().log(&interaction).map_err(status)?;
        Ok(Response::new(pb::LogInteractionResponse { id }))
    }

    async fn feedback(
        &self,
        request: Request<pb::FeedbackRequest>,
    ) -> Result<Response<pb::FeedbackResponse>, Status> {
        self.state.touch();
        let r = request.into_inner();
        let fb = feedback(r.feedback)?;
        self.state.store().set_feedback(r.id, fb).map_err(status)?;
        Ok(Response::new(pb::FeedbackResponse {}))
    }

    type GenerateStream = ChunkStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        self.state.touch();
        let r = request.into_inner();
        check_text("prompt", &r.prompt)?;
        if r.prompt.is_empty() {
            return Err(Status::invalid_argument("prompt is empty"));
        }
        if r.max_tokens == 0 || r.max_tokens > MAX_GENERATE_TOKENS {
            return Err(Status::invalid_argument(format!(
                "max_tokens must be in 1..={MAX_GENERATE_TOKENS}"
            )));
        }
        let temperature_ok = r.temperature.is_finite() && r.temperature >= 0.0;
        let top_p_ok = r.top_p.is_finite() && (0.0..=1.0).contains(&r.top_p);
        if !(temperature_ok && top_p_ok) {
            return Err(Status::invalid_argument(
                "temperature must be ≥ 0 and top_p in [0, 1]",
            ));
        }
        let adapter = self
            .state
            .personal_adapter()
            .map_err(|e| internal("loading the personal adapter", e))?;
        let state = self.state.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::task::spawn_blocking(move || {
            let base = &state.base;
            let mut prompt: Vec<u32> = base.bos().into_iter().collect();
            match base.tokenizer.encode(&r.prompt) {
                Ok(ids) => prompt.extend(ids),
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::invalid_argument(format!(
                        "prompt does not tokenize: {e}"
                    ))));
                    return;
                }
            }
            let cfg = base.model.config();
            let eos = if cfg.eos_token_ids.is_empty() {
                base.tokenizer.eos_ids()
            } else {
                cfg.eos_token_ids.clone()
            };
            let sampling = Sampling {
                temperature: f64::from(r.temperature),
                top_p: if r.top_p == 0.0 {
                    1.0
                } else {
                    f64::from(r.top_p)
                },
                seed: r.seed,
            };
            let mut text = crate::generate::TextStream::new(&base.tokenizer);
            let result = generate(
                &base.model,
                adapter.as_ref(),
                &prompt,
                r.max_tokens as usize,
                sampling,
                |id| {
                    if eos.contains(&id) {
                        return false;
                    }
                    let piece = text.push(id);
                    // A closed channel means the app went away: stop generating.
                    piece.is_empty()
                        || tx
                            .blocking_send(Ok(pb::GenerateChunk {
                                text: piece.to_string(),
                            }))
                            .is_ok()
                },
            );
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(internal("generation", e.into())));
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_profile(
        &self,
        _: Request<pb::GetProfileRequest>,
    ) -> Result<Response<pb::GetProfileResponse>, Status> {
        self.state.touch();
        let profile = self
            .state
            .profile()
            .map_err(|e| match e.downcast::<StoreError>() {
                Ok(e) => status(e),
                Err(e) => internal("computing the profile", e),
            })?;
        Ok(Response::new(pb::GetProfileResponse {
            json: serde_json::to_string_pretty(&profile).expect("plain struct"),
        }))
    }

    async fn export(
        &self,
        _: Request<pb::ExportRequest>,
    ) -> Result<Response<pb::ExportResponse>, Status> {
        self.state.touch();
        let dir = &self.state.dir;
        let items = self.state.store().all().map_err(status)?;
        let profile = Profile::compute(&items, now_ms(), None)
            .map_err(|e| internal("computing the profile", e))?;
        let consent = Consent::load(dir).map_err(|e| internal("reading consent", e))?;
        let adapter = dir.join(PERSONAL_DIR).join("adapter_config.json");
        let enrolled = dir.join("agent.json").exists();
        let json = serde_json::json!({
            "exported_ms": now_ms(),
            "interactions": items,
            "profile": profile,
            "consent": consent,
            "personal_adapter": adapter.exists().then(|| dir.join(PERSONAL_DIR).display().to_string()),
            "enrolled_in_federation": enrolled,
        });
        Ok(Response::new(pb::ExportResponse {
            json: serde_json::to_string_pretty(&json).expect("plain values"),
        }))
    }

    async fn forget(
        &self,
        request: Request<pb::ForgetRequest>,
    ) -> Result<Response<pb::ForgetResponse>, Status> {
        self.state.touch();
        let r = request.into_inner();
        let f = self.state.forget(r.leave_federation).await.map_err(|e| {
            match e.downcast::<StoreError>() {
                Ok(e) => status(e),
                Err(e) => internal("forgetting", e),
            }
        })?;
        Ok(Response::new(pb::ForgetResponse {
            interactions_erased: f.interactions,
            adapter_erased: f.adapter,
            left_federation: f.left_federation,
        }))
    }

    async fn set_consent(
        &self,
        request: Request<pb::SetConsentRequest>,
    ) -> Result<Response<pb::SetConsentResponse>, Status> {
        self.state.touch();
        let r = request.into_inner();
        let c = Consent::set(&self.state.dir, r.federated, now_ms())
            .map_err(|e| internal("recording consent", e))?;
        Ok(Response::new(pb::SetConsentResponse {
            federated: c.federated,
            changed_ms: c.changed_ms,
        }))
    }
}
