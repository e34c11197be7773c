//! The aggregator's gRPC service over TLS on 127.0.0.1:0 with a hand-driven device: every kind
//! of malformed upload is refused with its status and leaves the state unchanged; a killed
//! aggregator resumes from its journal without losing or double-counting anything.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aggregator::config::Config;
use aggregator::server::{self, Handle};
use fedpersona_privacy::codec::{self, Encoding};
use fedpersona_privacy::tensors::AdapterTensors;
use fedpersona_proto::auth::{self, Signer};
use fedpersona_proto::v1 as pb;
use fedpersona_proto::v1::federation_client::FederationClient;
use rand::SeedableRng;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

pub const TOKEN: &str = "test-enrollment-token-0123456789";

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/model/tests/fixtures/hf-tiny-llama")
}

/// Writes TLS material and a config into `dir`; `rounds` is the `[rounds]` table body.
pub fn write_config(dir: &Path, rounds: &str, extra: &str) -> PathBuf {
    write_config_with(dir, "", rounds, extra)
}

/// The same with more keys in `[server]`.
pub fn write_config_with(dir: &Path, server: &str, rounds: &str, extra: &str) -> PathBuf {
    let tls = aggregator::tls::generate(&["localhost".into(), "127.0.0.1".into()]).unwrap();
    aggregator::tls::write(&tls, &dir.join("tls")).unwrap();
    let path = dir.join("aggregator.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
state_dir = "state"
{server}

[tls]
cert = "tls/server.pem"
key = "tls/server.key"

[enrollment]
tokens = ["{TOKEN}"]

[model]
dir = "{}"

[adapter]
rank = 4
alpha = 8
targets = ["q_proj", "v_proj"]

[rounds]
{rounds}

[training]
steps = 2
batch_size = 4
seq_len = 32
{extra}
"#,
            model_dir().display()
        ),
    )
    .unwrap();
    path
}

/// An aggregator in its own runtime: dropping the runtime is as abrupt as a kill for
/// everything that is not already in the journal.
pub struct Server {
    pub rt: tokio::runtime::Runtime,
    pub addr: SocketAddr,
    pub handle: Handle,
    pub ca: Vec<u8>,
}

impl Server {
    /// Blocks until the coordinator's view satisfies `until` (30 s at most: then `what`).
    pub fn wait_for(
        &self,
        until: impl FnMut(&aggregator::round::RoundView) -> bool,
        what: &str,
    ) -> aggregator::round::RoundView {
        let view = self.handle.coordinator.wait_for(until);
        self.rt
            .block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(30), view).await
            })
            .unwrap_or_else(|_| panic!("{what}"))
    }

    pub fn start(config_path: &Path) -> Server {
        let config = Config::load(config_path).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let handle = server::start(config).unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(server::run(
            handle.clone(),
            listener,
            None,
            std::future::pending(),
        ));
        let ca = std::fs::read(config_path.parent().unwrap().join("tls/ca.pem")).unwrap();
        Server {
            rt,
            addr,
            handle,
            ca,
        }
    }

    pub fn channel(&self) -> Channel {
        let _guard = self.rt.enter();
        Endpoint::from_shared(format!("https://127.0.0.1:{}", self.addr.port()))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&self.ca))
                    .domain_name("localhost"),
            )
            .unwrap()
            .connect_lazy()
    }

    /// Enrolls a fresh key; returns its signer.
    pub fn device(&self) -> Arc<Signer> {
        let key = auth::generate_key().unwrap();
        let mut client = FederationClient::new(self.channel());
        let id = self
            .rt
            .block_on(client.enroll(pb::EnrollRequest {
                token: TOKEN.into(),
                public_key: auth::public_key(&key).unwrap(),
                agent_version: "test".into(),
            }))
            .unwrap()
            .into_inner()
            .device_id;
        Arc::new(Signer::new(id, &key).unwrap())
    }

    pub fn check_in(&self, s: &Signer) -> pb::check_in_response::Outcome {
        self.check_in_sampled(s, 0)
    }

    /// A check-in saying the device drew itself into `sampled_round`.
    pub fn check_in_sampled(
        &self,
        s: &Signer,
        sampled_round: u64,
    ) -> pb::check_in_response::Outcome {
        let mut req = pb::CheckInRequest {
            auth: None,
            last_round: 0,
            sampled_round,
        };
        req.auth = Some(s.auth("CheckIn", &req));
        self.rt
            .block_on(FederationClient::new(self.channel()).check_in(req))
            .unwrap()
            .into_inner()
            .outcome
            .unwrap()
    }

    /// The device's task; where the round samples its devices, as a device that drew
    /// itself in.
    pub fn task(&self, s: &Signer) -> pb::Task {
        use pb::check_in_response::Outcome;
        let outcome = match self.check_in(s) {
            Outcome::Sampling(d) => self.check_in_sampled(s, d.round),
            other => other,
        };
        match outcome {
            Outcome::Task(t) => t,
            other => panic!("expected a task, got {other:?}"),
        }
    }

    pub fn upload(&self, u: Upload) -> Result<pb::UploadReceipt, tonic::Status> {
        let mut header = pb::UploadHeader {
            auth: None,
            round: u.round,
            upload_nonce: u.nonce.clone(),
            total_bytes: u.total_bytes.unwrap_or(u.bytes.len() as u64),
            sha256: u.sha256.clone().unwrap_or_else(|| {
                ring::digest::digest(&ring::digest::SHA256, &u.bytes)
                    .as_ref()
                    .to_vec()
            }),
            num_examples: 10,
            train_loss: 0.0,
        };
        if let Some(s) = &u.signer {
            header.auth = Some(s.auth("UploadUpdate", &header));
        }
        let mut parts = vec![pb::UploadChunk {
            part: Some(pb::upload_chunk::Part::Header(header)),
        }];
        parts.extend(u.bytes.chunks(4096).map(|c| pb::UploadChunk {
            part: Some(pb::upload_chunk::Part::Data(c.to_vec())),
        }));
        self.rt
            .block_on(
                FederationClient::new(self.channel()).upload_update(tokio_stream::iter(parts)),
            )
            .map(|r| r.into_inner())
    }
}

