//! The `device-agent` binary end to end: train, eval and generate on a small HF model, and
//! one-line errors with exit code 2 on bad input.

mod adaptation;
mod client;
mod local;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_device-agent"));
    c.env("RUST_LOG", "warn");
    c
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/model/tests/fixtures/hf-tiny-llama")
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
    // The error chain names each cause once (a message that embeds its source, printed
    // with the chain, would say it twice).
    let parts: Vec<&str> = err.trim().split(": ").filter(|p| p.len() >= 8).collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(!parts[i + 1..].contains(p), "{err:?} repeats {p:?}");
    }
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
    // An --out that cannot be written is refused before training (here: under a file),
    // and nothing is written.
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    let before: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    fails(
        bin()
            .args(["train", "--steps", "50", "--base"])
            .arg(fixture())
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(blocker.join("adapter"))
            .output()
            .unwrap(),
        "is not a folder",
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), before.len());
    assert_eq!(std::fs::read(&blocker).unwrap(), b"x");
}
