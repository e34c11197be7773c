//! Differential privacy at the aggregator over gRPC: central noise on the committed sum, a
//! hard budget that stops rounds before they start, and a ledger that survives restarts.

use std::path::Path;

use aggregator::config::Config;
use aggregator::round::RoundPhase;
use fedpersona_privacy::accountant::Method;
use fedpersona_privacy::codec::Encoding;
use fedpersona_proto::refusal;
use fedpersona_proto::v1 as pb;
use fedpersona_proto::v1::federation_client::FederationClient;
use tonic::Code;

use crate::federation::{delta, write_config, Server, Upload};

fn wait_for_version(srv: &Server, version: u64) {
    srv.wait_for(
        |v| v.version == version,
        &format!("version {version} never committed"),
    );
}

/// The round status over gRPC, as a device reads it.
fn round_status(srv: &Server, s: &fedpersona_proto::auth::Signer) -> pb::RoundStatus {
    let mut req = pb::RoundStatusRequest { auth: None };
    req.auth = Some(s.auth("GetRoundStatus", &req));
    srv.rt
        .block_on(FederationClient::new(srv.channel()).get_round_status(req))
        .unwrap()
        .into_inner()
}

/// A refusal that says the budget is spent for good: not RESOURCE_EXHAUSTED (which devices
/// retry), and typed, so no device parses the message.
fn assert_budget_spent(refused: &tonic::Status) {
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(
        refusal::reason(refused),
        refusal::Reason::PrivacyBudgetExhausted,
        "{refused:?}"
    );
}

fn check_in_code(srv: &Server, s: &fedpersona_proto::auth::Signer) -> Result<(), tonic::Status> {
    let mut req = pb::CheckInRequest {
        auth: None,
        last_round: 0,
        sampled_round: 0,
    };
    req.auth = Some(s.auth("CheckIn", &req));
    srv.rt
        .block_on(FederationClient::new(srv.channel()).check_in(req))
        .map(|_| ())
}

