//! `device-agent run`: the federated participant. Enrolls once (Ed25519 key and device id in
//! the state folder, mode 0600), checks in on a schedule, and for each task downloads the
//! global adapter, adapts it on the user's own data, and uploads the clipped, encoded delta.
//! Survives its own restart: credentials and the last round it reported are on disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use candle_core::Device;
use fedpersona_model::train::{fit, Example, FitConfig, TrainConfig};
use fedpersona_model::{BaseModel, LoraAdapter, LoraConfig, Target};
use fedpersona_privacy::codec::Encoding;
use fedpersona_privacy::mode;
use fedpersona_privacy::protect::{
    protect, DeviceNoise, PrivacySpec, Protected, Protection, QuantizationSpec, Quantized,
};
use fedpersona_privacy::secagg;
use fedpersona_privacy::tensors::AdapterTensors;
use fedpersona_proto::auth::{self, Signer};
use fedpersona_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::client::{self, CheckIn, Connection, Retired, Retry, Session};
use crate::consent::Consent;
use crate::fs::write_private;
use crate::shutdown::shutdown_signal;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    aggregator: AggregatorFile,
    device: DeviceFile,
    #[serde(default)]
    schedule: ScheduleFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AggregatorFile {
    url: String,
    ca_cert: Option<PathBuf>,
    domain: Option<String>,
    enrollment_token: Option<String>,
    enrollment_token_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceFile {
    state_dir: PathBuf,
    model_dir: Option<PathBuf>,
    /// The user's text: a text/JSONL file or a plays folder (with `user`).
    data: PathBuf,
    user: Option<String>,
    #[serde(default)]
    threads: usize,
    local_socket: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ScheduleFile {
    checkin_interval_s: f64,
    max_attempts: u32,
    backoff_initial_s: f64,
    backoff_max_s: f64,
    max_rounds: u64,
}

impl Default for ScheduleFile {
    fn default() -> Self {
        ScheduleFile {
            checkin_interval_s: 60.0,
            max_attempts: 5,
            backoff_initial_s: 0.5,
            backoff_max_s: 30.0,
            max_rounds: 0,
        }
    }
}

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub connection: Connection,
    pub enrollment_token: String,
    pub state_dir: PathBuf,
    pub model_dir: PathBuf,
    pub data: crate::dataset::DataArgs,
    pub threads: usize,
    /// Longest wait between check-ins (the aggregator may ask for less).
    pub checkin_interval: Duration,
    pub retry: Retry,
    /// Stop after reporting in this many rounds (None: run until stopped).
    pub max_rounds: Option<u64>,
    /// Fixes the randomness of local training and encoding per round (the simulation's
    /// reproducible runs); None, as on a real device, draws it from the OS.
    pub seed: Option<u64>,
    /// Where `run` also serves the local API for apps on the device (None: it does not).
    pub local_socket: Option<PathBuf>,
}

impl AgentConfig {
    pub fn load(path: &Path) -> anyhow::Result<AgentConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
            .with_context(|| format!("invalid config {}", path.display()))
    }

    pub fn parse(text: &str, base: &Path) -> anyhow::Result<AgentConfig> {
        let f: File = toml::from_str(text)?;
        let resolve = |p: &Path| fedpersona_model::checkpoint::resolve_path(base, p);
        let ca_pem = f
            .aggregator
            .ca_cert
            .as_ref()
            .map(|p| {
                let p = resolve(p);
                std::fs::read(&p).with_context(|| format!("aggregator.ca_cert {}", p.display()))
            })
            .transpose()?;
        let token = match (
            &f.aggregator.enrollment_token,
            &f.aggregator.enrollment_token_file,
        ) {
            (Some(t), None) => t.clone(),
            (None, Some(p)) => {
                let p = resolve(p);
                std::fs::read_to_string(&p)
                    .with_context(|| format!("aggregator.enrollment_token_file {}", p.display()))?
                    .trim()
                    .to_string()
            }
            _ => bail!("[aggregator] needs exactly one of enrollment_token, enrollment_token_file"),
        };
        ensure!(!token.is_empty(), "the enrollment token is empty");
        let connection = Connection {
            url: f.aggregator.url.clone(),
            ca_pem,
            domain: f.aggregator.domain.clone(),
        };
        // Validates the URL and the TLS/plaintext rule without dialing.
        client::channel_check(&connection)?;
        let s = &f.schedule;
        let secs = |v: f64, what: &str| -> anyhow::Result<Duration> {
            ensure!(
                v.is_finite() && v > 0.0 && v < 1e7,
                "schedule.{what} must be a positive number of seconds"
            );
            Ok(Duration::from_secs_f64(v))
        };
        ensure!(
            s.max_attempts >= 1,
            "schedule.max_attempts must be at least 1"
        );
        Ok(AgentConfig {
            connection,
            enrollment_token: token,
            state_dir: resolve(&f.device.state_dir),
            model_dir: f
                .device
                .model_dir
                .as_ref()
                .map_or_else(fedpersona_model::checkpoint::default_model_dir, |p| {
                    resolve(p)
                }),
            data: crate::dataset::DataArgs {
                data: resolve(&f.device.data),
                user: f.device.user.clone(),
            },
            threads: f.device.threads,
            checkin_interval: secs(s.checkin_interval_s, "checkin_interval_s")?,
            retry: Retry {
                max_attempts: s.max_attempts,
                initial: secs(s.backoff_initial_s, "backoff_initial_s")?,
                max: secs(s.backoff_max_s, "backoff_max_s")?,
            },
            max_rounds: (s.max_rounds > 0).then_some(s.max_rounds),
            seed: None,
            local_socket: f.device.local_socket.as_ref().map(|p| resolve(p)),
        })
    }
}

