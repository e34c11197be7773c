//! `device-agent run`: the federated participant. Enrolls once (Ed25519 key and device id in
//! the state folder, mode 0600), checks in on a schedule, and for each task downloads the
//! global adapter, adapts it on the user's own data, and uploads the clipped, encoded delta.
//! Survives its own restart: credentials and the last round it reported are on disk.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use candle_core::Device;
use fedpersona_model::train::Example;
use fedpersona_model::{BaseModel, LoraAdapter, LoraConfig};
use fedpersona_privacy::protect::{Protected, Quantized};
use fedpersona_privacy::tensors::AdapterTensors;
use fedpersona_privacy::{sampling, secagg};
use fedpersona_proto::auth::{self, Signer};
use fedpersona_proto::v1 as pb;
use rand::SeedableRng;
use serde::Serialize;

use crate::federation::client::{self, CheckIn, Retired, Session};
use crate::federation::config::AgentConfig;
use crate::federation::credentials::{
    load_or_create_key, load_state, save_state, AgentState, Draw,
};
use crate::federation::task::{
    adaptive_clip_for, assignment_from, deadline, local_update, lora_config, protection_for,
    LocalUpdate, Training,
};
use crate::fs::StateDir;
use crate::shutdown::shutdown_signal;
use crate::user::consent::Consent;

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
        config.state_dir.create()?;
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
        match self.join().await? {
            Joined::Task(task) => self.take_part(task).await,
            Joined::Wait(d) => Ok(Step::Wait(d)),
            Joined::Retired(why) => Ok(Step::Retired(why)),
        }
    }

    /// Checks in and, where the round samples its devices, draws whether to take part
    /// (once per round: the draw is on disk before the device acts on it), joining at once
    /// if drawn in. Without consent the aggregator is not contacted.
    pub async fn join(&mut self) -> anyhow::Result<Joined> {
        if !Consent::allows_federation(&self.config.state_dir) {
            tracing::debug!("no consent to federated participation: not checking in");
            return Ok(Joined::Wait(self.config.checkin_interval));
        }
        let mut sampled_round = 0;
        loop {
            let answer = self
                .session
                .check_in(self.state.last_round, sampled_round)
                .await
                .map_err(|s| {
                    anyhow::anyhow!("check-in failed: {} ({:?})", s.message(), s.code())
                })?;
            return Ok(match answer {
                CheckIn::Task(t) => Joined::Task(t),
                CheckIn::Later {
                    retry_after,
                    reason,
                } => {
                    tracing::debug!(reason, "no task");
                    Joined::Wait(retry_after.min(self.config.checkin_interval))
                }
                CheckIn::Retired { why, message } => {
                    tracing::warn!(
                        ?why,
                        message,
                        "the aggregator will give no more work: stopping"
                    );
                    Joined::Retired(why)
                }
                CheckIn::Sample {
                    round,
                    rate,
                    retry_after,
                } => {
                    // A second request to draw for the round drawn in: the aggregator no
                    // longer takes it (e.g. joins just closed); sit it out.
                    if sampled_round != round && self.drawn_in(round, rate)? {
                        sampled_round = round;
                        continue;
                    }
                    Joined::Wait(retry_after.min(self.config.checkin_interval))
                }
            });
        }
    }

    /// This device's draw for `round` at `rate`: the one on disk if it drew for the round
    /// before, else a fresh one, saved before it is used. From the operating system's
    /// generator, or with a fixed seed (the simulation) from ChaCha20 keyed by the seed and
    /// the round.
    fn drawn_in(&mut self, round: u64, rate: f64) -> anyhow::Result<bool> {
        if let Some(d) = self.state.draw.filter(|d| d.round == round) {
            return Ok(d.joined);
        }
        let joined = match self.config.seed {
            Some(s) => {
                let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(
                    s ^ round.wrapping_mul(0xd1b5_4a32_d192_ed03),
                );
                sampling::draw(rate, &mut rng)
            }
            None => sampling::draw(rate, &mut rand::rng()),
        }
        .with_context(|| format!("the aggregator asked for a sampling rate of {rate}"))?;
        self.state.draw = Some(Draw { round, joined });
        save_state(&self.config.state_dir, &self.state)?;
        tracing::debug!(round, joined, "drew participation");
        Ok(joined)
    }

    /// The whole participation in an assigned round: download, train, upload.
    pub async fn take_part(&mut self, task: pb::Task) -> anyhow::Result<Step> {
        let round = task.round;
        let LocalUpdate {
            update,
            examples,
            loss,
            norm_before_clip,
        } = self.train(&task).await?;
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
            norm_before_clip,
            clip_norm: f64::from(task.clip_norm),
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

    /// Downloads θ, adapts it locally, and returns the privatized delta.
    async fn train(&self, task: &pb::Task) -> anyhow::Result<LocalUpdate> {
        let lora = lora_config(task)?;
        let training = Training::try_from(task.training.as_ref())?;
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
        let clip = adaptive_clip_for(task)?;
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
                clip,
                threads,
                seed,
            )
        })
        .await
        .context("training task panicked")?
    }
}

/// What a check-in came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Joined {
    Task(pb::Task),
    Wait(Duration),
    Retired(Retired),
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
    /// L2 norm of the delta before clipping, and the clip norm it was clipped to: stay on
    /// the device (the simulation reads them to report how much clipping cut).
    pub norm_before_clip: f64,
    pub clip_norm: f64,
    pub upload_bytes: u64,
    pub download_bytes: u64,
}

/// Keeps the downloaded global adapter in the state folder (`global/`), where the local API's
/// first adaptation starts: written beside it and renamed, so a crash leaves the old one or
/// none, never half of one.
fn save_global(
    state_dir: &StateDir,
    base: &BaseModel,
    lora: &LoraConfig,
    theta: &AdapterTensors,
) -> anyhow::Result<()> {
    let adapter = LoraAdapter::from_tensors(base.model.config(), lora.clone(), theta, &Device::Cpu)
        .context("the global adapter does not fit this base model")?;
    let fresh = state_dir.global_fresh();
    let _ = std::fs::remove_dir_all(&fresh);
    adapter.save(&fresh).context("saving the global adapter")?;
    crate::fs::restrict(&fresh)?;
    crate::fs::replace_dir(&fresh, &state_dir.global())
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
            let state = crate::local::LocalState::open(config.state_dir.clone(), base.clone())?;
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