#[test]
fn the_budget_stops_rounds_and_the_ledger_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    // Two devices per round out of 200: q = 0.01. The budget pays for two rounds, not three.
    let (z, q, delta_) = (1.0, 0.01, 1e-5);
    let e2 = Method::Rdp.epsilon(z, q, 2, delta_).unwrap();
    let e3 = Method::Rdp.epsilon(z, q, 3, delta_).unwrap();
    let budget = (e2 + e3) / 2.0;
    let cfg = write_config(
        dir.path(),
        "sampling = \"poisson\"\ncohort_size = 2\nmin_reports = 2\nround_timeout_s = 600\nmin_task_time_s = 1",
        &format!(
            "[update]\nclip_norm = 0.01\nencoding = \"f32\"\n\
             [privacy]\nmode = \"central\"\nnoise_multiplier = {z}\npopulation = 200\n\
             epsilon_budget = {budget}\ndelta = {delta_}\nallow_low_snr = true"
        ),
    );
    {
        let srv = Server::start(&cfg);
        let h = &srv.handle;
        let (a, b) = (srv.device(), srv.device());
        let spent = h.coordinator.privacy_spent().unwrap();
        assert_eq!(spent.rounds_charged, 1, "round 1 is charged when it opens");
        for version in 1..=2 {
            let t = srv.task(&a);
            assert_eq!(t.privacy.unwrap().mode, pb::PrivacyMode::Central as i32);
            srv.task(&b);
            let before = h.coordinator.theta();
            for s in [&a, &b] {
                srv.upload(Upload::new(s, t.round, delta(h, 1e-5, Encoding::F32)))
                    .unwrap();
            }
            // Both devices that drew themselves in have reported; no one else joins.
            h.coordinator.close_joins();
            wait_for_version(&srv, version);
            let after = h.coordinator.theta();
            let moves: Vec<f64> = after
                .theta
                .iter()
                .filter(|(n, _)| h.coordinator.spec().shapes().iter().any(|(s, _)| s == *n))
                .flat_map(|(n, t)| {
                    let old = &before.theta.get(n).unwrap().data;
                    t.data
                        .iter()
                        .zip(old)
                        .map(|(x, y)| f64::from(x - y))
                        .collect::<Vec<_>>()
                })
                .collect();
            // Noise z·C (plus the grid's 2%) on the sum, over the fixed denominator of 2.
            let sd = (moves.iter().map(|m| m * m).sum::<f64>() / moves.len() as f64).sqrt();
            let want = z * 0.01 / 2.0;
            assert!(
                (sd / want - 1.0).abs() < 0.15,
                "central noise sd {sd} vs {want} over {} values",
                moves.len()
            );
            // The round's release, as norms: the server step (SGD, lr 1) moved θ by the
            // released mean, the noise is the config's for 2 reports, the estimate follows.
            let release = h.coordinator.last_release().unwrap();
            assert_eq!(release.round, t.round);
            let n = release.norms;
            let moved = moves.iter().map(|m| m * m).sum::<f64>().sqrt();
            assert!(
                (n.update_norm / moved - 1.0).abs() < 1e-4,
                "{n:?} vs {moved}"
            );
            assert_eq!(
                n.noise_norm_expected,
                h.coordinator.config().release_noise_norm(2)
            );
            // z·C·(1 + 2·slack/C)/2·√d, the slack at most 1% of C.
            let bare = want * (moves.len() as f64).sqrt();
            assert!(bare < n.noise_norm_expected && n.noise_norm_expected <= 1.02 * bare);
            assert_eq!(
                n,
                fedpersona_privacy::snr::Measured::of(n.update_norm, n.noise_norm_expected)
            );
            let metrics = h.coordinator.metrics().render();
            for (name, v) in [
                ("fedpersona_round_update_norm", n.update_norm),
                (
                    "fedpersona_round_noise_norm_expected",
                    n.noise_norm_expected,
                ),
                ("fedpersona_round_snr", n.snr),
            ] {
                assert!(
                    metrics.contains(&format!("\n{name} {v}\n")),
                    "{name} {v}: {metrics}"
                );
            }
        }
        let view = h.coordinator.view();
        assert_eq!(view.phase, RoundPhase::BudgetExhausted);
        let wire = round_status(&srv, &a);
        assert_eq!(wire.phase(), pb::RoundPhase::BudgetExhausted);
        assert_eq!(wire.state, "budget_exhausted");
        let spent = h.coordinator.privacy_spent().unwrap();
        assert_eq!(spent.rounds_charged, 2);
        assert!((spent.epsilon - e2).abs() < 1e-9);
        assert!(
            h.coordinator
                .metrics()
                .render()
                .contains(&format!("fedpersona_privacy_epsilon_spent {e2}")),
            "ε spent is exported to Prometheus"
        );
        let refused = check_in_code(&srv, &a).unwrap_err();
        assert_budget_spent(&refused);
        assert!(
            refused.message().contains("privacy budget"),
            "{}",
            refused.message()
        );
        srv.rt.shutdown_background();
    }
    // After a restart the ledger is the same: still two rounds, still exhausted.
    let srv = Server::start(&cfg);
    let spent = srv.handle.coordinator.privacy_spent().unwrap();
    assert_eq!(spent.rounds_charged, 2);
    assert!((spent.epsilon - e2).abs() < 1e-9);
    assert_eq!(
        srv.handle.coordinator.view().phase,
        RoundPhase::BudgetExhausted
    );
    let a = srv.device();
    assert_budget_spent(&check_in_code(&srv, &a).unwrap_err());
    let status = aggregator::cli::status(&aggregator::cli::StatusArgs {
        config: cfg.clone(),
        json: true,
    })
    .unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert!((status["privacy"]["epsilon_spent"].as_f64().unwrap() - e2).abs() < 1e-9);
    assert_eq!(status["privacy"]["rounds_charged"], 2);
    assert_eq!(status["privacy"]["accountant"], "rdp");
    assert!(status["privacy"]["epsilon_remaining"].as_f64().unwrap() > 0.0);
    srv.rt.shutdown_background();

    // The ledger keeps (q, z) per round: restarted under the PLD accountant, the same two
    // rounds cost PLD's (smaller) ε, which leaves room for a third round under this budget.
    let pld2 = Method::Pld.epsilon(z, q, 2, delta_).unwrap();
    let pld3 = Method::Pld.epsilon(z, q, 3, delta_).unwrap();
    assert!(
        pld3 < budget && pld2 < e2,
        "PLD {pld2}, {pld3}; RDP {e2}, budget {budget}"
    );
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("delta = 0.00001", "delta = 0.00001\naccountant = \"pld\""),
    )
    .unwrap();
    let srv = Server::start(&cfg);
    let spent = srv.handle.coordinator.privacy_spent().unwrap();
    assert_eq!(spent.accountant, Method::Pld);
    assert_eq!(
        spent.rounds_charged, 3,
        "round 3 fits and is charged as it opens"
    );
    assert!((spent.epsilon - pld3).abs() < 1e-9 * pld3);
    assert_eq!(srv.handle.coordinator.view().phase, RoundPhase::Open);
}

