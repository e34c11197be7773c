//! The `fedpersona.v1.Federation` gRPC service: converts wire messages, authenticates, and
//! hands over to the round logic. Generated types stay in this module.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use fedpersona_proto::v1 as pb;
use fedpersona_proto::v1::federation_server::Federation;
use tokio::sync::Semaphore;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::auth::{Authenticator, DeviceId};
use crate::config::PrivacyMode;
use crate::error::{FedError, Kind};
use crate::round::{unix_ms, CheckIn, Coordinator, RoundPhase, SecureStep, UploadHeader};
use crate::secure::Reply;

/// Chunk size of adapter downloads.
const DOWNLOAD_CHUNK: usize = 256 << 10;

/// The service state: round logic, authentication, and a bound on uploads in flight (which
/// bounds the memory of buffered uploads). An upload takes one of the permits only once its
/// header is authenticated and admitted to the round, one upload per device at a time, and
/// every stage of a stream is bounded in time, so streams that stall (or never say who
/// they are) cannot hold the uploads of a round.
#[derive(Debug, Clone)]
pub struct FederationService {
    coordinator: Arc<Coordinator>,
    auth: Arc<Authenticator>,
    uploads: Arc<Semaphore>,
    uploading: Arc<Mutex<HashSet<DeviceId>>>,
}

/// A device's claim on its one upload in flight, released on drop.
struct Uploading {
    devices: Arc<Mutex<HashSet<DeviceId>>>,
    device: DeviceId,
}

impl Drop for Uploading {
    fn drop(&mut self) {
        self.devices
            .lock()
            .expect("uploading lock")
            .remove(&self.device);
    }
}

impl FederationService {
    pub fn new(coordinator: Arc<Coordinator>, auth: Arc<Authenticator>) -> Self {
        let permits = coordinator.config().max_concurrent_uploads;
        FederationService {
            coordinator,
            auth,
            uploads: Arc::new(Semaphore::new(permits)),
            uploading: Arc::default(),
        }
    }

    /// The stream's next message, within the idle timeout and the stream's `deadline`.
    async fn next_chunk(
        &self,
        stream: &mut Streaming<pb::UploadChunk>,
        deadline: Instant,
    ) -> Result<Option<pb::UploadChunk>, Status> {
        let idle = self.coordinator.config().upload_idle_timeout;
        match tokio::time::timeout_at(deadline.min(Instant::now() + idle), stream.message()).await {
            Ok(next) => next.map_err(|s| self.stream_failed(s)),
            Err(_) => Err(self.timed_out()),
        }
    }

    fn timed_out(&self) -> Status {
        let c = self.coordinator.config();
        self.refuse(FedError::new(
            Kind::TimedOut,
            "upload_timeout",
            format!(
                "upload too slow: at most {:?} for the header and between chunks, {:?} in all",
                c.upload_idle_timeout, c.upload_timeout
            ),
        ))
    }

    /// Claims `device`'s one upload in flight.
    fn claim_upload(&self, device: &DeviceId) -> Result<Uploading, Status> {
        let mut set = self.uploading.lock().expect("uploading lock");
        if !set.insert(device.clone()) {
            return Err(self.refuse(FedError::new(
                Kind::Duplicate,
                "upload_in_flight",
                "this device already has an upload in flight",
            )));
        }
        Ok(Uploading {
            devices: self.uploading.clone(),
            device: device.clone(),
        })
    }

    /// Counts a refusal and converts it to a status.
    fn refuse(&self, e: FedError) -> Status {
        self.coordinator.metrics().reject(e.reason);
        if e.kind != Kind::Internal {
            tracing::debug!(reason = e.reason, "request refused");
        }
        e.into()
    }

