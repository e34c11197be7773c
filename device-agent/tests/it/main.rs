//! The `device-agent` binary end to end: train, eval and generate on a small HF model, and
//! one-line errors with exit code 2 on bad input.

mod adaptation;
mod federation;
mod local;
mod simulate;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_device-agent"));
    c.env("RUST_LOG", "warn");
    c
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tests/fixtures/hf-tiny-llama")
}

fn plays() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/shakespeare")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(out: Output, needle: &str) {
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "{err:?} does not mention {needle:?}");
}

#[test]
fn train_eval_generate_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    let data = dir.path().join("me.jsonl");
    let lines: String = (0..24)
        .map(|i| format!("{{\"context\":\"How now, friend {i}?\",\"text\":\"Well met, good sir; I am well.\"}}\n"))
        .collect();
    std::fs::write(&data, lines).unwrap();
    let base = fixture();
    let eval = |adapter: Option<&Path>| -> f64 {
        let mut c = bin();
        c.args(["eval", "--json", "--seq-len", "64", "--base"])
            .arg(&base)
            .arg("--data")
            .arg(&data);
        if let Some(a) = adapter {
            c.arg("--adapter").arg(a);
        }
        let v: serde_json::Value = serde_json::from_str(&ok(c.output().unwrap())).unwrap();
        assert!(v["bits_per_byte"].as_f64().unwrap() > 0.0);
        v["loss"].as_f64().unwrap()
    };
    let before = eval(None);
    let out = ok(bin()
        .args([
            "train",
            "--steps",
            "25",
            "--seq-len",
            "64",
            "--lr",
            "1e-2",
            "--threads",
            "2",
            "--base",
        ])
        .arg(&base)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&adapter)
        .output()
        .unwrap());
    assert!(out.contains("held-out"), "{out}");
    assert!(adapter.join("adapter_config.json").exists());
    assert!(adapter.join("adapter_model.safetensors").exists());
    let after = eval(Some(&adapter));
    assert!(after < before - 0.5, "loss {before} -> {after}");

    // Generation prints only the continuation, and the adapter changes it.
    let gen = |adapter: Option<&Path>| -> String {
        let mut c = bin();
        c.args([
            "generate",
            "--max-tokens",
            "12",
            "--prompt",
            "How now?\n\n",
            "--base",
        ])
        .arg(&base);
        if let Some(a) = adapter {
            c.arg("--adapter").arg(a);
        }
        ok(c.output().unwrap())
    };
    let plain = gen(None);
    let personal = gen(Some(&adapter));
    assert!(!plain.contains("How now"));
    assert_ne!(plain, personal);
    assert_eq!(
        personal,
        gen(Some(&adapter)),
        "greedy decoding is deterministic"
    );
}

#[test]
fn plays_folder_users() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(bin()
        .args([
            "train",
            "--steps",
            "2",
            "--seq-len",
            "32",
            "--user",
            "macbeth/MACBETH",
            "--base",
        ])
        .arg(fixture())
        .arg("--data")
        .arg(plays())
        .arg("--out")
        .arg(dir.path().join("a"))
        .output()
        .unwrap());
    assert!(out.contains("held-out"), "{out}");
    fails(
        bin()
            .arg("eval")
            .arg("--base")
            .arg(fixture())
            .arg("--data")
            .arg(plays())
            .output()
            .unwrap(),
        "--user",
    );
    fails(
        bin()
            .args(["eval", "--user", "macbeth/NOBODY", "--base"])
            .arg(fixture())
            .arg("--data")
            .arg(plays())
            .output()
            .unwrap(),
        "macbeth/MACBETH",
    );
}

