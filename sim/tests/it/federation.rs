//! Real agents against a real aggregator over TLS on 127.0.0.1:0: enrollment, check-ins,
//! downloads, local training, clipped q8 uploads, committed rounds, a moved global adapter,
//! and an agent that restarts without enrolling again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aggregator::config::Config;
use candle_core::Device;
use device_agent::federation::{Agent, AgentConfig};
use fedpersona_model::train::Example;
use fedpersona_model::BaseModel;

const TOKEN: &str = "e2e-enrollment-token-0123456789";

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/model/tests/fixtures/hf-tiny-llama")
}

fn examples(user: usize) -> Vec<Example> {
    (0..12)
        .map(|i| {
            Example::new(
                Some(format!("Question {i} to user {user}?")),
                format!("User {user} answers in their own words, number {i}."),
            )
        })
        .collect()
}

/// A real aggregator over TLS on 127.0.0.1:0, with `sections` (adapter, rounds, training,
/// update) appended to the common server, TLS, enrollment and model settings.
struct Loopback {
    rt: tokio::runtime::Runtime,
    handle: aggregator::server::Handle,
    port: u16,
}

impl Loopback {
    fn start(dir: &Path, sections: &str) -> Loopback {
        let tls = aggregator::tls::generate(&["localhost".into()]).unwrap();
        aggregator::tls::write(&tls, &dir.join("tls")).unwrap();
        let cfg_text = format!(
            r#"
[server]
listen = "127.0.0.1:0"
state_dir = "state"
[tls]
cert = "tls/server.pem"
key = "tls/server.key"
[enrollment]
tokens = ["{TOKEN}"]
[model]
dir = "{}"
{sections}"#,
            model_dir().display()
        );
        let config = Config::parse(&cfg_text, dir).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let handle = aggregator::server::start(config).unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        rt.spawn(aggregator::server::run(
            handle.clone(),
            listener,
            None,
            std::future::pending(),
        ));
        Loopback { rt, handle, port }
    }
}

/// Blocks until the coordinator's view satisfies `until` (30 s at most: then `what`).
fn wait_for(
    rt: &tokio::runtime::Runtime,
    handle: &aggregator::server::Handle,
    until: impl FnMut(&aggregator::round::RoundView) -> bool,
    what: &str,
) {
    let view = handle.coordinator.wait_for(until);
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), view).await })
        .unwrap_or_else(|_| panic!("{what}"));
}

/// Poisson rounds wait out their join window for devices still to draw: once `devices`
/// have joined the open round, no one else will, so its joins close.
async fn close_joins_once(coordinator: Arc<aggregator::round::Coordinator>, devices: u32) {
    coordinator.wait_for(|v| v.joined >= devices).await;
    coordinator.close_joins();
}

/// An agent's config for the aggregator on `port`, state in `dir/state_dir`.
fn agent_config(dir: &Path, port: u16, state_dir: &str, schedule: &str) -> AgentConfig {
    let text = format!(
        r#"
[aggregator]
url = "https://127.0.0.1:{port}"
domain = "localhost"
ca_cert = "tls/ca.pem"
enrollment_token = "{TOKEN}"
[device]
state_dir = "{state_dir}"
data = "unused.jsonl"
[schedule]
checkin_interval_s = 0.05
{schedule}
"#
    );
    AgentConfig::parse(&text, dir).unwrap()
}