/// An upload as a test builds it (every field can be wrong).
pub struct Upload {
    pub signer: Option<Arc<Signer>>,
    pub round: u64,
    pub nonce: Vec<u8>,
    pub bytes: Vec<u8>,
    pub total_bytes: Option<u64>,
    pub sha256: Option<Vec<u8>>,
}

impl Upload {
    pub fn new(signer: &Arc<Signer>, round: u64, bytes: Vec<u8>) -> Upload {
        Upload {
            signer: Some(signer.clone()),
            round,
            nonce: signer.nonce().to_vec(),
            bytes,
            total_bytes: None,
            sha256: None,
        }
    }
}

/// A delta of the server's layout with every value `v`, encoded.
pub fn delta(handle: &Handle, v: f32, encoding: Encoding) -> Vec<u8> {
    let mut t = AdapterTensors::default();
    for (name, shape) in handle.coordinator.spec().shapes() {
        t.insert(name.clone(), shape.clone(), vec![v; shape.iter().product()]);
    }
    codec::encode(&t, encoding, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0))
}

fn code(r: Result<pb::UploadReceipt, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[test]
fn malformed_uploads_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "cohort_size = 2\nmin_reports = 1\nround_timeout_s = 600\nmin_task_time_s = 1",
        "[update]\nmax_upload_bytes = 65536\nclip_norm = 1.0\nencoding = \"f32\"",
    );
    let srv = Server::start(&cfg);
    let h = &srv.handle;
    let a = srv.device();
    let outsider = srv.device();
    let task = srv.task(&a);
    assert_eq!(task.round, 1);
    let theta_before = h.coordinator.theta();
    let small = delta(h, 1e-3, Encoding::F32);

    // Unauthenticated: no auth, a signature by another key, a stale timestamp.
    let mut u = Upload::new(&a, 1, small.clone());
    u.signer = None;
    assert_eq!(code(srv.upload(u)), Code::Unauthenticated);
    let forged =
        Arc::new(Signer::new(a.device_id().to_string(), &auth::generate_key().unwrap()).unwrap());
    assert_eq!(
        code(srv.upload(Upload::new(&forged, 1, small.clone()))),
        Code::Unauthenticated
    );
    let mut req = pb::CheckInRequest::default();
    req.auth = Some(a.auth_at("CheckIn", &req, 1_000));
    let stale = srv
        .rt
        .block_on(FederationClient::new(srv.channel()).check_in(req))
        .unwrap_err();
    assert_eq!(stale.code(), Code::Unauthenticated);

    // Wrong round; a device that was not selected.
    assert_eq!(
        code(srv.upload(Upload::new(&a, 7, small.clone()))),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(srv.upload(Upload::new(&outsider, 1, small.clone()))),
        Code::FailedPrecondition
    );

    // NaN, wrong shape, too large a norm, garbage, a hash that does not match, oversized.
    let nan = delta(h, f32::NAN, Encoding::F32);
    assert_eq!(
        code(srv.upload(Upload::new(&a, 1, nan))),
        Code::InvalidArgument
    );
    let mut wrong = AdapterTensors::default();
    wrong.insert(
        h.coordinator.spec().shapes()[0].0.clone(),
        vec![3, 3],
        vec![0.0; 9],
    );
    let wrong = codec::encode(
        &wrong,
        Encoding::F32,
        &mut rand_chacha::ChaCha8Rng::seed_from_u64(0),
    );
    assert_eq!(
        code(srv.upload(Upload::new(&a, 1, wrong))),
        Code::InvalidArgument
    );
    let big = delta(h, 1.0, Encoding::F32);
    assert_eq!(
        code(srv.upload(Upload::new(&a, 1, big))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(srv.upload(Upload::new(&a, 1, b"not an update".to_vec()))),
        Code::InvalidArgument
    );
    let mut u = Upload::new(&a, 1, small.clone());
    u.sha256 = Some(vec![0; 32]);
    assert_eq!(code(srv.upload(u)), Code::InvalidArgument);
    let mut u = Upload::new(&a, 1, vec![0; 70_000]);
    u.total_bytes = Some(70_000);
    assert_eq!(code(srv.upload(u)), Code::InvalidArgument);
    // More data than the header declared.
    let mut u = Upload::new(&a, 1, small.clone());
    u.total_bytes = Some(small.len() as u64 - 1);
    assert_eq!(code(srv.upload(u)), Code::InvalidArgument);

    // Nothing of that reached the round.
    assert_eq!(h.coordinator.view().reports, 0);
    assert_eq!(h.coordinator.theta(), theta_before);
    assert_eq!(h.coordinator.metrics().reports(), 0);
    for reason in [
        "no_auth",
        "bad_signature",
        "wrong_round",
        "not_in_cohort",
        "malformed",
        "shape",
        "norm",
        "hash",
        "oversized",
    ] {
        assert!(
            h.coordinator.metrics().rejects(reason) >= 1,
            "no reject counted for {reason}"
        );
    }

    // A good upload counts once; its replay and a second report are refused.
    let good = Upload::new(&a, 1, small.clone());
    let nonce = good.nonce.clone();
    assert_eq!(srv.upload(good).unwrap().reports, 1);
    let mut replay = Upload::new(&a, 1, small.clone());
    replay.nonce = nonce;
    // A resend of a counted upload (its answer lost) is already done: ALREADY_EXISTS, which
    // the agent takes as success.
    assert_eq!(code(srv.upload(replay)), Code::AlreadyExists);
    assert_eq!(h.coordinator.view().reports, 1);
    let summary = h.coordinator.store().summary().unwrap();
    assert_eq!(summary.uploads, 1);
}

