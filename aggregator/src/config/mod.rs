//! `aggregator serve` configuration: a TOML file (unknown keys refused) resolved into a
//! validated [`Config`] before any port is bound. Relative paths are relative to the file.
//!
//! [`file`] is the file's schema (public, so another program can build and write one);
//! `policy` holds the validated types; this module loads and validates.

mod clipping;
pub mod file;
mod policy;
mod privacy;
mod sampling;
mod snr;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use fedpersona_model::config::LlamaConfig;
use fedpersona_model::lora::{LoraConfig, Target};
use fedpersona_privacy::codec::Encoding;

use file::ConfigFile;
pub use policy::{
    AdaptiveClipping, Budget, LocalTraining, PrivacyMode, PrivacyPolicy, RoundPolicy, Sampling,
    SecAggPolicy, ServerOptimizer, Transport, UpdatePolicy, Weighting,
};
pub use snr::MIN_EXPECTED_SNR;

/// What one client can hold of the server: connections, handshake time, streams.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub max_streams_per_connection: u32,
}

/// A validated `serve` configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub state_dir: PathBuf,
    pub max_concurrent_uploads: usize,
    /// Longest wait for an upload's header, and between its chunks.
    pub upload_idle_timeout: Duration,
    /// Longest an upload stream may take.
    pub upload_timeout: Duration,
    pub keep_versions: usize,
    pub connections: ConnectionLimits,
    pub transport: Transport,
    /// SHA-256 digests of the accepted enrollment tokens (tokens themselves are not kept).
    pub enrollment_token_digests: Vec<[u8; 32]>,
    pub model: LlamaConfig,
    pub adapter: LoraConfig,
    pub rounds: RoundPolicy,
    pub training: LocalTraining,
    pub update: UpdatePolicy,
    pub meta: ServerOptimizer,
    pub privacy: PrivacyPolicy,
    pub secure_aggregation: Option<SecAggPolicy>,
}