/// What the agent keeps between runs (besides its key).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct AgentState {
    device_id: Option<String>,
    last_round: u64,
    rounds_reported: u64,
}

const KEY_FILE: &str = "device.key";
const STATE_FILE: &str = "agent.json";

/// The device's key: created once, mode 0600.
fn load_or_create_key(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = dir.join(KEY_FILE);
    if path.exists() {
        let key = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        auth::public_key(&key).with_context(|| format!("{} is not a valid key", path.display()))?;
        return Ok(key);
    }
    let key = auth::generate_key()?;
    write_private(&path, &key)?;
    Ok(key)
}

fn load_state(dir: &Path) -> anyhow::Result<AgentState> {
    let path = dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(b) => {
            serde_json::from_slice(&b).with_context(|| format!("{} is corrupt", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AgentState::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn save_state(dir: &Path, s: &AgentState) -> anyhow::Result<()> {
    let path = dir.join(STATE_FILE);
    write_private(&path, &serde_json::to_vec_pretty(s).expect("plain struct"))
}

/// What a run did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RunSummary {
    pub rounds_reported: u64,
    pub tasks_failed: u64,
    /// Set when the run ended because the aggregator will give no more work.
    pub retired: Option<Retired>,
}

/// A participant: credentials, data and the frozen base model (shareable between agents).
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    base: Arc<BaseModel>,
    examples: Arc<[Example]>,
    session: Session,
    state: AgentState,
}

impl Agent {
    /// Loads or creates credentials (enrolling if needed) and the user's data.
    pub async fn start(
        config: AgentConfig,
        base: Arc<BaseModel>,
        examples: impl Into<Arc<[Example]>>,
    ) -> anyhow::Result<Agent> {
        let channel = client::channel(&config.connection)?;
        Self::start_on(config, channel, base, examples).await
    }

    /// As [`Agent::start`], over an existing channel to the aggregator (the simulation's
    /// agents share one HTTP/2 connection; each still signs its own requests).
    pub async fn start_on(
        config: AgentConfig,
        channel: tonic::transport::Channel,
        base: Arc<BaseModel>,
        examples: impl Into<Arc<[Example]>>,
    ) -> anyhow::Result<Agent> {
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating {}", config.state_dir.display()))?;
        let key = load_or_create_key(&config.state_dir)?;
        let mut state = load_state(&config.state_dir)?;
        let device_id = match &state.device_id {
            Some(id) => id.clone(),
            None => {
                let id = client::enroll(
                    channel.clone(),
                    &config.enrollment_token,
                    auth::public_key(&key)?,
                    config.retry,
                )
                .await
                .map_err(|s| anyhow::anyhow!("enrollment refused: {}", s.message()))?;
                state.device_id = Some(id.clone());
                save_state(&config.state_dir, &state)?;
                tracing::info!("enrolled with the aggregator");
                id
            }
        };
        let signer = Arc::new(Signer::new(device_id, &key)?);
        let session = Session::new(channel, signer, config.retry);
        Ok(Agent {
            config,
            base,
            examples: examples.into(),
            session,
            state,
        })
    }

    pub fn device_id(&self) -> Option<&str> {
        self.state.device_id.as_deref()
    }

    /// Checks in, and takes part in rounds, until `shutdown` or `max_rounds`.
    pub async fn run(
        &mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<RunSummary> {
        tokio::pin!(shutdown);
        let mut summary = RunSummary::default();
        loop {
            if self
                .config
                .max_rounds
                .is_some_and(|m| summary.rounds_reported >= m)
            {
                return Ok(summary);
            }
            let wait = tokio::select! {
                _ = &mut shutdown => return Ok(summary),
                r = self.step() => match r {
                    Ok(Step::Reported(_)) => {
                        summary.rounds_reported += 1;
                        Duration::ZERO
                    }
                    Ok(Step::Wait(d)) => d,
                    Ok(Step::Retired(why)) => {
                        summary.retired = Some(why);
                        return Ok(summary);
                    }
                    Err(e) => {
                        summary.tasks_failed += 1;
                        tracing::warn!(error = %format!("{e:#}"), "round attempt failed");
                        self.config.checkin_interval
                    }
                }
            };
            tokio::select! {
                _ = &mut shutdown => return Ok(summary),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One check-in and, if given a task, the whole participation. Without the user's
    /// consent ([`Consent`]) the aggregator is not contacted at all.
    pub async fn step(&mut self) -> anyhow::Result<Step> {
        if !Consent::allows_federation(&self.config.state_dir) {
            tracing::debug!("no consent to federated participation: not checking in");
            return Ok(Step::Wait(self.config.checkin_interval));
        }
        let answer = self
            .session
            .check_in(self.state.last_round)
            .await
            .map_err(|s| anyhow::anyhow!("check-in failed: {} ({:?})", s.message(), s.code()))?;
        let task = match answer {
            CheckIn::Later {
                retry_after,
                reason,
            } => {
                tracing::debug!(reason, "no task");
                return Ok(Step::Wait(retry_after.min(self.config.checkin_interval)));
            }
            CheckIn::Retired { why, message } => {
                tracing::warn!(
                    ?why,
                    message,
                    "the aggregator will give no more work: stopping"
                );
                return Ok(Step::Retired(why));
            }
            CheckIn::Task(t) => t,
        };
        let round = task.round;
        let (update, examples, loss) = self.train(&task).await?;
        if SystemTime::now() > deadline(&task) {
            bail!("round {round}: the deadline passed during training; not uploading");
        }
        if !Consent::allows_federation(&self.config.state_dir) {
            tracing::info!(round, "consent withdrawn during training: not uploading");
            return Ok(Step::Wait(self.config.checkin_interval));
        }
        let upload_bytes = match &update {
            Protected::Plain(update) => {
                self.session
                    .upload(&task, update, examples, loss)
                    .await
                    .map_err(|s| {
                        anyhow::anyhow!("upload refused: {} ({:?})", s.message(), s.code())
                    })?;
                update.bytes().len() as u64
            }
            Protected::Secure(q) => self.secure_upload(&task, q, examples, loss).await?,
        };
        self.state.last_round = round;
        self.state.rounds_reported += 1;
        save_state(&self.config.state_dir, &self.state)?;
        tracing::info!(round, "reported");
        Ok(Step::Reported(Report {
            round,
            train_loss: loss,
            upload_bytes,
            download_bytes: task.adapter_bytes,
        }))
    }

    /// Takes part in the round's secure aggregation with the quantized update: advertise
    /// keys, share mask secrets with the neighbours, send the masked input, reveal shares.
    /// Returns the bytes of the masked input.
    async fn secure_upload(
        &self,
        task: &pb::Task,
        update: &Quantized,
        num_examples: u32,
        train_loss: f32,
    ) -> anyhow::Result<u64> {
        use pb::sec_agg_request::Step as Ask;
        use pb::sec_agg_response::Step as Answer;
        let round = task.round;
        let s = task
            .secure_aggregation
            .context("task without secure aggregation")?;
        let phase = Duration::from_millis(u64::from(s.phase_timeout_ms).max(1000));
        let until_deadline = deadline(task)
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let slack = 2 * phase + Duration::from_secs(10);
        let unexpected = |what: &str| anyhow::anyhow!("secure aggregation: expected {what}");
        let call = |step, wait| async move {
            self.session
                .secure_aggregate(round, step, wait)
                .await
                .map_err(|s| {
                    anyhow::anyhow!(
                        "secure aggregation refused: {} ({:?})",
                        s.message(),
                        s.code()
                    )
                })
        };

        let (mut client, c_pk, s_pk) = secagg::Client::new(round)?;
        let signature = self
            .session
            .signer()
            .sign(&secagg::advert_signing_bytes(round, &c_pk, &s_pk));
        let advert = pb::SecAggAdvertise {
            c_pk: c_pk.to_vec(),
            s_pk: s_pk.to_vec(),
            signature,
        };
        let Answer::Assignment(a) = call(Ask::Advertise(advert), until_deadline + slack).await?
        else {
            return Err(unexpected("an assignment"));
        };
        let assignment = assignment_from(round, &a)?;
        let shares = client.share_keys(&assignment)?;
        let shares = pb::SecAggShares::from(&shares[..]);
        let Answer::SharesForYou(mine) = call(Ask::Shares(shares), slack).await? else {
            return Err(unexpected("shares"));
        };
        let mine = mine.into_shares();
        let masked = client.masked_input(update.values(), mine)?;
        let values = fedpersona_proto::convert::masked_bytes(&masked);
        let bytes = values.len() as u64;
        if !Consent::allows_federation(&self.config.state_dir) {
            bail!("consent withdrawn during secure aggregation: not sending the masked input");
        }
        let masked = pb::SecAggMasked {
            values,
            num_examples,
            train_loss,
        };
        let Answer::Survivors(s) = call(Ask::Masked(masked), slack).await? else {
            return Err(unexpected("the survivors"));
        };
        let reveals = client.unmask(&s.into())?;
        let reveals = pb::SecAggReveals::from(&reveals[..]);
        call(Ask::Reveals(reveals), slack).await?;
        Ok(bytes)
    }

    /// Checks in and, if given a task, walks away from it (a device that goes offline
    /// mid-round: the simulation's dropouts). Returns whether a task was assigned.
    pub async fn check_in_and_drop(&mut self) -> anyhow::Result<bool> {
        let answer = self
            .session
            .check_in(self.state.last_round)
            .await
            .map_err(|s| anyhow::anyhow!("check-in failed: {} ({:?})", s.message(), s.code()))?;
        Ok(matches!(answer, CheckIn::Task(_)))
    }

    /// Downloads θ, adapts it locally, and returns the privatized delta.
    async fn train(&self, task: &pb::Task) -> anyhow::Result<(Protected, u32, f32)> {
        let lora = lora_config(task)?;
        let training = task.training.context("task without training settings")?;
        let bytes = self
            .session
            .download(
                task.adapter_version,
                &task.adapter_sha256,
                task.adapter_bytes,
            )
            .await?;
        let theta =
            fedpersona_model::tensors::from_safetensors(&bytes).context("global adapter")?;
        let base = self.base.clone();
        let examples = Arc::clone(&self.examples);
        let protection = protection_for(task)?;
        let threads = self.config.threads;
        let seed = match self.config.seed {
            Some(s) => s ^ task.round.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            None => rand::random::<u64>(),
        };
        let state_dir = self.config.state_dir.clone();
        tokio::task::spawn_blocking(move || {
            save_global(&state_dir, &base, &lora, &theta)?;
            local_update(
                &base,
                &examples,
                &theta,
                lora,
                &training,
                &protection,
                threads,
                seed,
            )
        })
        .await
        .context("training task panicked")?
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    Reported(Report),
    Wait(Duration),
    /// The aggregator will never give this device work again (checking in is pointless).
    Retired(Retired),
}

/// One accepted report, as the device saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    pub round: u64,
    /// Mean training loss over the local steps.
    pub train_loss: f32,
    pub upload_bytes: u64,
    pub download_bytes: u64,
}

fn deadline(task: &pb::Task) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(task.deadline_unix_ms.max(0) as u64)
}

/// What the task asks of the delta before it leaves: clipping, the privacy mode's noise, and
/// an encoding or (with secure aggregation) the integer grid.
pub fn protection_for(task: &pb::Task) -> anyhow::Result<Protection> {
    let clip_norm = f64::from(task.clip_norm);
    ensure!(
        clip_norm.is_finite() && clip_norm > 0.0,
        "task clip norm must be positive"
    );
    let privacy = task.privacy.unwrap_or_default();
    let z = f64::from(privacy.noise_multiplier);
    let requested = pb::PrivacyMode::try_from(privacy.mode)
        .ok()
        .filter(|m| *m != pb::PrivacyMode::Unspecified)
        .context("task asks for an unknown privacy mode")?;
    if requested != pb::PrivacyMode::None {
        ensure!(
            z.is_finite() && z > 0.0,
            "task asks for DP noise with noise multiplier {z}"
        );
    }
    let secure = task.secure_aggregation.filter(|s| s.enabled);
    if let Some(s) = secure {
        let g = s.granularity;
        ensure!(
            g.is_finite() && g > 0.0 && mode::grid_units(clip_norm, g) >= 1.0,
            "task's secure-aggregation granularity {g} does not fit its clip norm"
        );
        let units = mode::grid_units(clip_norm, g);
        let noise_stddev = match requested {
            pb::PrivacyMode::None | pb::PrivacyMode::Central => 0.0,
            pb::PrivacyMode::Local => mode::local_sigma(z, units),
            pb::PrivacyMode::Distributed => {
                ensure!(
                    privacy.min_reports >= 1,
                    "distributed noise needs min_reports"
                );
                mode::distributed_noise_share(z, units, u64::from(privacy.min_reports))
            }
            pb::PrivacyMode::Unspecified => unreachable!("filtered above"),
        };
        return Ok(Protection::Secure(QuantizationSpec {
            clip_norm,
            granularity: g,
            noise_stddev,
        }));
    }
    let encoding = match pb::Encoding::try_from(task.encoding) {
        Ok(pb::Encoding::F32) => Encoding::F32,
        Ok(pb::Encoding::Q8) => Encoding::Q8,
        _ => bail!("task asks for an unknown update encoding"),
    };
    let noise = match requested {
        pb::PrivacyMode::None | pb::PrivacyMode::Central => DeviceNoise::None,
        pb::PrivacyMode::Local => DeviceNoise::Gaussian {
            stddev: mode::local_sigma(z, clip_norm),
        },
        pb::PrivacyMode::Distributed => {
            bail!("task asks for distributed noise without secure aggregation: refused, the aggregator would see under-noised updates")
        }
        pb::PrivacyMode::Unspecified => unreachable!("filtered above"),
    };
    Ok(Protection::Plain(PrivacySpec {
        clip_norm,
        encoding,
        noise,
    }))
}

/// Keeps the downloaded global adapter in the state folder (`global/`), where the local API's
/// first adaptation starts: written beside it and renamed, so a crash leaves the old one or
/// none, never half of one.
fn save_global(
    state_dir: &Path,
    base: &BaseModel,
    lora: &LoraConfig,
    theta: &AdapterTensors,
) -> anyhow::Result<()> {
    let adapter = LoraAdapter::from_tensors(base.model.config(), lora.clone(), theta, &Device::Cpu)
        .context("the global adapter does not fit this base model")?;
    let dir = state_dir.join(crate::local::GLOBAL_DIR);
    let fresh = dir.with_extension("new");
    let _ = std::fs::remove_dir_all(&fresh);
    adapter.save(&fresh).context("saving the global adapter")?;
    crate::fs::replace_dir(&fresh, &dir)
}

/// The aggregator's assignment, with every neighbour's key advert checked against its
/// enrolled Ed25519 key (a peer whose signature fails is refused, not used).
fn assignment_from(round: u64, a: &pb::SecAggAssignment) -> anyhow::Result<secagg::Assignment> {
    let key = |b: &[u8], what: &str| -> anyhow::Result<[u8; 32]> {
        b.try_into()
            .map_err(|_| anyhow::anyhow!("secure aggregation: {what} must be 32 bytes"))
    };
    let neighbours = a
        .peers
        .iter()
        .map(|p| {
            let (c_pk, s_pk) = (key(&p.c_pk, "c_pk")?, key(&p.s_pk, "s_pk")?);
            let msg = secagg::advert_signing_bytes(round, &c_pk, &s_pk);
            ensure!(
                fedpersona_proto::auth::verify(&p.device_public_key, &msg, &p.signature),
                "secure aggregation: the key advert of neighbour {} is not signed by its device key",
                p.index
            );
            Ok(secagg::KeyAdvert {
                index: p.index,
                c_pk,
                s_pk,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(secagg::Assignment {
        index: a.index,
        params: secagg::Params::new(a.clients, a.neighbours, a.threshold)?,
        vector_len: a.vector_len,
        own: secagg::KeyAdvert {
            index: a.index,
            c_pk: key(&a.own_c_pk, "own c_pk")?,
            s_pk: key(&a.own_s_pk, "own s_pk")?,
        },
        neighbours,
    })
}

fn lora_config(task: &pb::Task) -> anyhow::Result<LoraConfig> {
    let spec = task.lora.as_ref().context("task without adapter spec")?;
    let targets = spec
        .targets
        .iter()
        .map(|t| Target::parse(t).with_context(|| format!("task names unknown target {t:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cfg = LoraConfig {
        rank: spec.rank as usize,
        alpha: f64::from(spec.alpha),
        targets,
        freeze_a: spec.freeze_a,
        seed: spec.seed,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Adapts θ on the user's examples with the task's settings; returns the privatized
/// Δ = φ − θ over the trained tensors, the number of examples and the mean training loss.
#[allow(clippy::too_many_arguments)]
pub fn local_update(
    base: &BaseModel,
    examples: &[Example],
    theta: &AdapterTensors,
    lora: LoraConfig,
    training: &pb::LocalTraining,
    protection: &Protection,
    threads: usize,
    seed: u64,
) -> anyhow::Result<(Protected, u32, f32)> {
    let model_cfg = base.model.config();
    let seq_len = training.seq_len as usize;
    ensure!(
        (2..=model_cfg.max_position_embeddings).contains(&seq_len),
        "task sequence length {seq_len} does not fit the base model"
    );
    ensure!(
        training.steps >= 1 && training.batch_size >= 1,
        "task asks for no training"
    );
    ensure!(
        training.learning_rate.is_finite() && training.learning_rate > 0.0,
        "task learning rate is not positive"
    );
    let adapter = LoraAdapter::from_tensors(model_cfg, lora.clone(), theta, &Device::Cpu)
        .context("the global adapter does not fit this base model")?;
    let windows = crate::adapt::to_windows(base, examples, seq_len)?;
    ensure!(!windows.is_empty(), "no local data to train on");
    let cfg = FitConfig {
        steps: training.steps as usize,
        batch_size: training.batch_size as usize,
        optimizer: TrainConfig {
            lr: f64::from(training.learning_rate),
            weight_decay: f64::from(training.weight_decay),
            max_grad_norm: (training.grad_clip > 0.0).then_some(f64::from(training.grad_clip)),
            ..TrainConfig::default()
        },
        workers: if threads == 0 { 1 } else { threads },
        seed,
    };
    let mut loss_sum = 0.0;
    fit(&base.model, &adapter, &windows, &cfg, |_, s| {
        loss_sum += s.loss
    })?;
    let trained = |n: &str| lora.trains(n);
    let phi = adapter.to_tensors()?.filter(trained);
    let delta = phi.sub(&theta.filter(trained))?;
    let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(seed);
    let update = protect(delta, protection, &mut rng)?;
    Ok((
        update,
        examples.len().min(u32::MAX as usize) as u32,
        (loss_sum / f64::from(training.steps)) as f32,
    ))
}

/// `device-agent run --config FILE`: loads everything, then runs until Ctrl-C, SIGTERM or
/// `schedule.max_rounds`.
pub async fn run_from_config(path: &Path) -> anyhow::Result<RunSummary> {
    let config = AgentConfig::load(path)?;
    let base = BaseModel::load(&config.model_dir, &Device::Cpu)
        .with_context(|| format!("loading base model {}", config.model_dir.display()))?;
    let examples = config.data.load()?;
    let base = Arc::new(base);
    let local = match &config.local_socket {
        Some(socket) => {
            let state = crate::local::LocalState::open(&config.state_dir, base.clone())?;
            let socket = socket.clone();
            tracing::info!(socket = %socket.display(), "local API serving");
            Some(tokio::spawn(async move {
                crate::local::serve(state, Default::default(), &socket, shutdown_signal()).await
            }))
        }
        None => None,
    };
    let mut agent = Agent::start(config, base, examples).await?;
    let summary = agent.run(shutdown_signal()).await;
    if let Some(local) = local {
        // The local API stops with the same signal; when rounds ended by themselves
        // (`max_rounds`) it goes on until then.
        local.await.context("local API task")??;
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(requested: pb::PrivacyMode, z: f32, min_reports: u32, grid: Option<f64>) -> pb::Task {
        pb::Task {
            clip_norm: 1.0,
            privacy: Some(pb::Privacy {
                mode: requested as i32,
                noise_multiplier: z,
                min_reports,
            }),
            secure_aggregation: grid.map(|granularity| pb::SecureAggregation {
                enabled: true,
                granularity,
                phase_timeout_ms: 1000,
            }),
            encoding: pb::Encoding::Q8 as i32,
            ..Default::default()
        }
    }

    fn secure_stddev(requested: pb::PrivacyMode, z: f32, grid: f64) -> f64 {
        match protection_for(&task(requested, z, 95, Some(grid))).unwrap() {
            Protection::Secure(s) => s.noise_stddev,
            p => panic!("expected secure aggregation, got {p:?}"),
        }
    }

    /// The noise each mode asks of the device, against hand-computed values.
    #[test]
    fn each_mode_asks_for_its_noise() {
        // 100 devices, z = 1, m = 95: B = 9,560,370 grid units per clip norm (see `mode`).
        let g = mode::secagg_grid(1.0, 100, 1.0, 95).granularity;
        // Distributed: z·B/√m = 9,560,370/√95 = 980,873.2657924346.
        let share = secure_stddev(pb::PrivacyMode::Distributed, 1.0, g);
        assert!((share - 980_873.265_792_434_6).abs() < 1e-6, "{share}");
        // Local under secure aggregation: the whole z·B on each device.
        let local = secure_stddev(pb::PrivacyMode::Local, 2.0, g);
        assert!((local - 19_120_740.0).abs() < 1e-6, "{local}");
        assert_eq!(secure_stddev(pb::PrivacyMode::Central, 1.0, g), 0.0);
        // Plain uploads: σ = z·C locally, nothing for central noise.
        let plain = |requested, z| match protection_for(&task(requested, z, 0, None)).unwrap() {
            Protection::Plain(s) => s.noise,
            p => panic!("expected a plain upload, got {p:?}"),
        };
        assert_eq!(
            plain(pb::PrivacyMode::Local, 0.5),
            DeviceNoise::Gaussian { stddev: 0.5 }
        );
        assert_eq!(plain(pb::PrivacyMode::Central, 0.5), DeviceNoise::None);
        assert_eq!(plain(pb::PrivacyMode::None, 0.0), DeviceNoise::None);
    }

    /// Tasks that would leave the device under-noised are refused.
    #[test]
    fn under_noised_tasks_are_refused() {
        let g = 1e-6;
        for (t, why) in [
            (
                task(pb::PrivacyMode::Distributed, 1.0, 5, None),
                "without secure aggregation",
            ),
            (
                task(pb::PrivacyMode::Distributed, 1.0, 0, Some(g)),
                "needs min_reports",
            ),
            (
                task(pb::PrivacyMode::Local, 0.0, 0, None),
                "noise multiplier",
            ),
            (
                task(pb::PrivacyMode::Local, 1.0, 0, Some(2.0)),
                "does not fit",
            ),
            (
                task(pb::PrivacyMode::Unspecified, 1.0, 0, None),
                "unknown privacy mode",
            ),
        ] {
            let err = format!("{:#}", protection_for(&t).unwrap_err());
            assert!(err.contains(why), "{err}");
        }
    }
}