#[test]
fn a_killed_aggregator_resumes_from_its_journal() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "cohort_size = 2\nmin_reports = 2\nround_timeout_s = 600\nmin_task_time_s = 1",
        "[update]\nclip_norm = 1.0\nencoding = \"q8\"",
    );
    // Life 1: one of two reports arrives, then the process dies mid-round.
    let (a_key, b_key) = (auth::generate_key().unwrap(), auth::generate_key().unwrap());
    let enroll = |srv: &Server, key: &[u8]| {
        let id = srv
            .rt
            .block_on(
                FederationClient::new(srv.channel()).enroll(pb::EnrollRequest {
                    token: TOKEN.into(),
                    public_key: auth::public_key(key).unwrap(),
                    agent_version: "test".into(),
                }),
            )
            .unwrap()
            .into_inner()
            .device_id;
        Arc::new(Signer::new(id, key).unwrap())
    };
    let first_nonce;
    let (version0_sha, a_id, theta0) = {
        let srv = Server::start(&cfg);
        let a = enroll(&srv, &a_key);
        let b = enroll(&srv, &b_key);
        let t = srv.task(&a);
        srv.task(&b);
        let u = Upload::new(&a, t.round, delta(&srv.handle, 1e-3, Encoding::Q8));
        first_nonce = u.nonce.clone();
        assert_eq!(srv.upload(u).unwrap().reports, 1);
        let sha = srv.handle.coordinator.published().sha256;
        let theta0 = srv.handle.coordinator.theta();
        srv.rt.shutdown_background();
        (sha, a.device_id().to_string(), theta0)
    };

    // Life 2: round 1 is abandoned (its report discarded), round 2 runs and commits.
    let theta1;
    {
        let srv = Server::start(&cfg);
        let h = &srv.handle;
        let a = enroll(&srv, &a_key);
        let b = enroll(&srv, &b_key);
        assert_eq!(a.device_id(), a_id, "re-enrolling a key returns its id");
        let row = h.coordinator.store().round(1).unwrap().unwrap();
        assert_eq!(row.state, aggregator::store::RoundState::Abandoned);
        let view = h.coordinator.view();
        assert_eq!((view.round, view.version, view.reports), (2, 0, 0));
        assert_eq!(h.coordinator.published().sha256, version0_sha);

        let t = srv.task(&a);
        assert_eq!(t.round, 2);
        srv.task(&b);
        // The report of the dead round cannot be replayed into this one.
        let mut replay = Upload::new(&a, 2, delta(h, 1e-3, Encoding::Q8));
        replay.nonce = first_nonce.clone();
        assert_eq!(code(srv.upload(replay)), Code::AlreadyExists);
        srv.upload(Upload::new(&a, 2, delta(h, 1e-3, Encoding::Q8)))
            .unwrap();
        srv.upload(Upload::new(&b, 2, delta(h, 3e-3, Encoding::Q8)))
            .unwrap();
        // The driver commits the full round; wait for the new version.
        srv.wait_for(|v| v.version == 1, "round 2 never committed");
        theta1 = h.coordinator.theta();
        srv.rt.shutdown_background();
    }

    // Life 3: the committed round is there, exactly once, with the same θ.
    let srv = Server::start(&cfg);
    let h = &srv.handle;
    assert_eq!(h.coordinator.theta(), theta1);
    let s = h.coordinator.store().summary().unwrap();
    assert_eq!(s.rounds_committed, 1);
    assert_eq!(s.latest_version, Some(1));
    assert_eq!(
        s.uploads, 3,
        "two reports of round 2 and the discarded one of round 1"
    );
    // Round 3 was open (empty) at the kill: abandoned too; round 4 is next.
    assert_eq!(h.coordinator.view().round, 4);
    assert_eq!(s.rounds_abandoned, 2);
    // FedAvg of 1e-3 and 3e-3 (q8-rounded) moved every B value by about 2e-3.
    let b_name = h.coordinator.spec().shapes()[0].0.clone();
    let moved =
        theta1.theta.get(&b_name).unwrap().data[0] - theta0.theta.get(&b_name).unwrap().data[0];
    assert!((moved - 2e-3).abs() < 1e-4, "B moved by {moved}");
}