#[test]
fn invalid_privacy_settings_are_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let rounds = "sampling = \"poisson\"\ncohort_size = 2\nmin_reports = 2\nround_timeout_s = 60\nmin_task_time_s = 1";
    let central = |rest: &str| {
        format!("[privacy]\nmode = \"central\"\nnoise_multiplier = 1\npopulation = 100\nepsilon_budget = 8\ndelta = 1e-5\n{rest}")
    };
    let cases = [
        ("[privacy]\nmode = \"distributed\"\nnoise_multiplier = 1\npopulation = 100\nepsilon_budget = 8\ndelta = 1e-5".to_string(), "secure_aggregation"),
        ("[privacy]\nmode = \"central\"\nnoise_multiplier = 1\npopulation = 1\nepsilon_budget = 8\ndelta = 1e-5".into(), "privacy.population"),
        ("[privacy]\nmode = \"central\"\nnoise_multiplier = 1\nepsilon_budget = 8\ndelta = 1e-5".into(), "privacy.population"),
        ("[privacy]\nmode = \"central\"\nnoise_multiplier = 0.1\npopulation = 3\nepsilon_budget = 1\ndelta = 1e-5".into(), "single round"),
        ("[privacy]\nmode = \"local\"\npopulation = 100\nepsilon_budget = 8\ndelta = 1e-5".into(), "privacy.noise_multiplier"),
        ("[privacy]\nmode = \"central\"\nnoise_multiplier = 2000\npopulation = 100\nepsilon_budget = 8\ndelta = 1e-5".into(), "privacy.noise_multiplier must be in (0, 1000]"),
        ("[privacy]\nmode = \"central\"\nnoise_multiplier = 1\npopulation = 100\ndelta = 1e-5".into(), "privacy.epsilon_budget"),
        ("[privacy]\nmode = \"central\"\nnoise_multiplier = 1\npopulation = 100\nepsilon_budget = 8\ndelta = 0.5".into(), "privacy.delta"),
        ("[privacy]\nmode = \"none\"\npopulation = 100\nnoise_multiplier = 1".into(), "privacy.mode other than none"),
        ("[privacy]\nmode = \"none\"\npopulation = 100\naccountant = \"pld\"".into(), "privacy.accountant = \"pld\" needs a privacy.mode"),
        (central("accountant = \"moments\""), "accountant = \"moments\""),
        (central("[update]\nweighting = \"examples\""), "uniform"),
        // The PLD accountant's range, and a budget it cannot pay one round of.
        ("[privacy]\nmode = \"central\"\nnoise_multiplier = 0.1\npopulation = 100\nepsilon_budget = 8\ndelta = 1e-5\naccountant = \"pld\"".into(), "privacy.noise_multiplier (0.1) must be at least 0.2 with privacy.accountant \"pld\""),
        ("[privacy]\nmode = \"central\"\nnoise_multiplier = 0.5\npopulation = 3\nepsilon_budget = 1\ndelta = 1e-5\naccountant = \"pld\"".into(), "(pld accountant), above privacy.epsilon_budget 1: the budget cannot pay for any round"),
    ];
    // Two reports of z = 1 against d = 1792: expected SNR 2/(1.0103·42.33) = 0.047.
    let cfg = write_config(dir.path(), rounds, &central(""));
    let err = format!("{:#}", aggregator::config::Config::load(&cfg).unwrap_err());
    assert!(err.contains("set privacy.allow_low_snr = true"), "{err}");
    assert!(
        err.contains("signal-to-noise ratio of a round is 0.0468, below 0.1"),
        "{err}"
    );
    let cfg = write_config(dir.path(), rounds, &central("allow_low_snr = true"));
    aggregator::config::Config::load(&cfg).unwrap();
    for (extra, want) in cases {
        let cfg = write_config(dir.path(), rounds, &extra);
        let err = format!("{:#}", aggregator::config::Config::load(&cfg).unwrap_err());
        assert!(err.contains(want), "{extra}: {err}");
    }
    // The rounds the accountant composes: cohorts out of range name their field.
    for (rounds, want) in [
        (
            "sampling = \"poisson\"\ncohort_size = 0\nmin_reports = 1\nround_timeout_s = 60",
            "rounds.cohort_size",
        ),
        (
            "sampling = \"poisson\"\ncohort_size = 2\nmin_reports = 3\nround_timeout_s = 60",
            "rounds.min_reports",
        ),
        (
            "sampling = \"poisson\"\ncohort_size = 2\nover_selection = 0.5\nmin_reports = 2\nround_timeout_s = 60",
            "rounds.over_selection is for first-come cohorts",
        ),
        (
            "sampling = \"poisson\"\ncohort_size = 200\nmin_reports = 2\nround_timeout_s = 60",
            "privacy.population (100) must be between rounds.cohort_size (200)",
        ),
        // The accountant's q is a Poisson rate: first-come cohorts cannot carry DP.
        (
            "cohort_size = 2\nmin_reports = 2\nround_timeout_s = 60",
            "rounds.sampling must be \"poisson\" with privacy.mode \"central\"",
        ),
        (
            "sampling = \"first_come\"\ncohort_size = 2\nmin_reports = 2\nround_timeout_s = 60",
            "rounds.sampling must be \"poisson\"",
        ),
    ] {
        let cfg = write_config(dir.path(), rounds, &central(""));
        let err = format!("{:#}", aggregator::config::Config::load(&cfg).unwrap_err());
        assert!(err.contains(want), "{rounds}: {err}");
    }
}