#[test]
fn agents_complete_rounds_over_tls_and_move_the_global_adapter() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let Loopback { rt, handle, port } = Loopback::start(
        dir.path(),
        r#"
[adapter]
rank = 4
alpha = 8
targets = ["q_proj", "v_proj"]
[rounds]
cohort_size = 3
min_reports = 2
round_timeout_s = 120
min_task_time_s = 1
retry_after_s = 0.05
max_rounds = 2
[training]
steps = 2
batch_size = 4
seq_len = 32
learning_rate = 0.01
[update]
clip_norm = 0.5
encoding = "q8"
"#,
    );
    let theta0 = handle.coordinator.theta();

    let base = Arc::new(BaseModel::load(&model_dir(), &Device::Cpu).unwrap());
    let agent_config = |i: usize| {
        agent_config(
            dir.path(),
            port,
            &format!("agent-{i}"),
            "backoff_initial_s = 0.05\nmax_rounds = 2",
        )
    };
    let summaries = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..3 {
            let (cfg, base) = (agent_config(i), base.clone());
            tasks.push(tokio::spawn(async move {
                let mut agent = Agent::start(cfg, base, examples(i)).await.unwrap();
                agent.run(std::future::pending()).await.unwrap()
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(
                tokio::time::timeout(Duration::from_secs(60), t)
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        out
    });
    for s in &summaries {
        assert_eq!(s.rounds_reported, 2);
    }
    // Each agent keeps the global adapter it trained from: the local API's starting point.
    for i in 0..3 {
        let global = dir.path().join(format!("agent-{i}")).join("global");
        assert!(global.join("adapter_model.safetensors").is_file());
        assert!(!dir.path().join(format!("agent-{i}/global.new")).exists());
    }
    wait_for(
        &rt,
        &handle,
        |v| v.rounds_committed >= 2,
        "rounds did not commit",
    );
    let view = handle.coordinator.view();
    assert_eq!(
        (view.version, view.phase),
        (2, aggregator::round::RoundPhase::Finished)
    );
    let theta2 = handle.coordinator.theta();
    let moved = {
        let mut d = theta2.theta.clone();
        d.add_scaled(&theta0.theta, -1.0).unwrap();
        d.l2_norm()
    };
    // Two FedAvg steps of clipped updates: moved, and by no more than two clip norms.
    assert!(
        moved > 1e-4 && moved <= 2.0 * 0.5 + 1e-6,
        "θ moved by {moved}"
    );
    let summary = handle.coordinator.store().summary().unwrap();
    assert_eq!((summary.devices, summary.uploads), (3, 6));

    // The key and the id are on disk with mode 0600; a restarted agent does not re-enroll.
    use std::os::unix::fs::PermissionsExt;
    let key = dir.path().join("agent-0/device.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = rt
        .block_on(Agent::start(agent_config(0), base.clone(), examples(0)))
        .unwrap();
    assert!(again.device_id().is_some());
    assert_eq!(handle.coordinator.store().summary().unwrap().devices, 3);
}

#[test]
fn without_consent_nothing_reaches_the_aggregator() {
    let dir = tempfile::tempdir().unwrap();
    let Loopback { rt, handle, port } = Loopback::start(
        dir.path(),
        r#"
[adapter]
rank = 2
alpha = 4
targets = ["q_proj"]
[rounds]
cohort_size = 1
min_reports = 1
round_timeout_s = 120
min_task_time_s = 1
retry_after_s = 0.05
max_rounds = 1
[training]
steps = 1
batch_size = 2
seq_len = 32
"#,
    );
    let agent_cfg = agent_config(dir.path(), port, "agent", "");
    let state = device_agent::fs::StateDir::new(dir.path().join("agent"));
    device_agent::user::consent::Consent::set(&state, false, 1).unwrap();
    let base = Arc::new(BaseModel::load(&model_dir(), &Device::Cpu).unwrap());
    let mut agent = rt
        .block_on(Agent::start(agent_cfg, base, examples(0)))
        .unwrap();
    let metrics = || handle.coordinator.metrics().render();
    for _ in 0..3 {
        let s = rt.block_on(agent.step()).unwrap();
        assert!(
            matches!(s, device_agent::federation::Step::Wait(_)),
            "{s:?}"
        );
    }
    // The check-in counters exist from the start, every one still at 0.
    let text = metrics();
    let checkins: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("fedpersona_checkins_total{"))
        .collect();
    assert_eq!(checkins.len(), 3, "{text}");
    assert!(
        checkins.iter().all(|l| l.ends_with(" 0")),
        "no check-in without consent:\n{text}"
    );
    assert_eq!(handle.coordinator.store().summary().unwrap().uploads, 0);

    // Consent given: the next step takes part and reports.
    device_agent::user::consent::Consent::set(&state, true, 2).unwrap();
    let s = rt.block_on(agent.step()).unwrap();
    assert!(
        matches!(s, device_agent::federation::Step::Reported(_)),
        "{s:?}"
    );
    assert_eq!(handle.coordinator.store().summary().unwrap().uploads, 1);
    let text = metrics();
    assert!(
        text.lines()
            .any(|l| l.starts_with("fedpersona_checkins_total{") && !l.ends_with(" 0")),
        "with consent the device checked in:\n{text}"
    );
}

/// The privacy issue's end-to-end round: four real agents train, clip adaptively, quantize,
/// add their distributed-noise shares and take part in SecAgg+ over TLS; the aggregator
/// unmasks only the sum, commits it, steps the clip norm from the noised count of unclipped
/// devices that travelled inside the masked vectors, and charges the round to its ledger.
#[test]
fn a_secure_round_with_distributed_noise_and_adaptive_clipping_completes_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let Loopback { rt, handle, port } = Loopback::start(
        dir.path(),
        r#"
[adapter]
rank = 2
alpha = 4
targets = ["q_proj", "v_proj"]
[rounds]
sampling = "poisson"
join_window_s = 60
cohort_size = 4
min_reports = 3
round_timeout_s = 120
min_task_time_s = 1
retry_after_s = 0.05
max_rounds = 1
[training]
steps = 1
batch_size = 2
seq_len = 32
[update]
clip_norm = 0.5
[update.adaptive_clipping]
count_stddev = 1.0
initial_clip_norm = 0.3
[privacy]
mode = "distributed"
noise_multiplier = 0.8
population = 4
epsilon_budget = 8
delta = 1e-5
[secure_aggregation]
enabled = true
max_neighbours = 2
phase_timeout_s = 30
"#,
    );
    let theta0 = handle.coordinator.theta();
    let base = Arc::new(BaseModel::load(&model_dir(), &Device::Cpu).unwrap());
    let reports = rt.block_on(async {
        tokio::spawn(close_joins_once(handle.coordinator.clone(), 4));
        let mut tasks = Vec::new();
        for i in 0..4 {
            let cfg = agent_config(dir.path(), port, &format!("agent-{i}"), "max_rounds = 1");
            let base = base.clone();
            tasks.push(tokio::spawn(async move {
                let mut agent = Agent::start(cfg, base, examples(i)).await.unwrap();
                loop {
                    match agent.step().await.unwrap() {
                        device_agent::federation::Step::Reported(r) => return r,
                        device_agent::federation::Step::Wait(d) => tokio::time::sleep(d).await,
                        device_agent::federation::Step::Retired(why) => panic!("retired: {why:?}"),
                    }
                }
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(
                tokio::time::timeout(Duration::from_secs(90), t)
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        out
    });
    let n = handle.coordinator.spec().num_values() as u64;
    for r in &reports {
        assert_eq!(r.upload_bytes, 4 * n, "a masked input is one u32 per value");
    }
    wait_for(
        &rt,
        &handle,
        |v| v.rounds_committed >= 1,
        "the secure round did not commit",
    );
    let summary = handle.coordinator.store().summary().unwrap();
    assert_eq!((summary.rounds_committed, summary.uploads), (1, 4));
    let moved = {
        let mut d = handle.coordinator.theta().theta;
        d.add_scaled(&theta0.theta, -1.0).unwrap();
        d.l2_norm()
    };
    assert!(moved > 0.0, "the unmasked, noised mean moved θ");
    // The noised count moved the clip norm from 0.3, within its ceiling 0.5·√(1 − 0.16)
    // (z = 0.8, σ_b = 1).
    let next = handle
        .coordinator
        .theta()
        .clip_norm
        .expect("adaptive clipping stepped");
    assert!(
        next != 0.3 && next > 0.0 && next <= 0.5 * 0.84f64.sqrt(),
        "{next}"
    );
    // The release as norms: θ moved by the mean (SGD, lr 1); the noise of 4 shares sized for
    // 3 at the round's extended bound C' = 0.3/√0.84, over 4: 0.8·C'·√(4/3)/4 a value,
    // ·√896 (rank 2 on q and v, 2 layers) = 2.26274.
    let release = handle.coordinator.last_release().unwrap();
    assert_eq!(release.round, 1);
    assert!((release.norms.update_norm / moved - 1.0).abs() < 1e-4);
    assert!((release.norms.noise_norm_expected - 2.262_74).abs() < 1e-4);
    let metrics = handle.coordinator.metrics().render();
    assert!(metrics.contains(&format!("fedpersona_round_snr {}", release.norms.snr)));
    let spent = handle.coordinator.privacy_spent().unwrap();
    assert_eq!(spent.rounds_charged, 1);
    let want = fedpersona_privacy::accountant::Method::Rdp
        .epsilon(0.8, 1.0, 1, 1e-5)
        .unwrap();
    assert!((spent.epsilon - want).abs() < 1e-9);
}

/// When the privacy budget cannot pay for another round, the agents' check-ins are refused
/// for good: each `run` ends by itself after the last round it could take part in, and says
/// why, instead of retrying forever.
#[test]
fn agents_stop_when_the_privacy_budget_is_spent() {
    let dir = tempfile::tempdir().unwrap();
    // Both devices join every round (q = 1): the budget pays for one round, not two.
    let (z, q, delta) = (1.0, 1.0, 1e-5);
    let e1 = fedpersona_privacy::accountant::Method::Rdp
        .epsilon(z, q, 1, delta)
        .unwrap();
    let e2 = fedpersona_privacy::accountant::Method::Rdp
        .epsilon(z, q, 2, delta)
        .unwrap();
    let budget = (e1 + e2) / 2.0;
    let Loopback { rt, handle, port } = Loopback::start(
        dir.path(),
        &format!(
            r#"
[adapter]
rank = 4
alpha = 8
targets = ["q_proj", "v_proj"]
[rounds]
sampling = "poisson"
join_window_s = 60
cohort_size = 2
min_reports = 2
round_timeout_s = 120
min_task_time_s = 1
retry_after_s = 0.05
[training]
steps = 2
batch_size = 4
seq_len = 32
[update]
clip_norm = 0.01
encoding = "f32"
[privacy]
mode = "central"
noise_multiplier = {z}
population = 2
epsilon_budget = {budget}
delta = {delta}
allow_low_snr = true
"#
        ),
    );
    let base = Arc::new(BaseModel::load(&model_dir(), &Device::Cpu).unwrap());
    let summaries = rt.block_on(async {
        tokio::spawn(close_joins_once(handle.coordinator.clone(), 2));
        let mut tasks = Vec::new();
        for i in 0..2 {
            let cfg = agent_config(
                dir.path(),
                port,
                &format!("agent-{i}"),
                "backoff_initial_s = 0.05",
            );
            let base = base.clone();
            tasks.push(tokio::spawn(async move {
                let mut agent = Agent::start(cfg, base, examples(i)).await.unwrap();
                agent.run(std::future::pending()).await.unwrap()
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(
                tokio::time::timeout(Duration::from_secs(60), t)
                    .await
                    .expect("the agent stopped by itself")
                    .unwrap(),
            );
        }
        out
    });
    for s in &summaries {
        assert_eq!(s.rounds_reported, 1, "{s:?}");
        assert_eq!(
            s.retired,
            Some(device_agent::federation::client::Retired::PrivacyBudgetExhausted),
            "{s:?}"
        );
    }
    assert_eq!(
        handle.coordinator.view().phase,
        aggregator::round::RoundPhase::BudgetExhausted
    );
    assert_eq!(handle.coordinator.metrics().rejects("privacy_budget"), 2);
}
