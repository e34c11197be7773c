//! One federation of a simulation: the real aggregator (its config file, journal, gRPC server
//! with TLS on 127.0.0.1) and one real [`Agent`] per training user, all sharing the frozen
//! base model. Each round the simulation plays device availability: it picks the round's
//! devices by seed, some of which take the task and vanish (dropouts), and runs the others'
//! whole participation (check-in, download, local training, clipped upload), as many at a
//! time as there are cores.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::corpus::UserSplit;
use aggregator::config::file::{
    AdapterFile, AdaptiveClippingFile, ConfigFile, EnrollmentFile, MetaFile, ModelFile,
    PrivacyFile, RoundsFile, SamplingFile, SecAggFile, ServerFile, TlsFile, TrainingFile,
    UpdateFile,
};
use aggregator::round::Coordinator;
use anyhow::{bail, Context};
use fedpersona_model::BaseModel;
use fedpersona_privacy::{sampling, AdapterTensors};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;

use crate::report::RoundRecord;
use crate::settings::{FederationSpec, ResolvedPrivacy};
use device_agent::federation::client::{Connection, Retry};
use device_agent::federation::{Agent, AgentConfig, Joined, Report, Step};

/// The share of rounds a federation may lose for too few reports: sets `min_reports`.
const MISSED_ROUNDS: f64 = 0.05;
/// Adaptive clipping's count noise per expected device (Andrew et al.'s m/20).
const COUNT_STDDEV_PER_DEVICE: f64 = 0.05;
/// How far adaptive clipping may raise the clip norm above its start.
const ADAPTIVE_CLIP_HEADROOM: f64 = 10.0;
/// A round's deadline: the simulation closes rounds itself, so only a backstop.
const ROUND_TIMEOUT_S: f64 = 86_400.0;

/// The runtime of the in-process aggregator and agents. Local training runs on blocking
/// threads: as many as train at once (plus one for the aggregator's round close), so each
/// keeps its allocator cache warm and no more.
pub fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(workers + 1)
        .enable_all()
        .build()?)
}

/// What the federations of a run share.
#[derive(Debug, Clone)]
pub struct Env {
    pub base: Arc<BaseModel>,
    pub base_dir: PathBuf,
    /// `ca.pem`, `server.pem`, `server.key` of this run.
    pub tls_dir: PathBuf,
    pub stop: Arc<AtomicBool>,
    /// Devices training at once (one core each).
    pub workers: usize,
}

/// A running federation.
#[derive(Debug)]
pub struct Federation {
    pub spec: FederationSpec,
    /// The noise multiplier and budget the aggregator runs with (None without DP).
    pub privacy: Option<ResolvedPrivacy>,
    coordinator: Arc<Coordinator>,
    agents: Vec<Option<Agent>>,
    rng: rand_chacha::ChaCha20Rng,
    stop_server: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    env: Env,
}

/// The simulation was stopped (Ctrl-C).
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