#[test]
fn revoked_and_unknown_devices_are_refused_and_short_rounds_are_abandoned() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "cohort_size = 2\nmin_reports = 2\nround_timeout_s = 1.0\nmin_task_time_s = 0.2",
        "",
    );
    let srv = Server::start(&cfg);
    let h = &srv.handle;
    let a = srv.device();
    let b = srv.device();
    let t = srv.task(&a);
    srv.upload(Upload::new(&a, t.round, delta(h, 1e-3, Encoding::Q8)))
        .unwrap();

    // A device the aggregator never enrolled, and a revoked one.
    let stranger = Arc::new(Signer::new("0".repeat(32), &auth::generate_key().unwrap()).unwrap());
    let mut req = pb::CheckInRequest::default();
    req.auth = Some(stranger.auth("CheckIn", &req));
    let err = srv
        .rt
        .block_on(FederationClient::new(srv.channel()).check_in(req))
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(h.coordinator.store().revoke(b.device_id()).unwrap());
    let mut req = pb::CheckInRequest::default();
    req.auth = Some(b.auth("CheckIn", &req));
    let err = srv
        .rt
        .block_on(FederationClient::new(srv.channel()).check_in(req))
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // One report of the two needed by the deadline: the round is abandoned, θ unchanged.
    srv.wait_for(|v| v.round == 2, "round 1 never closed");
    let row = h.coordinator.store().round(1).unwrap().unwrap();
    assert_eq!(row.state, aggregator::store::RoundState::Abandoned);
    assert_eq!(h.coordinator.view().version, 0);
    assert!(h
        .coordinator
        .metrics()
        .render()
        .contains("fedpersona_rounds_total{outcome=\"abandoned\"} 1"));
}

