//! The agent's configuration file (`device-agent run --config FILE`), checked as a whole
//! before anything starts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use serde::Deserialize;

use crate::federation::client::{self, Connection, Retry};
use crate::fs::StateDir;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    aggregator: AggregatorFile,
    device: DeviceFile,
    #[serde(default)]
    schedule: ScheduleFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AggregatorFile {
    url: String,
    ca_cert: Option<PathBuf>,
    domain: Option<String>,
    enrollment_token: Option<String>,
    enrollment_token_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceFile {
    state_dir: PathBuf,
    model_dir: Option<PathBuf>,
    /// The user's text: a text/JSONL file or a plays folder (with `user`).
    data: PathBuf,
    user: Option<String>,
    #[serde(default)]
    threads: usize,
    local_socket: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ScheduleFile {
    checkin_interval_s: f64,
    max_attempts: u32,
    backoff_initial_s: f64,
    backoff_max_s: f64,
    max_rounds: u64,
}

impl Default for ScheduleFile {
    fn default() -> Self {
        ScheduleFile {
            checkin_interval_s: 60.0,
            max_attempts: 5,
            backoff_initial_s: 0.5,
            backoff_max_s: 30.0,
            max_rounds: 0,
        }
    }
}

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub connection: Connection,
    pub enrollment_token: String,
    pub state_dir: StateDir,
    pub model_dir: PathBuf,
    pub data: crate::dataset::DataArgs,
    pub threads: usize,
    /// Longest wait between check-ins (the aggregator may ask for less).
    pub checkin_interval: Duration,
    pub retry: Retry,
    /// Stop after reporting in this many rounds (None: run until stopped).
    pub max_rounds: Option<u64>,
    /// Fixes the randomness of local training and encoding per round (the simulation's
    /// reproducible runs); None, as on a real device, draws it from the OS.
    pub seed: Option<u64>,
    /// Where `run` also serves the local API for apps on the device (None: it does not).
    pub local_socket: Option<PathBuf>,
}

impl AgentConfig {
    pub fn load(path: &Path) -> anyhow::Result<AgentConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
            .with_context(|| format!("invalid config {}", path.display()))
    }

    pub fn parse(text: &str, base: &Path) -> anyhow::Result<AgentConfig> {
        let f: File = toml::from_str(text)?;
        let resolve = |p: &Path| fedpersona_model::checkpoint::resolve_path(base, p);
        let ca_pem = f
            .aggregator
            .ca_cert
            .as_ref()
            .map(|p| {
                let p = resolve(p);
                std::fs::read(&p).with_context(|| format!("aggregator.ca_cert {}", p.display()))
            })
            .transpose()?;
        let token = match (
            &f.aggregator.enrollment_token,
            &f.aggregator.enrollment_token_file,
        ) {
            (Some(t), None) => t.clone(),
            (None, Some(p)) => {
                let p = resolve(p);
                std::fs::read_to_string(&p)
                    .with_context(|| format!("aggregator.enrollment_token_file {}", p.display()))?
                    .trim()
                    .to_string()
            }
            _ => bail!("[aggregator] needs exactly one of enrollment_token, enrollment_token_file"),
        };
        ensure!(!token.is_empty(), "the enrollment token is empty");
        let connection = Connection {
            url: f.aggregator.url.clone(),
            ca_pem,
            domain: f.aggregator.domain.clone(),
        };
        // Validates the URL and the TLS/plaintext rule without dialing.
        client::channel_check(&connection)?;
        let s = &f.schedule;
        let secs = |v: f64, what: &str| -> anyhow::Result<Duration> {
            ensure!(
                v.is_finite() && v > 0.0 && v < 1e7,
                "schedule.{what} must be a positive number of seconds"
            );
            Ok(Duration::from_secs_f64(v))
        };
        ensure!(
            s.max_attempts >= 1,
            "schedule.max_attempts must be at least 1"
        );
        Ok(AgentConfig {
            connection,
            enrollment_token: token,
            state_dir: StateDir::new(resolve(&f.device.state_dir)),
            model_dir: f
                .device
                .model_dir
                .as_ref()
                .map_or_else(fedpersona_model::checkpoint::default_model_dir, |p| {
                    resolve(p)
                }),
            data: crate::dataset::DataArgs {
                data: resolve(&f.device.data),
                user: f.device.user.clone(),
            },
            threads: f.device.threads,
            checkin_interval: secs(s.checkin_interval_s, "checkin_interval_s")?,
            retry: Retry {
                max_attempts: s.max_attempts,
                initial: secs(s.backoff_initial_s, "backoff_initial_s")?,
                max: secs(s.backoff_max_s, "backoff_max_s")?,
            },
            max_rounds: (s.max_rounds > 0).then_some(s.max_rounds),
            seed: None,
            local_socket: f.device.local_socket.as_ref().map(|p| resolve(p)),
        })
    }
}