impl Federation {
    /// Writes the aggregator's config into `dir`, starts it on a free loopback port, and
    /// enrolls one agent per user (state in `dir/agents/N`).
    pub fn start(
        rt: &Runtime,
        spec: FederationSpec,
        env: &Env,
        users: &[UserSplit],
        dir: &Path,
        on_enrolled: impl Fn() + Send + Sync + 'static,
    ) -> anyhow::Result<Federation> {
        if users.is_empty() {
            bail!("no training users");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let token = hex::encode(rand::random::<[u8; 24]>());
        let config_path = dir.join("aggregator.toml");
        let privacy = spec.privacy.resolve(&spec, users.len())?;
        let file = aggregator_config(&spec, env, &token, users.len(), privacy)?;
        let toml = format!(
            "# Written by `fedpersona-sim simulate` for the {} federation of this run.\n{}",
            spec.kind.name(),
            toml::to_string(&file).context("writing the aggregator's config")?
        );
        fedpersona_model::checkpoint::write_atomic(&config_path, toml.as_bytes())?;
        aggregator::tls::set_private(&config_path)?;
        let config = aggregator::config::Config::load(&config_path)?;
        let handle = aggregator::server::start(config)?;
        let coordinator = handle.coordinator.clone();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .context("binding a loopback port")?;
        let port = listener.local_addr()?.port();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(aggregator::server::run(handle, listener, None, async {
            let _ = stop_rx.await;
        }));

        let connection = Connection {
            url: format!("https://127.0.0.1:{port}"),
            ca_pem: Some(
                std::fs::read(env.tls_dir.join("ca.pem")).context("reading the run's CA")?,
            ),
            domain: Some("localhost".into()),
        };
        let channel = {
            let _in_runtime = rt.enter();
            device_agent::federation::client::channel(&connection)?
        };
        let on_enrolled = Arc::new(on_enrolled);
        let agents = rt.block_on(async {
            let limit = Arc::new(Semaphore::new(32));
            let mut tasks = Vec::with_capacity(users.len());
            for (i, user) in users.iter().enumerate() {
                let config = AgentConfig {
                    connection: connection.clone(),
                    enrollment_token: token.clone(),
                    state_dir: device_agent::fs::StateDir::new(
                        dir.join("agents").join(i.to_string()),
                    ),
                    model_dir: env.base_dir.clone(),
                    data: device_agent::dataset::DataArgs {
                        data: PathBuf::from("(simulated user)"),
                        user: None,
                    },
                    threads: 1,
                    checkin_interval: Duration::from_millis(50),
                    retry: Retry {
                        max_attempts: 5,
                        initial: Duration::from_millis(50),
                        max: Duration::from_secs(2),
                    },
                    max_rounds: None,
                    seed: Some(spec.seed ^ (i as u64).wrapping_mul(0xa076_1d64_78bd_642f)),
                    local_socket: None,
                };
                let (channel, base, limit, tick) = (
                    channel.clone(),
                    env.base.clone(),
                    limit.clone(),
                    on_enrolled.clone(),
                );
                let examples = user.train.clone();
                tasks.push(tokio::spawn(async move {
                    let _permit = limit.acquire_owned().await?;
                    let agent = Agent::start_on(config, channel, base, examples).await?;
                    tick();
                    anyhow::Ok(agent)
                }));
            }
            let mut agents = Vec::with_capacity(tasks.len());
            for t in tasks {
                agents.push(Some(t.await.context("enrollment task")??));
            }
            anyhow::Ok(agents)
        })?;
        let seed = spec.seed;
        Ok(Federation {
            spec,
            privacy,
            coordinator,
            agents,
            rng: rand_chacha::ChaCha20Rng::seed_from_u64(seed ^ 0x5eed_f00d),
            stop_server: Some(stop_tx),
            server: Some(server),
            env: env.clone(),
        })
    }

    /// Whether the aggregator refuses further rounds for its privacy budget.
    pub fn budget_exhausted(&self) -> bool {
        self.coordinator.view().phase == aggregator::round::RoundPhase::BudgetExhausted
    }

    /// ε spent by the rounds charged so far (None without DP).
    pub fn epsilon_spent(&self) -> Option<f64> {
        self.coordinator.privacy_spent().map(|p| p.epsilon)
    }

    /// The expected signal-to-noise ratio of a round, from the aggregator's config (None
    /// without DP).
    pub fn expected_snr(&self) -> Option<f64> {
        self.coordinator.config().expected_snr()
    }

    /// The server's current global adapter θ.
    pub fn theta(&self) -> AdapterTensors {
        self.coordinator.theta().theta
    }

    /// Runs one round to its end (committed or abandoned).
    pub fn round(&mut self, rt: &Runtime) -> anyhow::Result<RoundRecord> {
        let started = Instant::now();
        let view = self.coordinator.view();
        if view.phase == aggregator::round::RoundPhase::Finished {
            bail!("the federation has run all its rounds");
        }
        let round = view.round;
        let committed_before = view.rounds_committed;
        let rejects_before = self.coordinator.metrics().rejects_total();
        // Device availability: every device checks in, in a seeded order, and draws on
        // the device whether it takes part (Poisson sampling); a device drawn in drops with
        // the set chance (takes the task and vanishes).
        let mut order: Vec<usize> = (0..self.agents.len()).collect();
        order.shuffle(&mut self.rng);
        let dropout = self.spec.dropout;
        let outcome = rt.block_on(async {
            let (mut live, mut drops) = (Vec::new(), 0u32);
            for i in order {
                let agent = self.agents[i].as_mut().expect("agents are returned");
                if let Joined::Task(task) = agent.join().await? {
                    if self.rng.random::<f64>() < dropout {
                        drops += 1;
                    } else {
                        live.push((i, task));
                    }
                }
            }
            // Every device has drawn: no one else joins this round.
            self.coordinator.close_joins();
            let joined = live.len() + drops as usize;
            // Secure aggregation needs every live device in its phases at once (each waits
            // for the others); otherwise as many train at a time as there are workers.
            let secure = self.spec.privacy.secure_aggregation;
            if secure && drops > 0 {
                // The devices that vanished never advertise keys: once the live ones have,
                // advertising closes without them.
                let (coordinator, adverts) = (self.coordinator.clone(), live.len() as u32);
                tokio::spawn(async move {
                    let v = coordinator
                        .wait_for(|v| v.round != round || v.adverts >= adverts)
                        .await;
                    if v.round == round {
                        coordinator.close_advertising(round);
                    }
                });
            }
            let permits = if secure { live.len() } else { self.env.workers };
            let limit = Arc::new(Semaphore::new(permits.max(1)));
            let mut tasks = Vec::new();
            for (i, task) in live {
                let mut agent = self.agents[i].take().expect("agents are returned");
                let (limit, coordinator) = (limit.clone(), self.coordinator.clone());
                tasks.push(tokio::spawn(async move {
                    let _permit = limit.acquire_owned().await;
                    let r = match agent.take_part(task).await {
                        Ok(Step::Reported(rep)) => Ok(Some(rep)),
                        Ok(_) => Ok(None),
                        Err(e) => Err(e),
                    };
                    if secure && !matches!(r, Ok(Some(_))) {
                        // The others wait in a phase for this device: close it now.
                        coordinator.close_early();
                    }
                    (i, agent, r)
                }));
            }
            let mut reports: Vec<Report> = Vec::new();
            let mut failures = 0usize;
            let all = async {
                let mut back = Vec::new();
                for t in tasks {
                    back.push(t.await);
                }
                back
            };
            let stop = self.env.stop.clone();
            let stopped = async move {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            tokio::select! {
                back = all => {
                    for b in back {
                        let (i, agent, r) = b.context("a device task panicked")?;
                        self.agents[i] = Some(agent);
                        match r {
                            Ok(Some(rep)) => reports.push(rep),
                            Ok(None) => failures += 1,
                            Err(e) => {
                                failures += 1;
                                tracing::warn!(error = %format!("{e:#}"), "a simulated device failed its task");
                            }
                        }
                    }
                }
                _ = stopped => return Err(Interrupted.into()),
            }
            // Every live device has answered: close the round now if it has not closed
            // itself (some devices failed), instead of waiting for the deadline.
            if failures > 0 || reports.len() < joined {
                self.coordinator.close_early();
            }
            let closed = self.coordinator.wait_for(|v| {
                v.round != round || v.phase == aggregator::round::RoundPhase::Finished
            });
            if tokio::time::timeout(Duration::from_secs(600), closed).await.is_err() {
                bail!("round {round} did not close");
            }
            anyhow::Ok((reports, drops))
        })?;
        let (reports, drops) = outcome;
        let committed = self.coordinator.view().rounds_committed > committed_before;
        let release = self
            .coordinator
            .last_release()
            .filter(|r| committed && r.round == round)
            .map(|r| r.norms);
        let private = self.privacy.is_some();
        let loss = (!reports.is_empty()).then(|| {
            reports.iter().map(|r| f64::from(r.train_loss)).sum::<f64>() / reports.len() as f64
        });
        let mut norms: Vec<f64> = reports.iter().map(|r| r.norm_before_clip).collect();
        norms.sort_by(f64::total_cmp);
        let clipped = reports
            .iter()
            .filter(|r| r.norm_before_clip > r.clip_norm)
            .count();
        Ok(RoundRecord {
            federation: self.spec.kind,
            round,
            committed,
            reports: reports.len() as u32,
            drops,
            rejects: self.coordinator.metrics().rejects_total() - rejects_before,
            train_loss: loss,
            epsilon_spent: self.coordinator.privacy_spent().map(|p| p.epsilon),
            seconds: started.elapsed().as_secs_f64(),
            upload_bytes: reports.iter().map(|r| r.upload_bytes).sum(),
            download_bytes: reports.iter().map(|r| r.download_bytes).sum(),
            monitor_accuracy: None,
            update_norm: release.map(|n| n.update_norm),
            noise_norm_expected: release.filter(|_| private).map(|n| n.noise_norm_expected),
            snr: release.filter(|_| private).map(|n| n.snr),
            clip_norm: reports.first().map(|r| r.clip_norm),
            median_norm_before_clip: (!norms.is_empty()).then(|| norms[norms.len() / 2]),
            clipped_share: (!reports.is_empty()).then(|| clipped as f64 / reports.len() as f64),
        })
    }

    /// Stops the server and waits for it.
    pub fn shutdown(mut self, rt: &Runtime) -> anyhow::Result<()> {
        if let Some(tx) = self.stop_server.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            rt.block_on(server).context("aggregator task")??;
        }
        Ok(())
    }
}

/// The aggregator's config for a federation, as an operator would write it.
fn aggregator_config(
    spec: &FederationSpec,
    env: &Env,
    token: &str,
    users: usize,
    privacy: Option<ResolvedPrivacy>,
) -> anyhow::Result<ConfigFile> {
    let cohort = spec.cohort(users);
    // Reports are binomial (Poisson sampling, then dropouts): a round needs as many as all
    // but one round in twenty reach. Distributed noise is sized for that many.
    let reporting = spec.sampling_rate(users) * (1.0 - spec.dropout);
    let min_reports = (sampling::lower_quantile(users as u64, reporting, MISSED_ROUNDS) as usize)
        .clamp(1, cohort);
    // Absolute: the aggregator resolves relative paths against its config file's folder.
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut file = ConfigFile::new(
        ServerFile::new(([127, 0, 0, 1], 0).into(), "state"),
        TlsFile::files(
            absolute(&env.tls_dir.join("server.pem")),
            absolute(&env.tls_dir.join("server.key")),
        ),
        EnrollmentFile::tokens(vec![token.to_string()]),
        ModelFile {
            dir: absolute(&env.base_dir),
        },
        RoundsFile::new(cohort.try_into()?, min_reports.try_into()?, ROUND_TIMEOUT_S),
    );
    file.server.keep_versions = 2;
    file.adapter = AdapterFile {
        rank: spec.lora.rank,
        alpha: spec.lora.alpha,
        targets: spec.lora.targets.iter().map(|t| t.name().into()).collect(),
        freeze_a: spec.lora.freeze_a,
        seed: spec.lora.seed,
    };
    file.rounds = RoundsFile {
        sampling: SamplingFile::Poisson,
        // The simulation closes joins itself once every device has drawn.
        join_window_s: Some(ROUND_TIMEOUT_S / 2.0),
        min_task_time_s: 1.0,
        retry_after_s: 0.05,
        max_rounds: spec.rounds,
        ..file.rounds
    };
    file.training = TrainingFile {
        steps: spec.local_steps,
        learning_rate: spec.lr,
        batch_size: spec.batch_size,
        seq_len: spec.seq_len,
        grad_clip: 1.0,
        ..file.training
    };
    file.update = if spec.adaptive_clip {
        // The ceiling bounds the extended update (and sizes a SecAgg grid): room to grow.
        UpdateFile {
            clip_norm: ADAPTIVE_CLIP_HEADROOM * spec.clip_norm,
            encoding: "q8".into(),
            adaptive_clipping: Some(AdaptiveClippingFile {
                initial_clip_norm: Some(spec.clip_norm),
                // Andrew et al.'s m/20, but at least z: a small cohort's count noise could
                // not carry the split, and at σ_b ≥ z the update's own noise rises by at
                // most 1/√(1 − 1/4), 15%.
                count_stddev: Some(
                    (COUNT_STDDEV_PER_DEVICE * cohort as f64)
                        .max(privacy.map_or(0.0, |p| p.noise_multiplier)),
                ),
                ..AdaptiveClippingFile::default()
            }),
            ..file.update
        }
    } else {
        UpdateFile {
            clip_norm: spec.clip_norm,
            encoding: "q8".into(),
            ..file.update
        }
    };
    file.meta = MetaFile {
        optimizer: spec.server.optimizer.into(),
        server_lr: spec.server.lr,
        momentum: spec.server.momentum,
        ..file.meta
    };
    if let Some(p) = privacy {
        file.privacy = PrivacyFile {
            mode: spec.privacy.mode.name().into(),
            noise_multiplier: p.noise_multiplier,
            epsilon_budget: p.epsilon_budget,
            delta: spec.privacy.delta,
            accountant: spec.privacy.accountant,
            // The simulation measures what DP costs, also where the noise drowns the signal
            // (the default private run's rounds have an expected SNR of 0.04): its report
            // gives the expected and measured SNR.
            allow_low_snr: true,
            ..file.privacy
        };
    }
    // Poisson sampling's q = cohort / population, with or without DP.
    file.privacy.population = users as u64;
    if spec.privacy.secure_aggregation {
        file.secure_aggregation = SecAggFile {
            enabled: true,
            max_neighbours: 20,
            phase_timeout_s: 120.0,
        };
    }
    Ok(file)
}