#[test]
fn an_operator_can_close_a_round_before_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "cohort_size = 3\nmin_reports = 1\nround_timeout_s = 600\nmin_task_time_s = 1",
        "",
    );
    let srv = Server::start(&cfg);
    let h = &srv.handle;
    let a = srv.device();
    let t = srv.task(&a);
    srv.upload(Upload::new(&a, t.round, delta(h, 1e-3, Encoding::Q8)))
        .unwrap();
    assert_eq!(
        h.coordinator.view().round,
        1,
        "one report of three: still open"
    );
    assert!(h.coordinator.close_early());
    srv.wait_for(|v| v.round == 2, "round 1 never closed");
    // Enough reports for min_reports: committed, as at the deadline.
    let row = h.coordinator.store().round(1).unwrap().unwrap();
    assert_eq!(row.state, aggregator::store::RoundState::Committed);
    assert_eq!(h.coordinator.view().version, 1);
    assert_eq!(h.coordinator.metrics().rejects_total(), 0);
}

/// A failure reading the upload stream itself (here: a message over the server's decoding
/// limit, as the header or as a data chunk) is refused and counted like every other refusal.
#[test]
fn upload_stream_failures_are_counted_as_refusals() {
    let dir = tempfile::tempdir().unwrap();
    // chunk_bytes = 1 KiB: the server decodes messages of at most 1 KiB + 64 KiB.
    let cfg = write_config(
        dir.path(),
        "cohort_size = 2\nmin_reports = 1\nround_timeout_s = 600\nmin_task_time_s = 1",
        "[update]\nclip_norm = 1.0\nencoding = \"f32\"\nchunk_bytes = 1024",
    );
    let srv = Server::start(&cfg);
    let h = &srv.handle;
    let a = srv.device();
    let task = srv.task(&a);
    let too_big = 1024 + 64 * 1024 + 1;
    let send = |parts: Vec<pb::UploadChunk>| {
        srv.rt
            .block_on(FederationClient::new(srv.channel()).upload_update(tokio_stream::iter(parts)))
            .map(|r| r.into_inner())
    };
    let header_chunk = |header: pb::UploadHeader| pb::UploadChunk {
        part: Some(pb::upload_chunk::Part::Header(header)),
    };
    let before = h.coordinator.metrics().rejects_total();

    // The first message (the header) cannot be decoded.
    let huge_header = pb::UploadHeader {
        auth: None,
        round: task.round,
        upload_nonce: vec![0; too_big],
        total_bytes: 10,
        sha256: vec![0; 32],
        num_examples: 1,
        train_loss: 0.0,
    };
    let e = send(vec![header_chunk(huge_header)]).unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert_eq!(h.coordinator.metrics().rejects_total(), before + 1);

    // A good header, then a data chunk that cannot be decoded.
    let small = delta(h, 1e-3, Encoding::F32);
    let mut header = pb::UploadHeader {
        auth: None,
        round: task.round,
        upload_nonce: a.nonce().to_vec(),
        total_bytes: small.len() as u64,
        sha256: ring::digest::digest(&ring::digest::SHA256, &small)
            .as_ref()
            .to_vec(),
        num_examples: 10,
        train_loss: 0.0,
    };
    header.auth = Some(a.auth("UploadUpdate", &header));
    let e = send(vec![
        header_chunk(header),
        pb::UploadChunk {
            part: Some(pb::upload_chunk::Part::Data(vec![0; too_big])),
        },
    ])
    .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert_eq!(h.coordinator.metrics().rejects_total(), before + 2);
    assert_eq!(h.coordinator.metrics().rejects("message_too_large"), 2);
    assert!(h
        .coordinator
        .metrics()
        .render()
        .contains("fedpersona_rejects_total{reason=\"message_too_large\"} 2"));
    // Nothing of it reached the round.
    assert_eq!(h.coordinator.view().reports, 0);
}

