//! `fedpersona-sim simulate` end to end through the binary: a real aggregator with a run-made
//! certificate on loopback, agents over gRPC, evaluation, and the report's structure; the
//! partial report on Ctrl-C; refused settings.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use super::{bin, fixture};

/// Eight users with distinct habits, 15 lines each (12 of them support lines), as JSONL.
fn corpus(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("corpus.jsonl");
    let mut text = String::new();
    for u in 0..8 {
        for i in 0..15 {
            let line = serde_json::json!({
                "user": format!("user-{u}"),
                "context": format!("What do you say about thing {i}?"),
                "text": format!("User {u} says thing {i} is {} indeed.", ["fine", "grand", "odd", "late"][(u + i) % 4]),
            });
            text.push_str(&line.to_string());
            text.push('\n');
        }
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn tiny_args(data: &Path, out: &Path, rounds: &str) -> Vec<String> {
    [
        "simulate",
        "--data",
        data.to_str().unwrap(),
        "--base",
        fixture().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--rounds",
        rounds,
        "--clients-per-round",
        "2",
        "--local-steps",
        "1",
        "--min-lines",
        "6",
        "--heldout-users",
        "2",
        "--support-lines",
        "10",
        "--finetune-steps",
        "2",
        "--curve-steps",
        "2",
        "--meta-local-steps",
        "2",
        "--dropout",
        "0.25",
        "--threads",
        "2",
        "--seed",
        "3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn a_tiny_simulation_writes_a_complete_report() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let out = dir.path().join("run");
    let mut args = tiny_args(&data, &out, "2");
    args.extend(["--few-shot-lines", "6,all"].map(String::from));
    let o = bin().args(args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("meta_finetune"), "{stdout}");

    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    // 8 users, 20% held out: 2 held out, 6 federation users.
    assert_eq!(r["users"]["train"], 6);
    assert_eq!(r["users"]["heldout"], 2);
    assert_eq!(r["rounds_completed"], 2);
    assert_eq!(r["privacy"]["mode"], "none");
    assert!(r["privacy"]["epsilon"].is_null() && r["privacy"]["delta"].is_null());
    assert_eq!(r["complete"], true);
    let g = r["global_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&g));
    for m in [
        "base",
        "local_only",
        "global",
        "fedavg_finetune",
        "meta_finetune",
        "adaptive_finetune",
    ] {
        let x = &r["methods"][m];
        let acc = x["accuracy"].as_f64().unwrap_or_else(|| panic!("{m}: {x}"));
        assert!((0.0..=1.0).contains(&acc), "{m}");
        assert!(x["accuracy_ci95"].as_f64().unwrap() >= 0.0, "{m}");
        assert!(x["bits_per_byte"].as_f64().unwrap() > 0.0, "{m}");
        assert_eq!(x["users"], 2, "{m}");
        for k in [
            "next_word_top1",
            "next_word_top3",
            "keystroke_savings",
            "hurt_share",
            "accuracy_hurt_share",
        ] {
            let v = x[k].as_f64().unwrap_or_else(|| panic!("{m} {k}: {x}"));
            assert!((0.0..=1.0).contains(&v), "{m} {k}: {v}");
        }
        let (top1, top3) = (x["next_word_top1"].as_f64(), x["next_word_top3"].as_f64());
        assert!(top1 <= top3, "{m}: top-1 is among the top three");
    }
    // Every comparison on every metric, at the run's support size and the few-shot sizes.
    let comparisons = r["comparisons"].as_array().unwrap();
    for metric in [
        "accuracy",
        "next_word_top1",
        "next_word_top3",
        "keystroke_savings",
    ] {
        for size in [
            serde_json::json!(10),
            serde_json::json!(6),
            serde_json::Value::Null,
        ] {
            assert!(
                comparisons.iter().any(|c| c["better"] == "global"
                    && c["worse"] == "base"
                    && c["metric"] == metric
                    && c["support_lines"] == size),
                "{metric} at {size}"
            );
        }
    }
    // The few-shot curves: every method at 6 lines and at all of them (12), both users.
    let few_shot = r["few_shot"].as_array().unwrap();
    for size in [serde_json::json!(6), serde_json::Value::Null] {
        for m in [
            "base",
            "local_only",
            "global",
            "fedavg_finetune",
            "meta_finetune",
        ] {
            let e = few_shot
                .iter()
                .find(|e| e["method"] == m && e["support_lines"] == size)
                .unwrap_or_else(|| panic!("{m} at {size}"));
            assert_eq!(
                (e["users"].as_u64(), e["steps"].as_u64()),
                (Some(2), Some(2))
            );
            assert!((0.0..=1.0).contains(&e["next_word_top1"].as_f64().unwrap()));
        }
    }
    let base_at = |size: serde_json::Value| {
        few_shot
            .iter()
            .find(|e| e["method"] == "base" && e["support_lines"] == size)
            .unwrap()["accuracy"]
            .clone()
    };
    assert_eq!(
        base_at(serde_json::json!(6)),
        r["methods"]["base"]["accuracy"],
        "base needs no support lines"
    );
    // The adaptive-vs-plain ablation: its comparison and what the runs did.
    assert!(r["comparisons"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["better"] == "adaptive_finetune" && c["worse"] == "fedavg_finetune"));
    assert_eq!(r["adaptive"]["users"], 2);
    let a = &r["adaptive"];
    let replayed = a["accepted"].as_u64().unwrap()
        + a["edited"].as_u64().unwrap()
        + a["rejected"].as_u64().unwrap();
    assert_eq!(replayed, 2 * 10, "every support line replayed once");
    // Every method ends with the never-harm check (10 support lines: 2 held out), so each
    // user was served one of base, the start and the method's own result.
    for m in [
        "local_only",
        "global",
        "fedavg_finetune",
        "meta_finetune",
        "adaptive_finetune",
    ] {
        let x = &r["methods"][m];
        let served: u64 = ["served_base", "served_start", "served_personal"]
            .iter()
            .map(|k| x[k].as_u64().unwrap())
            .sum();
        assert_eq!(served, 2, "{m}: {x}");
        assert!(x["unchecked_accuracy"].as_f64().is_some(), "{m}");
    }
    assert_eq!(
        r["methods"]["local_only"]["served_start"], 0,
        "local-only has no start to serve"
    );
    assert_eq!(
        r["methods"]["global"]["served_personal"], 0,
        "global has no result of its own"
    );
    // Fine-tuning curves: 0, 1 and 2 steps.
    assert_eq!(
        r["methods"]["local_only"]["accuracy_by_steps"]
            .as_object()
            .unwrap()
            .len(),
        3
    );
    // Without an adapter step, local_only at 0 steps is the base model (B = 0).
    assert_eq!(
        r["methods"]["local_only"]["accuracy_by_steps"]["0"],
        r["methods"]["base"]["accuracy"]
    );
    assert!(r["seconds"].as_f64().unwrap() > 0.0);
    assert!(r["peak_rss_mb"].as_f64().unwrap() > 0.0);
    assert_eq!(r["settings"]["clients_per_round"], 2);

    let rounds: Vec<serde_json::Value> = std::fs::read_to_string(out.join("rounds.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rounds.len(), 4, "two rounds per federation");
    for (i, x) in rounds.iter().enumerate() {
        assert_eq!(x["federation"], if i < 2 { "fedavg" } else { "meta" });
        // Each of the 6 devices draws itself in with q = 2/6, then may drop: a round
        // commits with any report (min_reports is 1 for this few).
        let (reports, drops) = (x["reports"].as_u64().unwrap(), x["drops"].as_u64().unwrap());
        assert!(reports + drops <= 6, "{x}");
        assert_eq!(x["committed"], reports >= 1, "{x}");
        assert_eq!(x["rejects"], 0);
        assert_eq!(x["train_loss"].as_f64().is_some(), reports >= 1, "{x}");
        assert_eq!(x["upload_bytes"].as_u64().unwrap() > 0, reports >= 1, "{x}");
        assert!(x["epsilon_spent"].is_null());
    }
    assert!(
        rounds.iter().any(|x| x["committed"] == true),
        "with this seed some round commits"
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| meta_finetune |") && md.contains("Global accuracy"));
    assert!(md.contains("## Few-shot curves"), "{md}");
    for svg in [
        "accuracy_vs_round.svg",
        "accuracy_vs_steps.svg",
        "few_shot.svg",
    ] {
        assert!(std::fs::read_to_string(out.join(svg))
            .unwrap()
            .starts_with("<svg"));
    }
    // The aggregator ran from a real config with a key only its owner reads.
    assert!(out.join("fedavg/aggregator.toml").exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("tls/server.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // The same seed gives the same split and the same federated result; `--out` relative
    // to the working directory works too.
    let again = dir.path().join("again");
    let o = bin()
        .current_dir(dir.path())
        .args(tiny_args(&data, Path::new("again"), "2"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(again.join("report.json")).unwrap()).unwrap();
    assert_eq!(r2["methods"]["base"], r["methods"]["base"]);
    let g2 = r2["global_accuracy"].as_f64().unwrap();
    assert!((g - g2).abs() < 1e-9, "{g} vs {g2}");
}

#[test]
fn ctrl_c_stops_cleanly_with_a_partial_report() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let out = dir.path().join("run");
    let mut child = bin()
        .args(tiny_args(&data, &out, "1000"))
        .env("RUST_LOG", "fedpersona_sim=info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once two rounds are in rounds.jsonl: the binary logs each one after writing it.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut recorded = 0;
    let mut line = String::new();
    while recorded < 2 {
        line.clear();
        let n = stderr.read_line(&mut line).unwrap();
        assert!(
            n > 0,
            "the simulation ended before two rounds were recorded"
        );
        recorded += usize::from(line.contains("round recorded in rounds.jsonl"));
    }
    // Keep draining stderr so the child never blocks on a full pipe.
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        stderr.read_to_string(&mut rest).unwrap();
        rest
    });
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    let rest = drain.join().unwrap();
    assert!(o.status.success(), "{rest}");
    // Logs into a pipe (a file, journald) are plain text: no terminal colour codes.
    assert!(
        !rest.contains('\u{1b}') && !line.contains('\u{1b}'),
        "ANSI escapes in piped logs: {rest}"
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["complete"], false);
    assert_eq!(r["interrupted_during"], "federation");
    assert!(r["rounds_completed"].as_u64().unwrap() >= 1);
    assert!(r["global_accuracy"].is_null());
    assert!(std::fs::read_to_string(out.join("report.md"))
        .unwrap()
        .contains("Partial report"));
}

/// The privacy issue's run in miniature: distributed noise under secure aggregation with a
/// target ε; every round is charged and the report says what was spent.
#[test]
fn a_private_simulation_spends_no_more_than_its_epsilon() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let out = dir.path().join("run");
    let mut args = tiny_args(&data, &out, "2");
    let set = |args: &mut Vec<String>, flag: &str, v: &str| {
        let at = args.iter().position(|a| a == flag).unwrap();
        args[at + 1] = v.into();
    };
    set(&mut args, "--clients-per-round", "3");
    set(&mut args, "--dropout", "0");
    args.extend(
        [
            "--privacy",
            "distributed",
            "--secure-aggregation",
            "--epsilon",
            "8",
            "--adaptive-clip",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let o = bin().args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["rounds_completed"], 2);
    let p = &r["privacy"];
    assert_eq!(p["mode"], "distributed");
    assert_eq!(p["secure_aggregation"], true);
    assert_eq!(p["delta"], 1e-5);
    let eps = p["epsilon"].as_f64().unwrap();
    assert!(eps > 0.0 && eps <= 8.0, "{eps}");
    // 3 of 6 devices a round: q = 0.5; z was solved so that two rounds spend at most 8.
    assert_eq!(p["sampling_rate"], 0.5);
    let z = p["noise_multiplier"].as_f64().unwrap();
    let want = fedpersona_privacy::accountant::Method::Rdp
        .epsilon(z, 0.5, 2, 1e-5)
        .unwrap();
    assert!((eps - want).abs() < 1e-9, "{eps} vs {want}");
    // What privacy costs: the same FedAvg without DP, trained and scored in the same run.
    let g = r["global_accuracy"].as_f64().unwrap();
    let n = p["global_accuracy_nonprivate"].as_f64().unwrap();
    assert!((p["accuracy_cost"].as_f64().unwrap() - (g - n)).abs() < 1e-12);
    for m in [
        "global_nonprivate",
        "fedavg_finetune_nonprivate",
        "meta_finetune_nonprivate",
    ] {
        assert!(r["methods"][m]["accuracy"].as_f64().is_some(), "{m}");
    }
    for worse in ["global_nonprivate", "meta_finetune_nonprivate"] {
        assert!(r["comparisons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["worse"] == worse));
    }
    let rounds = std::fs::read_to_string(out.join("rounds.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(rounds.lines().last().unwrap()).unwrap();
    assert!((last["epsilon_spent"].as_f64().unwrap() - eps).abs() < 1e-9);
    // Adaptive clipping in every federation: round 1 at --clip-norm, round 2 stepped by the
    // (noised, in the private ones) count of unclipped devices inside the masked updates.
    for fed in ["fedavg", "meta", "fedavg_nonprivate", "meta_nonprivate"] {
        let clips: Vec<f64> = rounds
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["federation"] == fed)
            .map(|r| r["clip_norm"].as_f64().unwrap())
            .collect();
        assert_eq!(clips.len(), 2, "{fed}");
        assert!((clips[0] - 1.0).abs() < 1e-6, "{fed}: {clips:?}");
        assert!(clips[1] != clips[0] && clips[1] > 0.0, "{fed}: {clips:?}");
    }
    // Each committed round's release as norms; the SNR only where there is noise.
    for line in rounds.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(r["committed"], true, "{line}");
        let u = r["update_norm"].as_f64().unwrap();
        if r["federation"] == "fedavg_nonprivate" || r["federation"] == "meta_nonprivate" {
            assert!(
                r["snr"].is_null() && r["noise_norm_expected"].is_null(),
                "{line}"
            );
        } else {
            let n = r["noise_norm_expected"].as_f64().unwrap();
            let snr = r["snr"].as_f64().unwrap();
            let want = (u * u - n * n).max(0.0).sqrt() / n;
            assert!((snr - want).abs() <= 1e-12 * want.max(1.0), "{line}");
        }
    }
    for name in ["fedavg", "meta"] {
        let x = &p["snr"][name];
        assert!(x["expected"].as_f64().unwrap() > 0.0, "{name}: {p}");
        assert_eq!(x["rounds"], 2, "{name}: {p}");
        assert!(x["median"].as_f64().is_some() && x["last"].as_f64().is_some());
    }
    assert!(p["snr"].get("fedavg_nonprivate").is_none());
    assert!(p["snr"].get("meta_nonprivate").is_none());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("**Signal-to-noise per round**"), "{md}");
}

#[test]
fn refused_settings_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let out = dir.path().join("run");
    let args = tiny_args(&data, &out, "2");
    for (extra, want) in [
        (vec!["--privacy", "local"], "needs --epsilon"),
        (
            vec!["--privacy", "distributed", "--epsilon", "8"],
            "needs --secure-aggregation",
        ),
        (vec!["--noise-multiplier", "1"], "need --privacy"),
    ] {
        let mut args = args.clone();
        args.extend(extra.iter().map(|s| s.to_string()));
        let o = bin().args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{extra:?}: {err}");
        assert!(!out.exists(), "nothing written");
    }
    let mut args = tiny_args(&data, &out, "2");
    let at = args.iter().position(|a| a == "--min-lines").unwrap();
    args[at + 1] = "50".into();
    let o = bin().args(&args).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("at least 50 lines"), "{err}");
}

/// The privacy–utility sweep in miniature: a non-private and a private point over the same
/// held-out users, and a second invocation that reads the finished points instead of
/// re-running them.
#[test]
fn a_sweep_scores_each_point_on_the_same_users_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let out = dir.path().join("sweep");
    let mut args = tiny_args(&data, &out, "2");
    args[0] = "sweep".into();
    for (flag, v) in [("--dropout", "0"), ("--clients-per-round", "3")] {
        let at = args.iter().position(|a| a == flag).unwrap();
        args[at + 1] = v.into();
    }
    args.extend(
        ["--epsilons", "inf,8", "--population-shares", "1"]
            .iter()
            .map(|s| s.to_string()),
    );
    let o = bin().args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let points: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("sweep.json")).unwrap()).unwrap();
    let points = points.as_array().unwrap();
    assert_eq!(points.len(), 2);
    let (plain, private) = (&points[0], &points[1]);
    assert!(plain["epsilon"].is_null() && plain["noise_multiplier"].is_null());
    assert_eq!(private["epsilon"], 8.0);
    let spent = private["epsilon_spent"].as_f64().unwrap();
    assert!(spent > 0.0 && spent <= 8.0, "{spent}");
    assert!(private["noise_multiplier"].as_f64().unwrap() > 0.0);
    for p in points {
        assert_eq!(p["population"], 6);
        assert_eq!(p["clients_per_round"], 3);
        assert_eq!(p["base"], points[0]["base"], "the same held-out users");
        let g = p["global"]["unchecked_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&g));
    }
    assert!(out.join("sweep.md").exists() && out.join("privacy_utility.svg").exists());
    // FedAvg alone at each point: no meta, no local-only, no non-private reference.
    let report = out.join("points/share-1-eps-8/report.json");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let methods: Vec<&String> = r["methods"].as_object().unwrap().keys().collect();
    assert_eq!(methods, ["base", "fedavg_finetune", "global"]);

    let before = std::fs::metadata(&report).unwrap().modified().unwrap();
    let o = bin().args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::metadata(&report).unwrap().modified().unwrap(),
        before,
        "a finished point is read, not re-run"
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("| 6 | 3 | 8 |"));
}