impl Config {
    /// Reads, parses and validates a config file; the error names the file and the problem.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
            .with_context(|| format!("invalid config {}", path.display()))
    }

    /// Parses config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> anyhow::Result<Config> {
        let f: ConfigFile = toml::from_str(text)?;
        let resolve = |p: &Path| fedpersona_model::checkpoint::resolve_path(base, p);

        let transport = match (&f.tls.cert, &f.tls.key, f.tls.plaintext) {
            (Some(cert), Some(key), false) => {
                let (cert, key) = (resolve(cert), resolve(key));
                Transport::Tls {
                    cert_pem: std::fs::read(&cert)
                        .with_context(|| format!("tls.cert {}", cert.display()))?,
                    key_pem: std::fs::read(&key)
                        .with_context(|| format!("tls.key {}", key.display()))?,
                }
            }
            (None, None, true) => {
                ensure!(
                    f.server.listen.ip().is_loopback()
                        && f.server.metrics_listen.is_none_or(|a| a.ip().is_loopback()),
                    "tls.plaintext is only allowed on a loopback listen address, not {}",
                    f.server.listen
                );
                Transport::Plaintext
            }
            (_, _, true) => bail!("tls.plaintext = true excludes tls.cert and tls.key"),
            _ => bail!("[tls] needs both cert and key (or plaintext = true on loopback)"),
        };

        let mut tokens = f.enrollment.tokens.clone();
        if let Some(p) = &f.enrollment.token_file {
            let p = resolve(p);
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("enrollment.token_file {}", p.display()))?;
            tokens.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from),
            );
        }
        ensure!(!tokens.is_empty(), "[enrollment] names no token");
        for t in &tokens {
            ensure!(
                t.len() >= 16,
                "enrollment tokens must be at least 16 characters"
            );
        }
        let enrollment_token_digests = tokens.iter().map(|t| token_digest(t)).collect::<Vec<_>>();

        let model_dir = resolve(&f.model.dir);
        let model = LlamaConfig::from_file(&model_dir.join("config.json"))
            .with_context(|| format!("model.dir {}", model_dir.display()))?;

        let targets = f
            .adapter
            .targets
            .iter()
            .map(|s| Target::parse(s).with_context(|| format!("unknown adapter target {s:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let adapter = LoraConfig {
            rank: f.adapter.rank,
            alpha: f.adapter.alpha,
            targets,
            freeze_a: f.adapter.freeze_a,
            seed: f.adapter.seed,
        };
        adapter.validate()?;

        let r = &f.rounds;
        let nz = |v: u32, what: &str| {
            NonZeroU32::new(v).with_context(|| format!("rounds.{what} must be at least 1"))
        };
        let target_reports = nz(r.cohort_size, "cohort_size")?;
        let min_reports = nz(r.min_reports, "min_reports")?;
        ensure!(
            min_reports <= target_reports,
            "rounds.min_reports ({min_reports}) exceeds rounds.cohort_size ({target_reports})"
        );
        let (sampling, max_assigned) = sampling::sampling_policy(&f, target_reports)?;
        let secs = |v: f64, what: &str| -> anyhow::Result<Duration> {
            ensure!(
                v.is_finite() && v > 0.0 && v < 1e7,
                "rounds.{what} must be a positive number of seconds"
            );
            Ok(Duration::from_secs_f64(v))
        };
        let round_timeout = secs(r.round_timeout_s, "round_timeout_s")?;
        let min_task_time = secs(r.min_task_time_s, "min_task_time_s")?;
        ensure!(
            min_task_time < round_timeout,
            "rounds.min_task_time_s must be below rounds.round_timeout_s"
        );
        let rounds = RoundPolicy {
            sampling,
            target_reports,
            max_assigned,
            min_reports,
            round_timeout,
            min_task_time,
            retry_after: secs(r.retry_after_s, "retry_after_s")?,
            max_rounds: (r.max_rounds > 0).then_some(r.max_rounds),
        };

        let t = &f.training;
        ensure!(t.steps >= 1, "training.steps must be at least 1");
        ensure!(t.batch_size >= 1, "training.batch_size must be at least 1");
        ensure!(
            t.seq_len >= 8 && t.seq_len as usize <= model.max_position_embeddings,
            "training.seq_len must be in [8, {}]",
            model.max_position_embeddings
        );
        ensure!(
            t.learning_rate.is_finite() && t.learning_rate > 0.0,
            "training.learning_rate must be positive"
        );
        ensure!(
            t.weight_decay.is_finite() && t.weight_decay >= 0.0,
            "training.weight_decay must be non-negative"
        );
        ensure!(
            t.grad_clip.is_finite() && t.grad_clip >= 0.0,
            "training.grad_clip must be non-negative (0 = off)"
        );
        let training = LocalTraining {
            steps: t.steps,
            learning_rate: t.learning_rate,
            batch_size: t.batch_size,
            seq_len: t.seq_len,
            weight_decay: t.weight_decay,
            grad_clip: t.grad_clip,
        };

        let u = &f.update;
        ensure!(
            u.clip_norm.is_finite() && u.clip_norm > 0.0 && u.clip_norm < 1e6,
            "update.clip_norm must be positive"
        );
        let encoding = match u.encoding.as_str() {
            "q8" => Encoding::Q8,
            "f32" => Encoding::F32,
            other => bail!("update.encoding must be \"q8\" or \"f32\", not {other:?}"),
        };
        ensure!(
            (1024..=1 << 30).contains(&u.max_upload_bytes),
            "update.max_upload_bytes must be between 1 KiB and 1 GiB"
        );
        ensure!(
            (1024..=4 << 20).contains(&u.chunk_bytes),
            "update.chunk_bytes must be between 1 KiB and 4 MiB"
        );
        let weighting = match u.weighting.as_str() {
            "uniform" => Weighting::Uniform,
            "examples" => {
                ensure!(
                    u.max_examples_weight >= 1,
                    "update.max_examples_weight must be at least 1"
                );
                Weighting::Examples {
                    cap: u.max_examples_weight,
                }
            }
            other => bail!("update.weighting must be \"uniform\" or \"examples\", not {other:?}"),
        };
        let mut update = UpdatePolicy {
            clip_norm: u.clip_norm as f32,
            adaptive: None,
            encoding,
            max_upload_bytes: u.max_upload_bytes,
            chunk_bytes: u.chunk_bytes,
            weighting,
        };

        let m = &f.meta;
        let finite_pos = |v: f64, what: &str| {
            ensure!(v.is_finite() && v > 0.0, "meta.{what} must be positive");
            Ok(())
        };
        finite_pos(m.server_lr, "server_lr")?;
        let meta = match m.optimizer.as_str() {
            "sgd" => ServerOptimizer::Sgd { lr: m.server_lr },
            "momentum" => {
                ensure!((0.0..1.0).contains(&m.momentum), "meta.momentum must be in [0, 1)");
                ServerOptimizer::Momentum {
                    lr: m.server_lr,
                    momentum: m.momentum,
                }
            }
            "adam" => {
                ensure!((0.0..1.0).contains(&m.beta1), "meta.beta1 must be in [0, 1)");
                ensure!((0.0..1.0).contains(&m.beta2), "meta.beta2 must be in [0, 1)");
                finite_pos(m.tau, "tau")?;
                ServerOptimizer::Adam {
                    lr: m.server_lr,
                    beta1: m.beta1,
                    beta2: m.beta2,
                    tau: m.tau,
                }
            }
            other => bail!(
                "meta.optimizer must be \"sgd\" (FedAvg/Reptile), \"momentum\" (FedAvgM) or \"adam\" (FedAdam), not {other:?}"
            ),
        };

        let (privacy, secure_aggregation) = privacy::privacy_policy(&f, &rounds, &update)?;
        update.adaptive = clipping::adaptive_clipping(&f, &rounds, &privacy)?;

        ensure!(
            f.server.max_concurrent_uploads >= 1,
            "server.max_concurrent_uploads must be at least 1"
        );
        ensure!(
            f.server.keep_versions >= 1,
            "server.keep_versions must be at least 1"
        );
        ensure!(
            f.server.max_connections >= 1,
            "server.max_connections must be at least 1"
        );
        ensure!(
            f.server.max_streams_per_connection >= 1,
            "server.max_streams_per_connection must be at least 1"
        );
        let handshake = f.server.handshake_timeout_s;
        ensure!(
            handshake.is_finite() && handshake > 0.0 && handshake < 1e7,
            "server.handshake_timeout_s must be a positive number of seconds"
        );
        let (idle, whole) = (f.server.upload_idle_timeout_s, f.server.upload_timeout_s);
        ensure!(
            idle.is_finite() && idle > 0.0 && whole.is_finite() && idle <= whole && whole < 1e7,
            "server.upload_idle_timeout_s and server.upload_timeout_s must be positive seconds, the idle timeout at most the whole"
        );

        let config = Config {
            listen: f.server.listen,
            metrics_listen: f.server.metrics_listen,
            state_dir: resolve(&f.server.state_dir),
            max_concurrent_uploads: f.server.max_concurrent_uploads,
            upload_idle_timeout: Duration::from_secs_f64(idle),
            upload_timeout: Duration::from_secs_f64(whole),
            keep_versions: f.server.keep_versions,
            connections: ConnectionLimits {
                max_connections: f.server.max_connections,
                handshake_timeout: Duration::from_secs_f64(handshake),
                max_streams_per_connection: f.server.max_streams_per_connection,
            },
            transport,
            enrollment_token_digests,
            model,
            adapter,
            rounds,
            training,
            update,
            meta,
            privacy,
            secure_aggregation,
        };
        snr::check(&config, f.privacy.allow_low_snr)?;
        Ok(config)
    }
}