    /// Counts a failed read of an upload stream (a message over the decoding limit, a
    /// malformed frame, a client gone mid-upload) as a refusal, and passes the transport's
    /// status on unchanged.
    fn stream_failed(&self, s: Status) -> Status {
        let reason = match s.code() {
            // tonic's decoder: "decoded message length too large".
            Code::OutOfRange | Code::ResourceExhausted => "message_too_large",
            Code::Cancelled => "upload_cancelled",
            _ => "bad_stream",
        };
        self.coordinator.metrics().reject(reason);
        tracing::debug!(reason, status = %s, "upload stream failed");
        s
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::AdapterChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Federation for FederationService {
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let pb::EnrollRequest {
            token,
            public_key,
            agent_version: _,
        } = request.into_inner();
        let id = self
            .auth
            .enroll(&token, &public_key)
            .map_err(|e| self.refuse(e))?;
        self.coordinator.metrics().enrolled();
        Ok(Response::new(pb::EnrollResponse { device_id: id.0 }))
    }

    async fn check_in(
        &self,
        request: Request<pb::CheckInRequest>,
    ) -> Result<Response<pb::CheckInResponse>, Status> {
        let mut req = request.into_inner();
        let auth = req.auth.take();
        let device = self
            .auth
            .verify("CheckIn", auth.as_ref(), &req)
            .map_err(|e| self.refuse(e))?;
        let pb::CheckInRequest {
            auth: _,
            last_round: _,
            sampled_round,
        } = req;
        let c = self.coordinator.config();
        let outcome = match self.coordinator.check_in(&device, sampled_round) {
            CheckIn::Task(a) => {
                self.coordinator.metrics().checkin("task");
                pb::check_in_response::Outcome::Task(pb::Task {
                    round: a.round,
                    adapter_version: a.version,
                    adapter_sha256: a.adapter_sha256.to_vec(),
                    adapter_bytes: a.adapter_bytes,
                    lora: Some(pb::LoraSpec {
                        rank: c.adapter.rank as u32,
                        alpha: c.adapter.alpha as f32,
                        targets: c
                            .adapter
                            .targets
                            .iter()
                            .map(|t| t.name().to_string())
                            .collect(),
                        freeze_a: c.adapter.freeze_a,
                        seed: c.adapter.seed,
                    }),
                    training: Some(pb::LocalTraining {
                        steps: c.training.steps,
                        learning_rate: c.training.learning_rate as f32,
                        batch_size: c.training.batch_size,
                        seq_len: c.training.seq_len,
                        weight_decay: c.training.weight_decay as f32,
                        grad_clip: c.training.grad_clip as f32,
                    }),
                    clip_norm: a.clip.map_or(c.update.clip_norm, |k| k.clip_norm as f32),
                    clip_count_scale: a.clip.map_or(0.0, |k| k.count_scale as f32),
                    privacy: Some(pb::Privacy {
                        mode: match c.privacy.mode {
                            PrivacyMode::None => pb::PrivacyMode::None,
                            PrivacyMode::Local => pb::PrivacyMode::Local,
                            PrivacyMode::Distributed => pb::PrivacyMode::Distributed,
                            PrivacyMode::Central => pb::PrivacyMode::Central,
                        } as i32,
                        noise_multiplier: c.privacy.noise_multiplier as f32,
                        min_reports: c.rounds.min_reports.get(),
                    }),
                    secure_aggregation: Some(match &c.secure_aggregation {
                        Some(s) => pb::SecureAggregation {
                            enabled: true,
                            granularity: s.granularity,
                            phase_timeout_ms: s.phase_timeout.as_millis().min(u32::MAX as u128)
                                as u32,
                        },
                        None => pb::SecureAggregation::default(),
                    }),
                    deadline_unix_ms: unix_ms(a.deadline),
                    max_upload_bytes: c.update.max_upload_bytes,
                    encoding: match c.update.encoding {
                        fedpersona_privacy::codec::Encoding::F32 => pb::Encoding::F32,
                        fedpersona_privacy::codec::Encoding::Q8 => pb::Encoding::Q8,
                    } as i32,
                    chunk_bytes: c.update.chunk_bytes,
                })
            }
            CheckIn::BudgetSpent(why) => {
                return Err(self.refuse(FedError::new(Kind::BudgetSpent, "privacy_budget", why)))
            }
            CheckIn::Later {
                retry_after,
                reason,
            } => {
                self.coordinator.metrics().checkin("later");
                pb::check_in_response::Outcome::Later(pb::ComeBackLater {
                    retry_after_ms: retry_after.as_millis().min(u32::MAX as u128) as u32,
                    reason: reason.to_string(),
                })
            }
            CheckIn::Sample {
                round,
                rate,
                retry_after,
            } => {
                self.coordinator.metrics().checkin("sample");
                pb::check_in_response::Outcome::Sampling(pb::Sampling {
                    round,
                    rate,
                    retry_after_ms: retry_after.as_millis().min(u32::MAX as u128) as u32,
                })
            }
        };
        Ok(Response::new(pb::CheckInResponse {
            outcome: Some(outcome),
        }))
    }

    type DownloadAdapterStream = ChunkStream;

    async fn download_adapter(
        &self,
        request: Request<pb::DownloadRequest>,
    ) -> Result<Response<Self::DownloadAdapterStream>, Status> {
        let mut req = request.into_inner();
        let auth = req.auth.take();
        self.auth
            .verify("DownloadAdapter", auth.as_ref(), &req)
            .map_err(|e| self.refuse(e))?;
        let pb::DownloadRequest {
            auth: _,
            adapter_version,
        } = req;
        let published = self.coordinator.published();
        if published.version != adapter_version {
            return Err(self.refuse(FedError::new(
                Kind::NotFound,
                if adapter_version < published.version {
                    "old_version"
                } else {
                    "unknown_version"
                },
                format!(
                    "adapter version {adapter_version} is not served (current: {})",
                    published.version
                ),
            )));
        }
        self.coordinator.metrics().download(published.bytes.len());
        let total = published.bytes.len() as u64;
        let chunks: Vec<Result<pb::AdapterChunk, Status>> = published
            .bytes
            .chunks(DOWNLOAD_CHUNK)
            .enumerate()
            .map(|(i, c)| {
                Ok(pb::AdapterChunk {
                    offset: (i * DOWNLOAD_CHUNK) as u64,
                    data: c.to_vec(),
                    total_bytes: if i == 0 { total } else { 0 },
                    sha256: if i == 0 {
                        published.sha256.to_vec()
                    } else {
                        Vec::new()
                    },
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn upload_update(
        &self,
        request: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadReceipt>, Status> {
        let deadline = Instant::now() + self.coordinator.config().upload_timeout;
        let mut stream = request.into_inner();
        let first = self
            .next_chunk(&mut stream, deadline)
            .await?
            .ok_or_else(|| self.refuse(FedError::invalid("bad_header", "empty upload stream")))?;
        let Some(pb::upload_chunk::Part::Header(mut header)) = first.part else {
            return Err(self.refuse(FedError::invalid(
                "bad_header",
                "the first upload chunk must be the header",
            )));
        };
        let auth = header.auth.take();
        let device = self
            .auth
            .verify("UploadUpdate", auth.as_ref(), &header)
            .map_err(|e| self.refuse(e))?;
        let pb::UploadHeader {
            auth: _,
            round,
            upload_nonce,
            total_bytes,
            sha256,
            num_examples,
            train_loss: _,
        } = header;
        let ticket = self
            .coordinator
            .begin_upload(
                device,
                UploadHeader {
                    round,
                    nonce: upload_nonce,
                    total_bytes,
                    sha256,
                    num_examples,
                },
            )
            .map_err(|e| self.refuse(e))?;
        // Only now, authenticated and admitted, does the upload take a permit.
        let _uploading = self.claim_upload(ticket.device())?;
        let _permit = match tokio::time::timeout_at(deadline, self.uploads.acquire()).await {
            Ok(permit) => permit.map_err(|_| {
                self.refuse(FedError::new(
                    Kind::Unavailable,
                    "shutting_down",
                    "shutting down",
                ))
            })?,
            Err(_) => return Err(self.timed_out()),
        };
        let total = ticket.total_bytes() as usize;
        let mut buf = Vec::with_capacity(total);
        while let Some(chunk) = self.next_chunk(&mut stream, deadline).await? {
            match chunk.part {
                Some(pb::upload_chunk::Part::Data(d)) => {
                    if buf.len() + d.len() > total {
                        return Err(self.refuse(FedError::invalid(
                            "oversized",
                            format!("upload data exceeds the declared {total} bytes"),
                        )));
                    }
                    buf.extend_from_slice(&d);
                }
                Some(pb::upload_chunk::Part::Header(_)) | None => {
                    return Err(self.refuse(FedError::invalid(
                        "bad_chunk",
                        "upload chunks after the first must carry data",
                    )))
                }
            }
        }
        let reports = self
            .coordinator
            .finish_upload(ticket, &buf)
            .map_err(|e| self.refuse(e))?;
        Ok(Response::new(pb::UploadReceipt { round, reports }))
    }

    async fn get_round_status(
        &self,
        request: Request<pb::RoundStatusRequest>,
    ) -> Result<Response<pb::RoundStatus>, Status> {
        let mut req = request.into_inner();
        let auth = req.auth.take();
        self.auth
            .verify("GetRoundStatus", auth.as_ref(), &req)
            .map_err(|e| self.refuse(e))?;
        let pb::RoundStatusRequest { auth: _ } = req;
        let v = self.coordinator.view();
        Ok(Response::new(pb::RoundStatus {
            round: v.round,
            state: v.phase.as_str().to_string(),
            phase: match v.phase {
                RoundPhase::Open => pb::RoundPhase::Open,
                RoundPhase::Closing => pb::RoundPhase::Closing,
                RoundPhase::Idle => pb::RoundPhase::Idle,
                RoundPhase::Finished => pb::RoundPhase::Finished,
                RoundPhase::BudgetExhausted => pb::RoundPhase::BudgetExhausted,
            } as i32,
            adapter_version: v.version,
            reports: v.reports,
            target_reports: v.target_reports,
            deadline_unix_ms: v.deadline.map_or(0, unix_ms),
            rounds_completed: v.rounds_committed,
        }))
    }

    async fn secure_aggregate(
        &self,
        request: Request<pb::SecAggRequest>,
    ) -> Result<Response<pb::SecAggResponse>, Status> {
        let mut req = request.into_inner();
        let auth = req.auth.take();
        let device = self
            .auth
            .verify("SecureAggregate", auth.as_ref(), &req)
            .map_err(|e| self.refuse(e))?;
        let pb::SecAggRequest {
            auth: _,
            round,
            step,
        } = req;
        let step =
            secure_step(step, self.coordinator.spec().num_values()).map_err(|e| self.refuse(e))?;
        let reveals = matches!(step, SecureStep::Reveals(_));
        let (phase, mut changed) = self
            .coordinator
            .secure_submit(&device, round, step)
            .map_err(|e| self.refuse(e))?;
        if reveals {
            return Ok(Response::new(pb::SecAggResponse {
                step: Some(pb::sec_agg_response::Step::Done(true)),
            }));
        }
        // Wait for the phase to close: every phase ends by its deadline or aborts.
        let c = self.coordinator.config();
        let policy = c.secure_aggregation.expect("secure_submit checked");
        let limit = tokio::time::Instant::now() + c.rounds.round_timeout + 2 * policy.phase_timeout;
        let reply = loop {
            match self.coordinator.secure_reply(&device, round, phase) {
                Ok(Some(reply)) => break reply,
                Ok(None) => {}
                Err(e) => return Err(self.refuse(e)),
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() {
                    return Err(self.refuse(FedError::new(
                        Kind::WrongRound,
                        "round_closed",
                        format!("round {round} ended during secure aggregation"),
                    )));
                },
                _ = tokio::time::sleep_until(limit) => {
                    return Err(self.refuse(FedError::new(
                        Kind::Unavailable,
                        "secagg_timeout",
                        format!("phase {phase} of round {round} did not close in time"),
                    )));
                }
            }
        };
        Ok(Response::new(pb::SecAggResponse {
            step: Some(secure_reply(reply)),
        }))
    }
}

fn key32(bytes: &[u8], what: &str) -> Result<[u8; 32], FedError> {
    bytes
        .try_into()
        .map_err(|_| FedError::invalid("secagg", format!("{what} must be 32 bytes")))
}

/// A `SecAggRequest` step as the round logic takes it (sizes checked here).
fn secure_step(
    step: Option<pb::sec_agg_request::Step>,
    vector_len: usize,
) -> Result<SecureStep, FedError> {
    use pb::sec_agg_request::Step;
    Ok(match step {
        None => return Err(FedError::invalid("secagg", "request names no step")),
        Some(Step::Advertise(a)) => SecureStep::Advertise {
            c_pk: key32(&a.c_pk, "c_pk")?,
            s_pk: key32(&a.s_pk, "s_pk")?,
            signature: a.signature,
        },
        Some(Step::Shares(s)) => SecureStep::Shares(s.into_shares()),
        Some(Step::Masked(m)) => SecureStep::Masked(
            fedpersona_proto::convert::masked_words(&m.values, vector_len).ok_or_else(|| {
                FedError::invalid(
                    "shape",
                    format!(
                        "masked input has {} bytes, expected {} ({} words)",
                        m.values.len(),
                        vector_len * 4,
                        vector_len
                    ),
                )
            })?,
        ),
        Some(Step::Reveals(r)) => SecureStep::Reveals(r.into_reveals()),
    })
}

fn secure_reply(reply: Reply) -> pb::sec_agg_response::Step {
    use pb::sec_agg_response::Step;
    match reply {
        Reply::Assignment { assignment, peers } => Step::Assignment(pb::SecAggAssignment {
            index: assignment.index,
            clients: assignment.params.clients,
            neighbours: assignment.params.neighbours,
            threshold: assignment.params.threshold,
            peers: peers
                .into_iter()
                .map(|(index, p)| pb::SecAggPeer {
                    index,
                    c_pk: p.c_pk.to_vec(),
                    s_pk: p.s_pk.to_vec(),
                    signature: p.signature,
                    device_public_key: p.device_key,
                })
                .collect(),
            vector_len: assignment.vector_len,
            own_c_pk: assignment.own.c_pk.to_vec(),
            own_s_pk: assignment.own.s_pk.to_vec(),
        }),
        Reply::Shares(shares) => Step::SharesForYou(pb::SecAggShares::from(&shares[..])),
        Reply::Survivors(s) => Step::Survivors(pb::SecAggSurvivors::from(&s)),
        Reply::Done => Step::Done(true),
    }
}
