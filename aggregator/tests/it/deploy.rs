//! The example configurations in `deploy/` load: every aggregator config (a `deploy/*.toml`
//! with a `[server]` table) parses and validates against the files it names, laid out as the
//! deployment would lay them out next to it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aggregator::config::{token_digest, Config, ServerOptimizer, Transport};

const TOKEN: &str = "deploy-test-enrollment-token-0123";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `deploy/*.toml` whose top level has a `[server]` table, with its text.
fn aggregator_configs() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo().join("deploy")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let table: toml::Table =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{} is not TOML: {e}", path.display()));
        if table.get("server").is_some_and(toml::Value::is_table) {
            out.push((path, text));
        }
    }
    out.sort();
    out
}

/// A folder laid out like a deployment: `<tmp>/deploy/` holds the config's neighbours
/// (`tls/`, `enrollment-token`, `models/`) and `<tmp>/models` serves `../models/...`.
/// Returns the guard and the base folder to resolve against.
fn deployment() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("deploy");
    std::fs::create_dir(&base).unwrap();
    let m = aggregator::tls::generate(&["localhost".into()]).unwrap();
    aggregator::tls::write(&m, &base.join("tls")).unwrap();
    std::fs::write(base.join("enrollment-token"), format!("{TOKEN}\n")).unwrap();
    let models = repo().join("models");
    std::os::unix::fs::symlink(&models, base.join("models")).unwrap();
    std::os::unix::fs::symlink(&models, tmp.path().join("models")).unwrap();
    (tmp, base)
}

fn parse(text: &str) -> anyhow::Result<Config> {
    let (_tmp, base) = deployment();
    Config::parse(text, &base)
}

#[test]
fn every_example_aggregator_config_loads() {
    let configs = aggregator_configs();
    assert!(
        configs.len() >= 2,
        "expected at least deploy/aggregator.toml and deploy/aggregator-loopback.toml, found {configs:?}"
    );
    let mut seen = Vec::new();
    for (path, text) in &configs {
        let (_tmp, base) = deployment();
        let cfg =
            Config::parse(text, &base).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        match name.as_str() {
            "aggregator.toml" => {
                assert!(matches!(cfg.transport, Transport::Tls { .. }));
                assert!(cfg.listen.ip().is_unspecified());
                assert_eq!(cfg.listen.port(), 50051);
                assert_eq!(cfg.metrics_listen.map(|a| a.port()), Some(9090));
                assert_eq!(cfg.state_dir, Path::new("/var/lib/fedpersona"));
                // The token comes from the token file next to the config.
                assert_eq!(cfg.enrollment_token_digests, vec![token_digest(TOKEN)]);
                assert_eq!(cfg.rounds.target_reports.get(), 50);
                assert_eq!(cfg.rounds.max_assigned.get(), 65);
                assert_eq!(cfg.rounds.min_reports.get(), 20);
                assert_eq!(cfg.rounds.round_timeout, Duration::from_secs(900));
                assert_eq!(cfg.rounds.max_rounds, None);
                assert_eq!(cfg.meta, ServerOptimizer::Sgd { lr: 1.0 });
                assert_eq!(cfg.model.vocab_size, 256, "the shipped byte-level model");
            }
            "aggregator-loopback.toml" => {
                assert!(matches!(cfg.transport, Transport::Plaintext));
                assert!(cfg.listen.ip().is_loopback());
                assert_eq!(cfg.listen.port(), 50051);
                assert_eq!(cfg.state_dir, base.join("state"));
                assert_eq!(
                    cfg.enrollment_token_digests,
                    vec![token_digest("dev-enrollment-token-change-me")]
                );
                assert_eq!(cfg.rounds.target_reports.get(), 2);
                assert_eq!(cfg.rounds.min_reports.get(), 2);
                assert_eq!(cfg.rounds.round_timeout, Duration::from_secs(120));
                assert_eq!(cfg.rounds.min_task_time, Duration::from_secs(5));
                assert_eq!(cfg.rounds.max_rounds, None);
            }
            _ => {}
        }
        seen.push(name);
    }
    for want in ["aggregator.toml", "aggregator-loopback.toml"] {
        assert!(seen.iter().any(|s| s == want), "{want} not in {seen:?}");
    }
}

#[test]
fn example_configs_refuse_unknown_keys_and_public_plaintext() {
    let deploy = repo().join("deploy");
    let production = std::fs::read_to_string(deploy.join("aggregator.toml")).unwrap();
    assert!(production.contains("\n[server]\n"));
    let typo = production.replacen("\n[server]\n", "\n[server]\nlisten_adress = \"x\"\n", 1);
    let err = format!("{:#}", parse(&typo).unwrap_err());
    assert!(err.contains("listen_adress"), "{err}");
    let table = production.replacen(
        "\n[rounds]\n",
        "\n[schedule]\ncohort_size = 1\n[rounds]\n",
        1,
    );
    let err = format!("{:#}", parse(&table).unwrap_err());
    assert!(err.contains("schedule"), "{err}");

    let loopback = std::fs::read_to_string(deploy.join("aggregator-loopback.toml")).unwrap();
    for (from, to) in [
        ("listen = \"127.0.0.1:50051\"", "listen = \"0.0.0.0:50051\""),
        (
            "metrics_listen = \"127.0.0.1:9090\"",
            "metrics_listen = \"0.0.0.0:9090\"",
        ),
    ] {
        assert!(loopback.contains(from), "{from}");
        let public = loopback.replacen(from, to, 1);
        let err = format!("{:#}", parse(&public).unwrap_err());
        assert!(
            err.contains("plaintext") && err.contains("loopback"),
            "{err}"
        );
    }
}

/// The keys serde names in an "unknown field `x`, expected one of `a`, `b`" error.
fn expected_keys(err: &str) -> Vec<String> {
    let list = err
        .split_once("expected one of ")
        .or_else(|| err.split_once("expected "))
        .unwrap_or_else(|| panic!("no key list in {err:?}"))
        .1;
    list.lines()
        .next()
        .unwrap()
        .split('`')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect()
}

/// Whether `key = ...` is set or shown commented out (`# key = ...`) in `text`.
fn mentions(text: &str, key: &str) -> bool {
    text.lines().any(|l| {
        l.trim_start_matches(['#', ' '])
            .strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
    })
}

/// deploy/aggregator.toml shows every table and every key the schema knows (the schema's
/// own error message lists them), so a new option cannot go undocumented.
#[test]
fn production_example_shows_every_key() {
    let text = std::fs::read_to_string(repo().join("deploy/aggregator.toml")).unwrap();
    let err = format!("{:#}", parse(&format!("[zz_unknown]\n{text}")).unwrap_err());
    let tables = expected_keys(&err);
    assert!(tables.len() >= 10, "{tables:?}");
    for table in tables {
        let header = format!("\n[{table}]\n");
        assert!(
            text.contains(&header),
            "deploy/aggregator.toml lacks [{table}]"
        );
        let probe = text.replacen(&header, &format!("{header}zz_unknown = 1\n"), 1);
        let err = format!("{:#}", parse(&probe).unwrap_err());
        for key in expected_keys(&err) {
            assert!(
                mentions(&text, &key),
                "deploy/aggregator.toml does not show [{table}] {key}"
            );
        }
    }
}