/// SHA-256 of an enrollment token: what the server compares.
pub fn token_digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

#[cfg(test)]
mod tests {
    use super::file::{
        ConfigFile, EnrollmentFile, ModelFile, RoundsFile, SamplingFile, ServerFile, TlsFile,
    };
    use super::*;
    use fedpersona_privacy::accountant::Method;
    use fedpersona_privacy::sampling;

    const TOKEN: &str = "test-enrollment-token-0123456789";

    fn model_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/model/tests/fixtures/hf-tiny-llama")
    }

    fn sample() -> ConfigFile {
        let mut f = ConfigFile::new(
            ServerFile::new("127.0.0.1:0".parse().unwrap(), "state"),
            TlsFile::plaintext(),
            EnrollmentFile::tokens(vec![TOKEN.into()]),
            ModelFile { dir: model_dir() },
            RoundsFile::new(4, 2, 600.0),
        );
        f.server.keep_versions = 2;
        f.adapter.rank = 4;
        f.adapter.targets = vec!["q_proj".into(), "v_proj".into()];
        f.rounds.max_rounds = 3;
        f.rounds.sampling = SamplingFile::Poisson;
        f.training.seq_len = 32;
        f.privacy.mode = "central".into();
        f.privacy.noise_multiplier = 1.0;
        f.privacy.population = 1000;
        f.privacy.epsilon_budget = 10.0;
        f.privacy.delta = 1e-5;
        f.privacy.accountant = Method::Pld;
        f.privacy.allow_low_snr = true;
        f
    }

    #[test]
    fn a_written_file_loads_as_the_same_config() {
        let dir = tempfile::tempdir().unwrap();
        let file = sample();
        let text = toml::to_string(&file).unwrap();
        assert_eq!(toml::from_str::<ConfigFile>(&text).unwrap(), file);
        let path = dir.path().join("aggregator.toml");
        std::fs::write(&path, &text).unwrap();
        let loaded = Config::load(&path).unwrap();

        let by_hand = format!(
            r#"
[server]
listen = "127.0.0.1:0"
state_dir = "state"
keep_versions = 2
[tls]
plaintext = true
[enrollment]
tokens = ["{TOKEN}"]
[model]
dir = {:?}
[adapter]
rank = 4
targets = ["q_proj", "v_proj"]
[rounds]
sampling = "poisson"
cohort_size = 4
min_reports = 2
round_timeout_s = 600
max_rounds = 3
[training]
seq_len = 32
[privacy]
mode = "central"
noise_multiplier = 1.0
population = 1000
epsilon_budget = 10.0
delta = 1e-5
accountant = "pld"
allow_low_snr = true
"#,
            model_dir().display().to_string()
        );
        let parsed = Config::parse(&by_hand, dir.path()).unwrap();
        assert_eq!(format!("{loaded:?}"), format!("{parsed:?}"));

        assert_eq!(loaded.state_dir, dir.path().join("state"));
        assert!(matches!(loaded.transport, Transport::Plaintext));
        assert_eq!(loaded.enrollment_token_digests, vec![token_digest(TOKEN)]);
        assert_eq!(loaded.rounds.target_reports.get(), 4);
        // Each device joins with q = 4/1000; the largest cohort a round takes leaves a chance
        // of more below 1 % of δ over the 3 rounds.
        let q = 4.0 / 1000.0;
        // Joins close three check-in intervals (30 s by default) after a round opens.
        assert_eq!(
            loaded.rounds.sampling,
            Sampling::Poisson {
                rate: q,
                join_window: Duration::from_secs(90)
            }
        );
        let tail = sampling::oversubscription_tail(1e-5, 10.0, 3);
        let cap = u64::from(loaded.rounds.max_assigned.get());
        assert!(sampling::upper_tail(1000, q, cap) <= tail);
        assert!(sampling::upper_tail(1000, q, cap - 1) > tail);
        assert_eq!(loaded.rounds.max_rounds, Some(3));
        assert_eq!(loaded.privacy.mode, PrivacyMode::Central);
        assert_eq!(loaded.privacy.sampling_rate, q);
        assert_eq!(loaded.privacy.accountant, Method::Pld);
        assert_eq!(
            loaded.privacy.budget,
            Some(Budget {
                epsilon: 10.0,
                delta: 1e-5
            })
        );
        assert!(loaded.secure_aggregation.is_none());
    }

    /// The sample's rounds: central noise z = 1 over 4 reports of d = 1792 values (rank 4 on
    /// q_proj 64×64 and v_proj 32×64, 2 layers: 2·(512 + 384)). Grid k = −12 (0.02/√1792 =
    /// 4.72e-4, log2 −11.05), slack 2^−13·√1792 = 0.005167483; σ on the mean
    /// (1 + 2·0.005167483)/4 = 0.25258374, noise norm ·√1792 = 10.69238 C, SNR 0.0935245.
    #[test]
    fn a_hopeless_snr_is_refused_naming_the_field_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let parse = |f: &ConfigFile| Config::parse(&toml::to_string(f).unwrap(), dir.path());
        let mut f = sample();
        f.privacy.allow_low_snr = false;
        let err = format!("{:#}", parse(&f).unwrap_err());
        assert!(err.contains("privacy.allow_low_snr = true"), "{err}");
        assert!(err.contains("0.0935, below 0.1"), "{err}");
        f.privacy.allow_low_snr = true;
        let c = parse(&f).unwrap();
        assert_eq!(c.update_values(), 1792);
        assert!((c.release_noise_norm(4) - 10.692_380).abs() < 1e-5);
        assert!((c.expected_snr().unwrap() - 0.093_524_5).abs() < 1e-6);

        // Half the noise: SNR 0.187, accepted without insisting.
        f.privacy.allow_low_snr = false;
        f.privacy.noise_multiplier = 0.5;
        let c = parse(&f).unwrap();
        assert!((c.expected_snr().unwrap() - 0.187_049).abs() < 1e-6);
        // Local noise: 0.5·1/√4 = 0.25 a value, 0.25·√1792 = 10.583 C: refused again.
        f.privacy.mode = "local".into();
        let err = format!("{:#}", parse(&f).unwrap_err());
        assert!(err.contains("privacy.allow_low_snr"), "{err}");
        // Without DP there is no noise and nothing to refuse.
        let mut f = sample();
        f.privacy = file::PrivacyFile::default();
        f.rounds.sampling = SamplingFile::FirstCome;
        assert_eq!(parse(&f).unwrap().expected_snr(), None);
    }

    #[test]
    fn sampling_the_accountant_cannot_stand_behind_is_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let refused = |edit: &dyn Fn(&mut ConfigFile), field: &str| {
            let mut f = sample();
            edit(&mut f);
            let e = Config::parse(&toml::to_string(&f).unwrap(), dir.path())
                .map(drop)
                .expect_err(field);
            assert!(format!("{e:#}").contains(field), "{field}: {e:#}");
        };
        refused(
            &|f| f.rounds.sampling = SamplingFile::FirstCome,
            "rounds.sampling must be \"poisson\"",
        );
        refused(
            &|f| f.rounds.over_selection = Some(0.3),
            "rounds.over_selection",
        );
        refused(&|f| f.privacy.population = 3, "privacy.population");
        refused(
            &|f| f.privacy.population = 2_000_000_000,
            "privacy.population",
        );
        refused(
            &|f| {
                f.privacy = Default::default();
                f.rounds.sampling = SamplingFile::FirstCome;
                f.rounds.over_selection = Some(11.0);
            },
            "rounds.over_selection",
        );
        refused(
            &|f| f.rounds.join_window_s = Some(10.0),
            "must be at least rounds.retry_after_s",
        );
        refused(
            &|f| f.rounds.join_window_s = Some(600.0),
            "less than rounds.round_timeout_s",
        );
        refused(
            &|f| f.rounds.join_window_s = Some(f64::NAN),
            "rounds.join_window_s",
        );
        refused(
            &|f| {
                f.privacy = Default::default();
                f.rounds.sampling = SamplingFile::FirstCome;
                f.rounds.join_window_s = Some(60.0);
            },
            "rounds.join_window_s is for",
        );
        // Poisson sampling needs a population even without DP.
        refused(&|f| f.privacy = Default::default(), "privacy.population");
        let mut f = sample();
        f.privacy = Default::default();
        f.rounds.sampling = SamplingFile::FirstCome;
        let c = Config::parse(&toml::to_string(&f).unwrap(), dir.path()).unwrap();
        assert_eq!(c.rounds.sampling, Sampling::FirstCome);
        assert_eq!(c.rounds.max_assigned.get(), 6);
    }

    #[test]
    fn adaptive_clipping_is_validated_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let parse = |edit: &dyn Fn(&mut file::AdaptiveClippingFile), mode: &str| {
            let mut f = sample();
            f.privacy.mode = mode.into();
            let mut a = file::AdaptiveClippingFile::default();
            edit(&mut a);
            f.update.adaptive_clipping = Some(a);
            Config::parse(&toml::to_string(&f).unwrap(), dir.path())
        };
        let refused = |edit: &dyn Fn(&mut file::AdaptiveClippingFile), mode: &str, want: &str| {
            let e = format!("{:#}", parse(edit, mode).map(drop).expect_err(want));
            assert!(e.contains(want), "{want}: {e}");
        };
        // The sample: central z = 1 over a cohort of 4, so the default σ_b = 0.2 cannot
        // carry the split (it needs σ_b > z/2).
        refused(
            &|_| {},
            "central",
            "update.adaptive_clipping.count_stddev (0.2",
        );
        refused(
            &|a| a.count_stddev = Some(1.0),
            "local",
            "update.adaptive_clipping needs",
        );
        refused(
            &|a| {
                a.count_stddev = Some(1.0);
                a.target_quantile = 1.0;
            },
            "central",
            "target_quantile",
        );
        refused(
            &|a| {
                a.count_stddev = Some(1.0);
                a.learning_rate = 0.0;
            },
            "central",
            "learning_rate",
        );
        refused(
            &|a| {
                a.count_stddev = Some(1.0);
                a.initial_clip_norm = Some(1.0);
            },
            "central",
            "initial_clip_norm",
        );
        // σ_b = 1, z = 1: C/C' = √(1 − 1/4), so C starts at √0.75 of update.clip_norm.
        let c = parse(&|a| a.count_stddev = Some(1.0), "central").unwrap();
        let a = c.update.adaptive.unwrap();
        assert!((a.max - 0.75f64.sqrt()).abs() < 1e-12);
        assert_eq!((a.initial, a.min), (a.max, a.max * 1e-3));
        assert_eq!((a.target_quantile, a.learning_rate), (0.5, 0.2));
    }

    #[test]
    fn the_constructors_default_as_the_file_does() {
        let minimal = format!(
            r#"
[server]
listen = "127.0.0.1:0"
state_dir = "state"
[tls]
plaintext = true
[enrollment]
tokens = ["{TOKEN}"]
[model]
dir = {:?}
[rounds]
cohort_size = 4
min_reports = 2
round_timeout_s = 600
"#,
            model_dir().display().to_string()
        );
        let built = ConfigFile::new(
            ServerFile::new("127.0.0.1:0".parse().unwrap(), "state"),
            TlsFile::plaintext(),
            EnrollmentFile::tokens(vec![TOKEN.into()]),
            ModelFile { dir: model_dir() },
            RoundsFile::new(4, 2, 600.0),
        );
        assert_eq!(toml::from_str::<ConfigFile>(&minimal).unwrap(), built);
        let tls = TlsFile::files("tls/server.pem", "tls/server.key");
        let text = toml::to_string(&tls).unwrap();
        assert_eq!(
            text,
            "cert = \"tls/server.pem\"\nkey = \"tls/server.key\"\nplaintext = false\n"
        );
    }
}