/// The SecAgg grid leaves room for the noise the devices add: under local noise each device
/// adds its whole z·B, so the grid is coarser than without noise, and as coarse as a
/// distributed share with m = 1.
#[test]
fn the_secagg_grid_leaves_room_for_local_noise() {
    use fedpersona_privacy::mode;
    let dir = tempfile::tempdir().unwrap();
    let rounds = "sampling = \"poisson\"\ncohort_size = 3\nmin_reports = 3\nround_timeout_s = 600";
    let secure = "[secure_aggregation]\nenabled = true\nmax_neighbours = 2\nphase_timeout_s = 5";
    // The grid is sized for the largest cohort a round takes, n.
    let grid = |privacy: &str| {
        let cfg = write_config(dir.path(), rounds, &format!("{secure}\n{privacy}"));
        let cfg = aggregator::config::Config::load(&cfg).unwrap();
        (
            cfg.secure_aggregation.unwrap().granularity,
            u64::from(cfg.rounds.max_assigned.get()),
        )
    };
    let (none, n) = grid("[privacy]\npopulation = 100");
    let (local, n_local) =
        grid("[privacy]\nmode = \"local\"\nnoise_multiplier = 2\npopulation = 100\nepsilon_budget = 100\ndelta = 1e-5\nallow_low_snr = true");
    assert_eq!(none, mode::secagg_grid(1.0, n, 0.0, 1).granularity);
    assert_eq!(local, mode::secagg_grid(1.0, n_local, 2.0, 1).granularity);
    // n inputs of B plus 12σ of the summed noise (σ = 2B√n) fit within 2^30.
    let (units, n) = (1.0 / local, n_local as f64);
    assert!(n * units + 12.0 * 2.0 * units * n.sqrt() <= mode::SECAGG_SUM_BOUND);
    assert!(local > none);
}