/// Streams that stall, before saying who they are or after an admitted header, hold no
/// upload for longer than the timeouts and never block an honest device's upload; a device
/// has one upload in flight at a time.
#[test]
fn stalled_uploads_do_not_hold_the_round() {
    use std::time::Duration;
    use tokio_stream::StreamExt;
    type Pending = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<pb::UploadReceipt, tonic::Status>> + Send>,
    >;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config_with(
        dir.path(),
        "max_concurrent_uploads = 2\nupload_idle_timeout_s = 2\nupload_timeout_s = 60",
        "cohort_size = 3\nmin_reports = 3\nround_timeout_s = 600\nmin_task_time_s = 1",
        "[update]\nclip_norm = 1.0\nencoding = \"f32\"",
    );
    let srv = Server::start(&cfg);
    let h = &srv.handle;
    let (a, b, c) = (srv.device(), srv.device(), srv.device());
    let (ta, tb, tc) = (srv.task(&a), srv.task(&b), srv.task(&c));
    let bytes = delta(h, 1e-3, Encoding::F32);
    let header = |s: &Signer, round: u64| {
        let mut header = pb::UploadHeader {
            auth: None,
            round,
            upload_nonce: s.nonce().to_vec(),
            total_bytes: bytes.len() as u64,
            sha256: ring::digest::digest(&ring::digest::SHA256, &bytes)
                .as_ref()
                .to_vec(),
            num_examples: 10,
            train_loss: 0.0,
        };
        header.auth = Some(s.auth("UploadUpdate", &header));
        pb::UploadChunk {
            part: Some(pb::upload_chunk::Part::Header(header)),
        }
    };
    let within = |what: &str, secs: u64, f: Pending| {
        srv.rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(secs), f).await })
            .unwrap_or_else(|_| panic!("{what} got no answer in {secs} s"))
    };
    let whole = |s: &Signer, round: u64| {
        let mut parts = vec![header(s, round)];
        parts.extend(bytes.chunks(4096).map(|d| pb::UploadChunk {
            part: Some(pb::upload_chunk::Part::Data(d.to_vec())),
        }));
        parts
    };
    // One whole upload on a connection of its own.
    let send = |parts: Vec<pb::UploadChunk>| -> Pending {
        let mut client = FederationClient::new(srv.channel());
        Box::pin(async move {
            client
                .upload_update(tokio_stream::iter(parts))
                .await
                .map(|r| r.into_inner())
        })
    };
    // Four times the permits of streams that never send their header.
    let silent: Vec<_> = (0..8)
        .map(|_| {
            let mut client = FederationClient::new(srv.channel());
            srv.rt.spawn(async move {
                client
                    .upload_update(tokio_stream::pending::<pb::UploadChunk>())
                    .await
                    .map(|r| r.into_inner())
            })
        })
        .collect();
    // Device b: an admitted header, then nothing.
    let stalled = {
        let mut client = FederationClient::new(srv.channel());
        let parts = tokio_stream::iter(vec![header(&b, tb.round)]).chain(tokio_stream::pending());
        srv.rt
            .spawn(async move { client.upload_update(parts).await.map(|r| r.into_inner()) })
    };
    // Device a's honest upload goes through while they are all open.
    let honest = send(whole(&a, ta.round));
    assert_eq!(within("a's honest upload", 20, honest).unwrap().reports, 1);
    // While b's stalled upload is in flight, b's second one is refused.
    let second = send(whole(&b, tb.round));
    let refused = within("b's second upload", 20, second);
    // (Unless b's stalled stream already timed out: then the second one is b's report.)
    match refused {
        Err(e) => assert_eq!(e.code(), Code::AlreadyExists, "{e:?}"),
        Ok(r) => assert_eq!(r.reports, 2),
    }
    // Every stalled stream ends by the idle timeout, refused as too slow.
    for s in silent.into_iter().chain([stalled]) {
        let out = srv
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), s).await })
            .expect("a stalled stream is cut by the timeout")
            .unwrap();
        assert_eq!(out.unwrap_err().code(), Code::DeadlineExceeded);
    }
    assert_eq!(h.coordinator.metrics().rejects("upload_timeout"), 9);
    // Its claim released, b uploads (if its second try was refused), and so does c.
    if h.coordinator.view().reports < 2 {
        let b_upload = send(whole(&b, tb.round));
        assert_eq!(within("b's upload", 20, b_upload).unwrap().reports, 2);
    }
    assert_eq!(
        srv.upload(Upload::new(&c, tc.round, bytes))
            .unwrap()
            .reports,
        3
    );
}

