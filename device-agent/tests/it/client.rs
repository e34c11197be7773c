//! The agent against a stand-in aggregator on 127.0.0.1:0 that refuses every check-in: a
//! busy refusal is retried with backoff, a spent privacy budget is not retried at all, and
//! `run` stops and says why.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::Device;
use device_agent::federation::client::Retired;
use device_agent::federation::{Agent, AgentConfig, Step};
use fedpersona_model::train::Example;
use fedpersona_model::BaseModel;
use fedpersona_proto::refusal::{self, Reason};
use fedpersona_proto::v1 as pb;
use fedpersona_proto::v1::federation_server::{Federation, FederationServer};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::fixture;

/// Enrolls anyone; refuses every check-in with `refusal`; implements nothing else.
struct Refusing {
    refusal: fn() -> Status,
    check_ins: Arc<AtomicUsize>,
}

type Chunks = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::AdapterChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Federation for Refusing {
    async fn enroll(
        &self,
        _: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        Ok(Response::new(pb::EnrollResponse {
            device_id: "0".repeat(32),
        }))
    }

    async fn check_in(
        &self,
        _: Request<pb::CheckInRequest>,
    ) -> Result<Response<pb::CheckInResponse>, Status> {
        self.check_ins.fetch_add(1, Ordering::SeqCst);
        Err((self.refusal)())
    }

    type DownloadAdapterStream = Chunks;

    async fn download_adapter(
        &self,
        _: Request<pb::DownloadRequest>,
    ) -> Result<Response<Chunks>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn upload_update(
        &self,
        _: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadReceipt>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn get_round_status(
        &self,
        _: Request<pb::RoundStatusRequest>,
    ) -> Result<Response<pb::RoundStatus>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn secure_aggregate(
        &self,
        _: Request<pb::SecAggRequest>,
    ) -> Result<Response<pb::SecAggResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// An enrolled agent talking to a [`Refusing`] aggregator (plaintext: loopback), with three
/// attempts per call and millisecond backoff; returns it with the check-in counter.
fn agent_against(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    refusal: fn() -> Status,
) -> (Agent, Arc<AtomicUsize>) {
    let check_ins = Arc::new(AtomicUsize::new(0));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let service = FederationServer::new(Refusing {
        refusal,
        check_ins: check_ins.clone(),
    });
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let text = format!(
        r#"
[aggregator]
url = "http://127.0.0.1:{port}"
enrollment_token = "test-token"
[device]
state_dir = "state"
data = "unused.jsonl"
[schedule]
checkin_interval_s = 0.01
max_attempts = 3
backoff_initial_s = 0.001
backoff_max_s = 0.002
"#
    );
    let cfg = AgentConfig::parse(&text, dir).unwrap();
    let base = Arc::new(BaseModel::load(&fixture(), &Device::Cpu).unwrap());
    let examples = vec![Example::new(None, "A line of mine.")];
    let agent = rt.block_on(Agent::start(cfg, base, examples)).unwrap();
    (agent, check_ins)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_spent_privacy_budget_stops_the_agent_without_retrying() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let (mut agent, check_ins) = agent_against(&rt, dir.path(), || {
        refusal::status(
            Code::FailedPrecondition,
            Reason::PrivacyBudgetExhausted,
            "privacy budget exhausted: epsilon 2.0 spent of 2.0",
        )
    });
    let step = rt.block_on(agent.step()).unwrap();
    assert_eq!(step, Step::Retired(Retired::PrivacyBudgetExhausted));
    assert_eq!(check_ins.load(Ordering::SeqCst), 1, "not retried");
    // `run` returns on its own (no shutdown, no max_rounds) and reports why.
    let summary = rt.block_on(agent.run(std::future::pending())).unwrap();
    assert_eq!(summary.retired, Some(Retired::PrivacyBudgetExhausted));
    assert_eq!((summary.rounds_reported, summary.tasks_failed), (0, 0));
    assert_eq!(check_ins.load(Ordering::SeqCst), 2);
}

#[test]
fn a_busy_aggregator_is_retried_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let (mut agent, check_ins) = agent_against(&rt, dir.path(), || {
        refusal::status(Code::ResourceExhausted, Reason::Busy, "busy")
    });
    let e = rt.block_on(agent.step()).unwrap_err();
    assert!(format!("{e:#}").contains("ResourceExhausted"), "{e:#}");
    assert_eq!(check_ins.load(Ordering::SeqCst), 3, "max_attempts");
    // A refusal without a reason (an older aggregator) is judged by its code, as before.
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, check_ins) =
        agent_against(&rt, dir.path(), || Status::resource_exhausted("busy"));
    assert!(rt.block_on(agent.step()).is_err());
    assert_eq!(check_ins.load(Ordering::SeqCst), 3);
}