/// A secure round takes updates only through secure aggregation, and only from cohort
/// members with key adverts their enrolled key signed.
#[test]
fn secure_rounds_refuse_plain_uploads_and_unsigned_adverts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "cohort_size = 3\nover_selection = 0\nmin_reports = 3\nround_timeout_s = 600\nmin_task_time_s = 1",
        "[secure_aggregation]\nenabled = true\nmax_neighbours = 2\nphase_timeout_s = 5",
    );
    let srv = Server::start(&cfg);
    let h = &srv.handle;
    let (a, outsider) = (srv.device(), srv.device());
    let t = srv.task(&a);
    let s = t.secure_aggregation.unwrap();
    assert!(s.enabled && s.granularity > 0.0 && s.phase_timeout_ms == 5000);

    let plain = srv.upload(Upload::new(&a, t.round, delta(h, 1e-3, Encoding::Q8)));
    assert_eq!(plain.unwrap_err().code(), Code::FailedPrecondition);

    let call = |signer: &fedpersona_proto::auth::Signer, round: u64, signature: Vec<u8>| {
        let (_, c_pk, s_pk) = fedpersona_privacy::secagg::Client::new(round).unwrap();
        let mut req = pb::SecAggRequest {
            auth: None,
            round,
            step: Some(pb::sec_agg_request::Step::Advertise(pb::SecAggAdvertise {
                c_pk: c_pk.to_vec(),
                s_pk: s_pk.to_vec(),
                signature,
            })),
        };
        req.auth = Some(signer.auth("SecureAggregate", &req));
        srv.rt
            .block_on(FederationClient::new(srv.channel()).secure_aggregate(req))
            .map(|_| ())
    };
    // An advert signed by nobody, one for another round, one from a device not in the cohort.
    assert_eq!(
        call(&a, t.round, vec![0; 64]).unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        call(&a, t.round + 1, vec![0; 64]).unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        call(&outsider, t.round, vec![0; 64]).unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(h.coordinator.store().summary().unwrap().uploads, 0);
    assert_eq!(h.coordinator.view().phase, RoundPhase::Open);
}