/// Connections that open and say nothing (no TLS handshake) are closed by the handshake
/// timeout, and beyond `max_connections` they wait in the backlog: a flood of them leaves
/// the server reachable.
#[test]
fn idle_connections_are_closed_and_capped() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config_with(
        dir.path(),
        "max_connections = 4\nhandshake_timeout_s = 1",
        "cohort_size = 2\nmin_reports = 1\nround_timeout_s = 600\nmin_task_time_s = 1",
        "",
    );
    let srv = Server::start(&cfg);
    // Twice the cap of sockets that never start TLS.
    let idle: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(srv.addr).unwrap())
        .collect();
    // Each is closed by the server (EOF or reset) once its handshake time is up; a socket
    // left open would block this read until the guard below.
    let readers: Vec<_> = idle
        .into_iter()
        .map(|mut s| {
            s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
                .unwrap();
            std::thread::spawn(move || {
                let mut byte = [0u8; 1];
                match s.read(&mut byte) {
                    Ok(0) => Ok(()),
                    Ok(_) => Err("the server sent bytes to a silent client".to_string()),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
                    Err(e) => Err(format!("not closed: {e}")),
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap().unwrap();
    }
    // The server still takes a device.
    let a = srv.device();
    srv.task(&a);
}

/// Server reflection answers in both protocol versions (grpcurl and many tools speak only
/// v1alpha) and lists exactly the services this server runs.
#[test]
fn reflection_lists_the_served_services_in_both_versions() {
    use tonic_reflection::pb::{v1, v1alpha};
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "cohort_size = 2\nmin_reports = 1\nround_timeout_s = 600\nmin_task_time_s = 1",
        "",
    );
    let srv = Server::start(&cfg);
    let want = [
        "fedpersona.v1.Federation",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    let v1_names = srv.rt.block_on(async {
        let mut c = v1::server_reflection_client::ServerReflectionClient::new(srv.channel());
        let req = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        };
        let mut answers = c
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        match answers.message().await.unwrap().unwrap().message_response {
            Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
                l.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
            }
            other => panic!("{other:?}"),
        }
    });
    let alpha_names = srv.rt.block_on(async {
        let mut c = v1alpha::server_reflection_client::ServerReflectionClient::new(srv.channel());
        let req = v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
        };
        let mut answers = c
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        match answers.message().await.unwrap().unwrap().message_response {
            Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
                l.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
            }
            other => panic!("{other:?}"),
        }
    });
    for names in [v1_names, alpha_names] {
        let mut names = names;
        names.sort();
        assert_eq!(
            names, want,
            "no local API, which this server does not serve"
        );
    }
}

/// A download of a version the server has not published yet (a newer agent, a typo) is
/// refused and counted as `unknown_version`, not as an old version.
#[test]
fn downloads_of_unknown_versions_are_counted_apart_from_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "cohort_size = 2\nmin_reports = 1\nround_timeout_s = 600\nmin_task_time_s = 1",
        "",
    );
    let srv = Server::start(&cfg);
    let a = srv.device();
    let download = |version: u64| {
        let mut req = pb::DownloadRequest {
            auth: None,
            adapter_version: version,
        };
        req.auth = Some(a.auth("DownloadAdapter", &req));
        srv.rt
            .block_on(FederationClient::new(srv.channel()).download_adapter(req))
            .map(|_| ())
    };
    let e = download(99).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let m = srv.handle.coordinator.metrics();
    assert_eq!(m.rejects("unknown_version"), 1);
    assert_eq!(m.rejects("old_version"), 0);
    // The current version downloads.
    download(srv.handle.coordinator.view().version).unwrap();
}