#[test]
fn bad_input_is_one_clear_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    fails(
        bin()
            .args(["generate", "--prompt", "x", "--base"])
            .arg(dir.path())
            .output()
            .unwrap(),
        "config.json",
    );
    std::fs::write(dir.path().join("config.json"), "{\"vocab_size\": 0}").unwrap();
    fails(
        bin()
            .args(["generate", "--prompt", "x", "--base"])
            .arg(dir.path())
            .output()
            .unwrap(),
        "config",
    );
    fails(
        bin()
            .args(["generate", "--prompt", "x", "--adapter"])
            .arg(dir.path())
            .arg("--base")
            .arg(fixture())
            .output()
            .unwrap(),
        "adapter_config.json",
    );
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, "{\"text\": 3}\n").unwrap();
    fails(
        bin()
            .arg("eval")
            .arg("--base")
            .arg(fixture())
            .arg("--data")
            .arg(&data)
            .output()
            .unwrap(),
        "line 1",
    );
    std::fs::write(&data, "{\"text\": \"fine\"}\n").unwrap();
    fails(
        bin()
            .args(["train", "--targets", "q,x", "--base"])
            .arg(fixture())
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(dir.path().join("o"))
            .output()
            .unwrap(),
        "unknown target",
    );
    let out = bin().args(["train", "--steps", "nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Every `deploy/agent*.toml` loads, laid out as a deployment would lay it out (CA, token
/// file and data next to it; `../models` and `../data` beside its folder); the loopback agent
/// matches the loopback aggregator; the production example shows every key of the schema.
#[test]
fn deploy_example_agent_configs_load() {
    use device_agent::agent::AgentConfig;
    use std::time::Duration;

    const TOKEN: &str = "deploy-test-enrollment-token-0123";
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // <tmp>/deploy holds what the configs name next to them.
    let layout = || {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("deploy");
        std::fs::create_dir(&base).unwrap();
        let m = aggregator::tls::generate(&["localhost".into()]).unwrap();
        aggregator::tls::write(&m, &base.join("tls")).unwrap();
        std::fs::write(base.join("enrollment-token"), format!("{TOKEN}\n")).unwrap();
        std::fs::create_dir(base.join("data")).unwrap();
        std::fs::write(
            base.join("data/me.jsonl"),
            "{\"text\": \"Fine, thanks.\", \"context\": \"How are you?\"}\n",
        )
        .unwrap();
        for dir in ["models", "data"] {
            std::os::unix::fs::symlink(repo.join(dir), tmp.path().join(dir)).unwrap();
        }
        std::os::unix::fs::symlink(repo.join("models"), base.join("models")).unwrap();
        (tmp, base, m.ca_cert_pem)
    };

    let mut files: Vec<PathBuf> = std::fs::read_dir(repo.join("deploy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("agent") && name.ends_with(".toml")
        })
        .collect();
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let (_tmp, base, ca) = layout();
        let cfg = AgentConfig::parse(&text, &base)
            .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        match path.file_name().unwrap().to_str().unwrap() {
            "agent.toml" => {
                assert!(cfg.connection.url.starts_with("https://"));
                assert_eq!(cfg.connection.ca_pem.as_deref(), Some(ca.as_bytes()));
                assert_eq!(cfg.enrollment_token, TOKEN);
                assert_eq!(cfg.state_dir, Path::new("/var/lib/fedpersona-agent"));
                assert_eq!(cfg.data.data, base.join("data/me.jsonl"));
                assert_eq!(cfg.data.user, None);
                assert_eq!(cfg.data.load().unwrap().len(), 1);
                assert_eq!(cfg.checkin_interval, Duration::from_secs(60));
                assert_eq!(cfg.max_rounds, None);
            }
            "agent-loopback.toml" => {
                assert_eq!(cfg.connection.ca_pem, None);
                assert_eq!(cfg.state_dir, base.join("agent-state"));
                assert_eq!(cfg.data.user.as_deref(), Some("hamlet/HAMLET"));
                assert!(cfg.model_dir.join("config.json").is_file());
                assert!(!cfg.data.load().unwrap().is_empty());
                assert_eq!(cfg.checkin_interval, Duration::from_secs(5));
                assert_eq!(cfg.max_rounds, Some(3));
                // It can enroll with, and reach, the loopback aggregator.
                let agg_text =
                    std::fs::read_to_string(repo.join("deploy/aggregator-loopback.toml")).unwrap();
                let agg = aggregator::config::Config::parse(&agg_text, &base).unwrap();
                assert!(agg
                    .enrollment_token_digests
                    .contains(&aggregator::config::token_digest(&cfg.enrollment_token)));
                assert!(
                    cfg.connection.url.ends_with(&format!(
                        "{}:{}",
                        agg.listen.ip(),
                        agg.listen.port()
                    )),
                    "{} vs {}",
                    cfg.connection.url,
                    agg.listen
                );
            }
            _ => {}
        }
    }

    // The production example shows every key the schema knows (set or commented out):
    // serde's unknown-field error lists them.
    let keys = |err: String| -> Vec<String> {
        let list = err.split_once("expected one of ").unwrap().1;
        let list = list.lines().next().unwrap();
        list.split('`')
            .skip(1)
            .step_by(2)
            .map(String::from)
            .collect()
    };
    let mentions = |text: &str, key: &str| {
        text.lines().any(|l| {
            l.trim_start_matches(['#', ' '])
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
    };
    let text = std::fs::read_to_string(repo.join("deploy/agent.toml")).unwrap();
    let (_tmp, base, _) = layout();
    let parse_err = |t: &str| format!("{:#}", AgentConfig::parse(t, &base).unwrap_err());
    let tables = keys(parse_err(&format!("[zz_unknown]\n{text}")));
    assert_eq!(tables.len(), 3, "{tables:?}");
    for table in tables {
        let header = format!("\n[{table}]\n");
        assert!(text.contains(&header), "deploy/agent.toml lacks [{table}]");
        let probe = text.replacen(&header, &format!("{header}zz_unknown = 1\n"), 1);
        for key in keys(parse_err(&probe)) {
            assert!(
                mentions(&text, &key),
                "deploy/agent.toml does not show [{table}] {key}"
            );
        }
    }
}
