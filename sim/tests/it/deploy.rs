//! Both sides' deployment examples together: every `deploy/agent*.toml` loads as a
//! deployment lays it out, and the loopback agent can reach the loopback aggregator.

use std::path::{Path, PathBuf};

/// Every `deploy/agent*.toml` loads, laid out as a deployment would lay it out (CA, token
/// file and data next to it; `../models` and `../data` beside its folder); the loopback agent
/// matches the loopback aggregator; the production example shows every key of the schema.
#[test]
fn deploy_example_agent_configs_load() {
    use device_agent::federation::AgentConfig;
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
                assert_eq!(cfg.state_dir.root(), Path::new("/var/lib/fedpersona-agent"));
                assert_eq!(cfg.data.data, base.join("data/me.jsonl"));
                assert_eq!(cfg.data.user, None);
                assert_eq!(cfg.data.load().unwrap().len(), 1);
                assert_eq!(cfg.checkin_interval, Duration::from_secs(60));
                assert_eq!(cfg.max_rounds, None);
            }
            "agent-loopback.toml" => {
                assert_eq!(cfg.connection.ca_pem, None);
                assert_eq!(cfg.state_dir.root(), base.join("agent-state"));
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