/// Copies a folder tree.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// The journal holds the privacy ledger: a journal that is gone, emptied, damaged, stripped
/// of its ledger rows or behind the adapter versions on disk is refused at start with what
/// to do, and nothing is written; the intact state starts as before.
#[test]
fn a_lost_or_tampered_journal_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    std::fs::create_dir(&good).unwrap();
    write_config(
        &good,
        "sampling = \"poisson\"\ncohort_size = 2\nmin_reports = 2\nround_timeout_s = 600\nmin_task_time_s = 1",
        "[update]\nclip_norm = 0.01\nencoding = \"f32\"\n\
         [privacy]\nmode = \"central\"\nnoise_multiplier = 1.0\npopulation = 200\n\
         epsilon_budget = 50\ndelta = 1e-5\nallow_low_snr = true",
    );
    let start = |root: &Path| {
        Config::load(&root.join("aggregator.toml")).and_then(aggregator::server::start)
    };
    // Round 1 opens, charged, on version 0.
    drop(start(&good).unwrap());
    // Each case on its own copy of that state.
    let case = |name: &str, damage: &dyn Fn(&Path)| -> anyhow::Error {
        let root = dir.path().join(name);
        copy_tree(&good, &root);
        let state = root.join("state");
        damage(&state);
        let before: Vec<(std::path::PathBuf, Vec<u8>)> = ["journal.sqlite", "journal.sqlite-wal"]
            .iter()
            .map(|f| state.join(f))
            .filter(|p| p.exists())
            .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
            .collect();
        let err = start(&root)
            .err()
            .unwrap_or_else(|| panic!("{name}: started"));
        for (p, bytes) in before {
            assert_eq!(
                std::fs::read(&p).unwrap(),
                bytes,
                "{name}: {} changed",
                p.display()
            );
        }
        err
    };
    let says = |e: anyhow::Error, what: &str| {
        let msg = format!("{e:#}");
        assert!(
            msg.contains(what) && msg.contains("journal.sqlite"),
            "{msg}"
        );
    };
    let journal_files = |state: &Path| {
        ["journal.sqlite", "journal.sqlite-wal", "journal.sqlite-shm"].map(|f| state.join(f))
    };
    says(
        case("deleted", &|s| {
            for f in journal_files(s) {
                let _ = std::fs::remove_file(f);
            }
        }),
        "missing or empty",
    );
    assert!(!dir.path().join("deleted/state/journal.sqlite").exists());
    says(
        case("emptied", &|s| {
            for f in journal_files(s) {
                let _ = std::fs::remove_file(&f);
            }
            std::fs::write(s.join("journal.sqlite"), b"").unwrap();
        }),
        "missing or empty",
    );
    says(
        case("ledger", &|s| {
            rusqlite::Connection::open(s.join("journal.sqlite"))
                .unwrap()
                .execute("DELETE FROM privacy_ledger", [])
                .unwrap();
        }),
        "without a privacy-ledger row",
    );
    says(
        case("ahead", &|s| {
            copy_tree(&s.join("adapters/v000000"), &s.join("adapters/v000003"));
        }),
        "versions up to 3",
    );
    says(
        case("garbled", &|s| {
            let path = s.join("journal.sqlite");
            let c = rusqlite::Connection::open(&path).unwrap();
            c.pragma_update(None, "wal_checkpoint", "TRUNCATE").unwrap();
            drop(c);
            let mut bytes = std::fs::read(&path).unwrap();
            let page = 4096;
            assert!(bytes.len() >= 4 * page, "{} bytes", bytes.len());
            bytes[2 * page..2 * page + 64].fill(0xa5);
            std::fs::write(&path, bytes).unwrap();
        }),
        "journal",
    );
    // Any file of a committed version, the server optimizer's state included.
    for file in ["server_optimizer.json", "adapter_config.json"] {
        let e = case(file, &|s| {
            let path = s.join("adapters/v000000").join(file);
            let mut text = std::fs::read_to_string(&path).unwrap();
            text.push(' ');
            std::fs::write(&path, text).unwrap();
        });
        let msg = format!("{e:#}");
        assert!(
            msg.contains("SHA-256 differs") && msg.contains("v000000"),
            "{msg}"
        );
    }
    // One orphan version (a crash between its folder and its commit) is normal.
    let orphan = dir.path().join("orphan");
    copy_tree(&good, &orphan);
    copy_tree(
        &orphan.join("state/adapters/v000000"),
        &orphan.join("state/adapters/v000001"),
    );
    let h = start(&orphan).unwrap();
    assert_eq!(h.coordinator.privacy_spent().unwrap().rounds_charged, 2);
    drop(h);
    let h = start(&good).unwrap();
    assert_eq!(h.coordinator.privacy_spent().unwrap().rounds_charged, 2);
}
