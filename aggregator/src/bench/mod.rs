//! `aggregator bench ingest`: upload throughput and memory of a real aggregator (gRPC, TLS on
//! loopback, enrollment, signed uploads, full validation, streaming sum) for growing numbers of
//! uploads, each size in a fresh process so peak memory is its own. The reference printed
//! beside it is the in-process ceiling: decode + validate + add of the same updates, no network.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use fedpersona_model::config::LlamaConfig;
use fedpersona_model::lora::LoraAdapter;
use fedpersona_privacy::codec::{self, Encoding};
use fedpersona_privacy::tensors::AdapterTensors;
use fedpersona_proto::auth::{self, Signer};
use fedpersona_proto::v1 as pb;
use fedpersona_proto::v1::federation_client::FederationClient;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

mod secagg;

use crate::aggregate::{RunningSum, UpdateSpec};
use crate::config::Config;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Upload ingest: updates/s, MB/s and peak memory for each upload count.
    Ingest(IngestArgs),
    /// A secure-aggregation round's per-client and server costs (ms, bytes), beside the
    /// plain upload path of the same updates, and the DP noise sampling cost per parameter.
    Secagg(secagg::SecaggArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct IngestArgs {
    /// Upload counts to measure, each in a fresh process.
    #[arg(long, value_delimiter = ',', default_values_t = vec![100, 1000, 10000])]
    pub uploads: Vec<usize>,
    /// LoRA rank on q, k, v and o of the reference config (rank 12: 98,304 parameters).
    #[arg(long, default_value_t = 12)]
    pub rank: usize,
    /// Concurrent uploading clients.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    #[arg(long, default_value = "q8")]
    pub encoding: String,
    /// Print one JSON object per upload count.
    #[arg(long)]
    pub json: bool,
    /// Internal: measure one count in this process.
    #[arg(long, hide = true)]
    pub child: bool,
}

/// One measurement.
#[derive(Debug, Serialize, Deserialize)]
pub struct IngestReport {
    pub uploads: usize,
    pub parameters: usize,
    pub bytes_per_update: usize,
    pub seconds: f64,
    pub updates_per_s: f64,
    pub mb_per_s: f64,
    /// Peak RSS of the whole process (enrollment of every device included).
    pub peak_rss_mb: f64,
    /// RSS with every device enrolled and assigned, before the first upload.
    pub rss_before_uploads_mb: f64,
    /// Peak RSS while the uploads stream in (the ingest path's own footprint on top).
    pub peak_rss_uploads_mb: f64,
    /// Decode + validate + add of the same updates in process, no network (updates/s).
    pub ceiling_updates_per_s: f64,
    pub committed: bool,
}

pub async fn run(cmd: &BenchCommand) -> anyhow::Result<String> {
    let args = match cmd {
        BenchCommand::Ingest(args) => args,
        BenchCommand::Secagg(args) => return secagg::run(args),
    };
    if args.child {
        let [n] = args.uploads[..] else {
            bail!("--child measures exactly one upload count");
        };
        let r = ingest(args, n).await?;
        return Ok(serde_json::to_string(&r)?);
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut lines = Vec::new();
    if !args.json {
        lines.push(format!(
            "{:>8} {:>9} {:>10} {:>11} {:>9} {:>10} {:>14} {:>12} {:>14}",
            "uploads",
            "params",
            "bytes/upd",
            "updates/s",
            "MB/s",
            "peak MB",
            "before upl. MB",
            "upl. peak MB",
            "ceiling upd/s"
        ));
    }
    for &n in &args.uploads {
        let out = std::process::Command::new(&exe)
            .args(["bench", "ingest", "--child", "--uploads", &n.to_string()])
            .args(["--rank", &args.rank.to_string()])
            .args(["--clients", &args.clients.to_string()])
            .args(["--encoding", &args.encoding])
            .output()
            .context("running a measurement")?;
        if !out.status.success() {
            bail!(
                "measurement of {n} uploads failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or_default();
        if args.json {
            lines.push(line.to_string());
            continue;
        }
        let r: IngestReport = serde_json::from_str(line).context("measurement output")?;
        lines.push(format!(
            "{:>8} {:>9} {:>10} {:>11.0} {:>9.1} {:>10.0} {:>14.0} {:>12.0} {:>14.0}",
            r.uploads,
            r.parameters,
            r.bytes_per_update,
            r.updates_per_s,
            r.mb_per_s,
            r.peak_rss_mb,
            r.rss_before_uploads_mb,
            r.peak_rss_uploads_mb,
            r.ceiling_updates_per_s
        ));
    }
    Ok(lines.join("\n"))
}

async fn ingest(args: &IngestArgs, n: usize) -> anyhow::Result<IngestReport> {
    let encoding = match args.encoding.as_str() {
        "q8" => Encoding::Q8,
        "f32" => Encoding::F32,
        e => bail!("--encoding must be q8 or f32, not {e:?}"),
    };
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    std::fs::create_dir_all(&model_dir)?;
    std::fs::write(
        model_dir.join("config.json"),
        serde_json::to_vec(&LlamaConfig::reference().to_json())?,
    )?;
    let tls = crate::tls::generate(&["localhost".into()])?;
    crate::tls::write(&tls, &dir.path().join("tls"))?;
    let token = "bench-enrollment-token-0123456789";
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
state_dir = "state"
max_concurrent_uploads = 8
[tls]
cert = "tls/server.pem"
key = "tls/server.key"
[enrollment]
tokens = ["{token}"]
[model]
dir = "model"
[adapter]
rank = {rank}
alpha = {alpha}
targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
[rounds]
cohort_size = {n}
over_selection = 0
min_reports = {n}
round_timeout_s = 86400
min_task_time_s = 1
max_rounds = 1
[update]
clip_norm = 1.0
encoding = "{enc}"
"#,
        rank = args.rank,
        alpha = 2 * args.rank,
        enc = args.encoding,
    );
    let config = Config::parse(&text, dir.path())?;
    let spec = UpdateSpec::new(
        LoraAdapter::trained_shapes(&config.model, &config.adapter),
        1.0,
    );
    let parameters = spec.num_values();
    let update = sample_update(&spec, encoding);

    let ceiling = ceiling(&spec, &update, 200.min(n.max(1)));

    let handle = crate::server::start(config)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(crate::server::run(
        handle.clone(),
        listener,
        None,
        std::future::pending(),
    ));
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&tls.ca_cert_pem))
                .domain_name("localhost"),
        )?
        .connect()
        .await?;
    let client = FederationClient::new(channel);

    // Enroll and check in every device (not timed).
    let mut signers = Vec::with_capacity(n);
    for _ in 0..n {
        let key = auth::generate_key()?;
        let id = client
            .clone()
            .enroll(pb::EnrollRequest {
                token: token.into(),
                public_key: auth::public_key(&key)?,
                agent_version: "bench".into(),
            })
            .await?
            .into_inner()
            .device_id;
        let signer = Signer::new(id, &key)?;
        let mut req = pb::CheckInRequest::default();
        req.auth = Some(signer.auth("CheckIn", &req));
        match client.clone().check_in(req).await?.into_inner().outcome {
            Some(pb::check_in_response::Outcome::Task(_)) => {}
            other => bail!("device not assigned: {other:?}"),
        }
        signers.push(Arc::new(signer));
    }
    let sha = ring::digest::digest(&ring::digest::SHA256, &update)
        .as_ref()
        .to_vec();
    let peak_before = fedpersona_model::runtime::peak_rss_mb();
    let rss_before_uploads_mb = fedpersona_model::runtime::rss_mb();
    // Reset the peak (Linux: writing 5 to clear_refs resets VmHWM) to see the uploads' own.
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let update = Arc::new(update);
    let next = Arc::new(AtomicUsize::new(0));
    let signers = Arc::new(signers);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.clients.max(1) {
        let (client, next, signers, update, sha) = (
            client.clone(),
            next.clone(),
            signers.clone(),
            update.clone(),
            sha.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(s) = signers.get(i) else {
                    return Ok::<(), tonic::Status>(());
                };
                let mut header = pb::UploadHeader {
                    auth: None,
                    round: 1,
                    upload_nonce: s.nonce().to_vec(),
                    total_bytes: update.len() as u64,
                    sha256: sha.clone(),
                    num_examples: 1,
                    train_loss: 0.0,
                };
                header.auth = Some(s.auth("UploadUpdate", &header));
                let mut parts = vec![pb::UploadChunk {
                    part: Some(pb::upload_chunk::Part::Header(header)),
                }];
                parts.extend(update.chunks(256 << 10).map(|c| pb::UploadChunk {
                    part: Some(pb::upload_chunk::Part::Data(c.to_vec())),
                }));
                client
                    .clone()
                    .upload_update(tokio_stream::iter(parts))
                    .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let seconds = start.elapsed().as_secs_f64();
    // The full round commits (server step and a new version) once every report is in.
    let committed = handle.coordinator.wait_for(|v| v.rounds_committed >= 1);
    if tokio::time::timeout(std::time::Duration::from_secs(60), committed)
        .await
        .is_err()
    {
        bail!("the round did not commit");
    }
    let bytes = update.len();
    Ok(IngestReport {
        uploads: n,
        parameters,
        bytes_per_update: bytes,
        seconds,
        updates_per_s: n as f64 / seconds,
        mb_per_s: (n * bytes) as f64 / seconds / 1e6,
        peak_rss_mb: peak_before.max(fedpersona_model::runtime::peak_rss_mb()),
        rss_before_uploads_mb,
        peak_rss_uploads_mb: if reset {
            fedpersona_model::runtime::peak_rss_mb()
        } else {
            f64::NAN
        },
        ceiling_updates_per_s: ceiling,
        committed: true,
    })
}

/// A random update of norm just under 1, encoded.
fn sample_update(spec: &UpdateSpec, encoding: Encoding) -> Vec<u8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut t = AdapterTensors::default();
    for (name, shape) in spec.shapes() {
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|_| rand::Rng::random_range(&mut rng, -1.0f32..1.0))
            .collect();
        t.insert(name.clone(), shape.clone(), v);
    }
    let norm = t.l2_norm();
    t.scale((0.9 / norm) as f32);
    codec::encode(&t, encoding, &mut rng)
}

/// Updates/s of decode + validate + add in this process.
fn ceiling(spec: &UpdateSpec, update: &[u8], reps: usize) -> f64 {
    let mut sum = RunningSum::new(spec.clone());
    let limits = codec::DecodeLimits {
        max_tensors: spec.shapes().len(),
        max_values: spec.num_values(),
    };
    let start = Instant::now();
    for _ in 0..reps {
        let _ = crate::versions::sha256(update);
        let t = codec::decode(update, &limits).expect("own encoding decodes");
        sum.add(&t, 1.0).expect("valid update");
    }
    reps as f64 / start.elapsed().as_secs_f64()
}
