//! The local API end to end through its real Unix socket: logging, feedback, profile,
//! export, generation, consent and forgetting, with the store's files checked on disk.

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use device_agent::fs::StateDir;
use device_agent::local::{self, LocalState};
use device_agent::user::consent::Consent;
use fedpersona_model::BaseModel;
use fedpersona_proto::local as pb;
use tonic::Code;

use crate::{bin, fixture};

const CANARY: &str = "canary-local-api-51e9";

/// Every byte of the store's files (database, WAL, shared memory).
fn store_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for f in [
        "interactions.sqlite",
        "interactions.sqlite-wal",
        "interactions.sqlite-shm",
    ] {
        if let Ok(b) = std::fs::read(dir.join(f)) {
            out.extend(b);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn rated(kind: pb::FeedbackKind, rating: u32) -> Option<pb::FeedbackValue> {
    Some(pb::FeedbackValue {
        kind: kind as i32,
        rating,
    })
}

#[test]
fn the_local_api_works_end_to_end_over_its_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("agent");
    let socket = dir.path().join("local.sock");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let base = Arc::new(BaseModel::load(&fixture(), &Device::Cpu).unwrap());
    let local_state = LocalState::open(StateDir::new(&state), base).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // Bound before it serves: the socket exists once `bind` returns.
    let bound = {
        let _rt = rt.enter();
        local::bind(local_state, local::Schedule::default(), &socket).unwrap()
    };
    let server = rt.spawn(bound.serve(async move {
        let _ = stopped.await;
    }));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600,
        "only the user's own processes may connect"
    );
    // Pretend the device has enrolled in a federation.
    std::fs::write(state.join("device.key"), b"key").unwrap();
    std::fs::write(state.join("agent.json"), b"{}").unwrap();

    rt.block_on(async {
        let mut c = local::connect(&socket).await.unwrap();
        let mut ids = Vec::new();
        for (i, fb) in [
            (0, rated(pb::FeedbackKind::Accepted, 0)),
            (1, rated(pb::FeedbackKind::Rejected, 0)),
            (2, None),
        ] {
            let r = c
                .log_interaction(pb::LogInteractionRequest {
                    time_ms: 0,
                    context: Some(format!("the question {i}")),
                    suggestion: Some(format!("a suggestion {i}")),
                    text: format!("{CANARY} what the user wrote {i}"),
                    feedback: fb,
                    app: "mail".into(),
                    kind: "reply".into(),
                })
                .await
                .unwrap();
            ids.push(r.into_inner().id);
        }
        c.feedback(pb::FeedbackRequest {
            id: ids[2],
            feedback: rated(pb::FeedbackKind::Rating, 4),
        })
        .await
        .unwrap();

        // Bad input is refused and changes nothing.
        let bad = c
            .feedback(pb::FeedbackRequest {
                id: ids[0],
                feedback: rated(pb::FeedbackKind::Rating, 9),
            })
            .await
            .unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument);
        let unknown = c
            .feedback(pb::FeedbackRequest {
                id: 9999,
                feedback: rated(pb::FeedbackKind::Accepted, 0),
            })
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), Code::InvalidArgument);
        let empty = c
            .log_interaction(pb::LogInteractionRequest {
                text: String::new(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(empty.code(), Code::InvalidArgument);

        let profile: serde_json::Value = serde_json::from_str(
            &c.get_profile(pb::GetProfileRequest {})
                .await
                .unwrap()
                .into_inner()
                .json,
        )
        .unwrap();
        assert_eq!(profile["interactions"], 3);
        assert_eq!(profile["ratings"], 1);
        assert_eq!(profile["context_mix"]["mail/reply"], 3);

        // Export returns everything, decrypted.
        let export: serde_json::Value = serde_json::from_str(
            &c.export(pb::ExportRequest {})
                .await
                .unwrap()
                .into_inner()
                .json,
        )
        .unwrap();
        let items = export["interactions"].as_array().unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0]["text"], format!("{CANARY} what the user wrote 0"));
        assert_eq!(items[0]["context"], "the question 0");
        assert_eq!(items[0]["suggestion"], "a suggestion 0");
        assert_eq!(items[2]["feedback"]["value"], 4);
        assert_eq!(export["enrolled_in_federation"], true);
        assert_eq!(export["profile"]["interactions"], 3);

        // Generation streams the continuation.
        let mut stream = c
            .generate(pb::GenerateRequest {
                prompt: "To be".into(),
                max_tokens: 8,
                temperature: 0.0,
                top_p: 0.0,
                seed: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut pieces = 0;
        while let Some(chunk) = stream.message().await.unwrap() {
            assert!(!chunk.text.is_empty());
            pieces += 1;
        }
        assert!(pieces <= 8);
        let refused = c
            .generate(pb::GenerateRequest {
                prompt: "x".into(),
                max_tokens: 0,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);

        // Consent off is recorded where the federation loop reads it.
        let r = c
            .set_consent(pb::SetConsentRequest { federated: false })
            .await
            .unwrap()
            .into_inner();
        assert!(!r.federated);
        assert!(!Consent::allows_federation(&StateDir::new(&state)));
    });

    // Encryption at rest: the canary is nowhere in the store's files.
    assert!(!contains(&store_bytes(&state), CANARY));

    // The command-line client talks to the same socket.
    let o = bin()
        .args(["local", "log", "--socket"])
        .arg(&socket)
        .args([
            "--text",
            &format!("{CANARY} from the cli"),
            "--feedback",
            "edited",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = bin()
        .args(["local", "profile", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let profile: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(profile["interactions"], 4);

    // Forget leaves nothing readable, and leaving the federation removes its credentials.
    std::fs::create_dir_all(state.join("personal")).unwrap();
    std::fs::write(state.join("personal/adapter_config.json"), b"{}").unwrap();
    rt.block_on(async {
        let mut c = local::connect(&socket).await.unwrap();
        let r = c
            .forget(pb::ForgetRequest {
                leave_federation: true,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.interactions_erased, 4);
        assert!(r.adapter_erased && r.left_federation);
        let export: serde_json::Value = serde_json::from_str(
            &c.export(pb::ExportRequest {})
                .await
                .unwrap()
                .into_inner()
                .json,
        )
        .unwrap();
        assert!(export["interactions"].as_array().unwrap().is_empty());
        assert_eq!(export["enrolled_in_federation"], false);
        assert_eq!(export["consent"]["federated"], false);
    });
    assert!(!state.join("personal").exists());
    assert!(!state.join("device.key").exists() && !state.join("agent.json").exists());
    assert!(!contains(&store_bytes(&state), "from the cli"));
    assert!(!contains(&store_bytes(&state), CANARY));

    let _ = stop.send(());
    rt.block_on(server).unwrap().unwrap();
    assert!(!socket.exists(), "the socket is removed at shutdown");
}

/// The schedule trains the personal adapter once enough interactions arrived and the API is
/// idle, and `Generate` then uses it once the never-harm check finds it better than base on
/// the newest interactions (30 of one habit: 3 held out).
#[test]
fn the_personal_adapter_is_trained_when_due() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let base = Arc::new(BaseModel::load(&fixture(), &Device::Cpu).unwrap());
    let state = Arc::new(LocalState::open(StateDir::new(dir.path()), base).unwrap());
    let schedule = local::Schedule {
        min_new: 30,
        idle_s: 0.0,
        check_s: 1.0,
        time_budget_s: 60.0,
        max_batch_tokens: 128,
    };
    for i in 0..29 {
        state
            .log_note(
                &format!("I would say {i} things my way."),
                Some("What now?"),
            )
            .unwrap();
    }
    assert!(
        rt.block_on(state.adapt_if_due(&schedule))
            .unwrap()
            .is_none(),
        "29 < 30 new"
    );
    state
        .log_note("I would say 29 things my way.", Some("What now?"))
        .unwrap();
    let out = rt
        .block_on(state.adapt_if_due(&schedule))
        .unwrap()
        .expect("due: 30 new interactions, idle");
    assert!(out.finished && out.steps >= 1);
    assert!(dir.path().join("personal/adapter_config.json").exists());
    assert!(!dir.path().join("personal.progress").exists());
    assert!(
        rt.block_on(state.adapt_if_due(&schedule))
            .unwrap()
            .is_none(),
        "nothing new since"
    );
    let busy = local::Schedule {
        idle_s: 3600.0,
        min_new: 1,
        ..schedule
    };
    state.log_note("Another.", None).unwrap();
    assert!(
        rt.block_on(state.adapt_if_due(&busy)).unwrap().is_none(),
        "not while apps are using the API"
    );
}

/// Every file and folder under `dir` (folders end in `/`), relative to it, sorted.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if e.file_type().unwrap().is_dir() {
                out.push(format!("{rel}/"));
                walk(root, &path, out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// After Forget, the agent's folder holds the emptied store, its key and the consent
/// record, and nothing else: nothing derived from the user's text (adapters, checkpoints).
fn assert_forgotten(state: &Path) {
    const MAY_STAY: [&str; 5] = [
        "consent.json",
        "interactions.sqlite",
        "interactions.sqlite-shm",
        "interactions.sqlite-wal",
        "store.key",
    ];
    let left = tree(state);
    for f in &left {
        assert!(
            MAY_STAY.contains(&f.as_str()),
            "{f} is left after forget: {left:?}"
        );
    }
    assert!(!contains(&store_bytes(state), CANARY));
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn log_notes(state: &LocalState, range: std::ops::Range<usize>) {
    for i in range {
        state
            .log_note(
                &format!("{CANARY} I would say {i} things my way."),
                Some("What now?"),
            )
            .unwrap();
    }
}

/// Forget through the socket erases the personal adapter and the checkpoint an adaptation
/// cut by its time budget left behind.
#[test]
fn forget_leaves_nothing_derived_from_the_users_text() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("agent");
    let socket = dir.path().join("local.sock");
    let rt = runtime();
    let base = Arc::new(BaseModel::load(&fixture(), &Device::Cpu).unwrap());
    let state = Arc::new(LocalState::open(StateDir::new(&state_dir), base).unwrap());
    // The scheduler never fires during the test (check_s); adaptations are called directly.
    let schedule = local::Schedule {
        min_new: 12,
        idle_s: 0.0,
        check_s: 1e6,
        time_budget_s: 60.0,
        max_batch_tokens: 128,
    };
    log_notes(&state, 0..12);
    let out = rt.block_on(state.adapt_if_due(&schedule)).unwrap().unwrap();
    assert!(out.finished);
    log_notes(&state, 12..24);
    let cut = local::Schedule {
        time_budget_s: 0.0,
        ..schedule
    };
    let out = rt.block_on(state.adapt_if_due(&cut)).unwrap().unwrap();
    assert!(!out.finished, "cut at its first evaluation");
    assert!(state_dir
        .join("personal/adapter_model.safetensors")
        .exists());
    assert!(state_dir
        .join("personal.progress/adapter_model.safetensors")
        .exists());

    let state = Arc::try_unwrap(state).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let bound = {
        let _rt = rt.enter();
        local::bind(state, schedule, &socket).unwrap()
    };
    let server = rt.spawn(bound.serve(async move {
        let _ = stopped.await;
    }));
    rt.block_on(async {
        let r = local::connect(&socket)
            .await
            .unwrap()
            .forget(pb::ForgetRequest {
                leave_federation: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.interactions_erased, 24);
        assert!(r.adapter_erased);
    });
    let _ = stop.send(());
    rt.block_on(server).unwrap().unwrap();
    assert_forgotten(&state_dir);
}

/// Forget during an adaptation stops it and waits for it: nothing it trained is published
/// afterwards. The test orders the two through the state's events, without timing: the
/// adaptation blocks at its first training step until the forget has asked it to stop.
#[test]
fn forget_stops_a_running_adaptation_and_nothing_is_published_after_it() {
    use device_agent::local::Event;
    use std::sync::mpsc;
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let base = Arc::new(BaseModel::load(&fixture(), &Device::Cpu).unwrap());
    let state = Arc::new(LocalState::open(StateDir::new(dir.path()), base).unwrap());
    let schedule = local::Schedule {
        min_new: 12,
        idle_s: 0.0,
        check_s: 1.0,
        time_budget_s: 600.0,
        max_batch_tokens: 128,
    };
    log_notes(&state, 0..12);

    let (running_tx, running_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let running_tx = std::sync::Mutex::new(Some(running_tx));
    let (go_tx, go_rx) = (
        std::sync::Mutex::new(Some(go_tx)),
        std::sync::Mutex::new(go_rx),
    );
    state.on_event(move |e| match e {
        Event::AdaptationStep => {
            if let Some(tx) = running_tx.lock().unwrap().take() {
                tx.send(()).unwrap();
                // Until the forget asks it to stop (the sender is dropped).
                let _ = go_rx.lock().unwrap().recv();
            }
        }
        Event::ForgetRequested => drop(go_tx.lock().unwrap().take()),
    });
    let adaptation = {
        let state = state.clone();
        rt.spawn(async move { state.adapt_if_due(&schedule).await })
    };
    running_rx
        .recv_timeout(std::time::Duration::from_secs(300))
        .expect("the adaptation reached its first training step");

    // The adaptation is between two steps, trained on the text, holding its lock.
    let forgotten = rt.block_on(state.forget(false)).unwrap();
    assert_eq!(forgotten.interactions, 12);
    let outcome = rt
        .block_on(adaptation)
        .unwrap()
        .unwrap()
        .expect("it was running");
    assert_forgotten(dir.path());
    assert!(outcome.cancelled && !outcome.finished, "{outcome:?}");
    // Nothing comes back later: the store is empty, so no adaptation is due.
    assert!(rt
        .block_on(state.adapt_if_due(&schedule))
        .unwrap()
        .is_none());
    assert_forgotten(dir.path());
}

/// The first adaptation starts from the federation's global adapter that `run` saved (here
/// of rank 2 on q, k, v, o), not from a fresh one: what the simulation's adaptive arm
/// measures.
#[test]
fn the_first_adaptation_starts_from_the_global_adapter() {
    use fedpersona_model::{LoraAdapter, LoraConfig, Target};
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let base = Arc::new(BaseModel::load(&fixture(), &Device::Cpu).unwrap());
    let global = LoraConfig {
        rank: 2,
        alpha: 4.0,
        targets: vec![Target::Q, Target::K, Target::V, Target::O],
        ..LoraConfig::default()
    };
    LoraAdapter::new(base.model.config(), global.clone(), &Device::Cpu)
        .unwrap()
        .save(&StateDir::new(dir.path()).global())
        .unwrap();
    let state = Arc::new(LocalState::open(StateDir::new(dir.path()), base.clone()).unwrap());
    let schedule = local::Schedule {
        min_new: 12,
        idle_s: 0.0,
        check_s: 1.0,
        time_budget_s: 60.0,
        max_batch_tokens: 128,
    };
    log_notes(&state, 0..12);
    let out = rt.block_on(state.adapt_if_due(&schedule)).unwrap().unwrap();
    assert!(out.finished);
    let personal = LoraAdapter::load(
        &dir.path().join("personal"),
        base.model.config(),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(personal.config().rank, 2);
    assert_eq!(personal.config().targets, global.targets);
}

/// The never-harm check: an adaptation that starts from a global adapter that wrecks the
/// model serves neither it nor what it trained from it, but the base model, and says so in
/// `personal/state.json`; the next adaptation starts again from the global adapter.
#[test]
fn a_harmful_global_adapter_is_not_served() {
    use fedpersona_model::{LoraAdapter, LoraConfig, Target};
    let dir = tempfile::tempdir().unwrap();
    let state_dir = StateDir::new(dir.path());
    let rt = runtime();
    // The shipped, trained model: the test fixture's random weights are no better than a
    // random adapter, so only a trained base model can be harmed.
    let shipped =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/shakespeare-base");
    let base = Arc::new(BaseModel::load(&shipped, &Device::Cpu).unwrap());
    let lora = LoraConfig {
        rank: 2,
        alpha: 4.0,
        targets: vec![Target::Q, Target::V],
        ..LoraConfig::default()
    };
    let fresh = LoraAdapter::new(base.model.config(), lora.clone(), &Device::Cpu).unwrap();
    let mut wrecked = fresh.to_tensors().unwrap();
    // B starts at zero (the base model's function); large values push every logit around.
    wrecked.map_values(|v| if v == 0.0 { 4.0 } else { 20.0 * v });
    LoraAdapter::from_tensors(base.model.config(), lora, &wrecked, &Device::Cpu)
        .unwrap()
        .save(&state_dir.global())
        .unwrap();
    let state = Arc::new(LocalState::open(state_dir.clone(), base).unwrap());
    let schedule = local::Schedule {
        min_new: 12,
        idle_s: 0.0,
        check_s: 1e6,
        time_budget_s: 60.0,
        max_batch_tokens: 128,
    };
    log_notes(&state, 0..12);
    let out = rt.block_on(state.adapt_if_due(&schedule)).unwrap().unwrap();
    assert!(out.finished);
    let personal = state_dir.personal();
    let adapted: local::AdaptedState =
        serde_json::from_slice(&std::fs::read(personal.join("state.json")).unwrap()).unwrap();
    let gate = adapted.gate.expect("a finished adaptation is checked");
    assert_eq!(gate.served, device_agent::adapt::Served::Base, "{gate:?}");
    assert!(
        gate.global_loss.unwrap() > gate.base_loss.unwrap(),
        "{gate:?}"
    );
    assert!(
        !personal.join("adapter_config.json").exists(),
        "nothing to load: base"
    );
    assert_eq!(
        adapted.interactions, 12,
        "the schedule counts the run as done"
    );
}
