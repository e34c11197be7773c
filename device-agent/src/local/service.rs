//! The gRPC service `fedpersona.local.v1.LocalAgent` on a Unix socket of mode 0600: checks
//! every request (sizes, ranges, feedback kinds) before it reaches the state, and maps every
//! failure through [`LocalError`].

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use anyhow::{bail, Context};
use fedpersona_model::generate::{generate, Sampling};
use fedpersona_proto::local as pb;
use fedpersona_proto::local::local_agent_server::{LocalAgent, LocalAgentServer};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::local::{now_ms, LocalError, LocalState, Schedule};
use crate::user::consent::Consent;
use crate::user::profile::Profile;
use crate::user::store::{Feedback, Interaction};

/// Longest text a single field of an interaction may have.
const MAX_TEXT_BYTES: usize = 64 << 10;
/// Most tokens one `Generate` call may ask for.
const MAX_GENERATE_TOKENS: u32 = 4096;

/// Serves the local API on `socket` (mode 0600) until `shutdown` resolves: [`bind`], then
/// [`Bound::serve`].
pub async fn serve(
    state: LocalState,
    schedule: Schedule,
    socket: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    bind(state, schedule, socket)?.serve(shutdown).await
}

/// The local API bound to its socket and not serving yet: apps that connect now wait until
/// [`Bound::serve`] runs.
#[derive(Debug)]
pub struct Bound {
    listener: tokio::net::UnixListener,
    state: Arc<LocalState>,
    schedule: Schedule,
    socket: PathBuf,
}

/// Binds the local API to `socket` (mode 0600) after checking the schedule. A stale socket
/// file is replaced; any other file there is an error. Call it inside a Tokio runtime.
pub fn bind(state: LocalState, schedule: Schedule, socket: &Path) -> anyhow::Result<Bound> {
    schedule.validate()?;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(socket) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(socket)
            .with_context(|| format!("removing the stale socket {}", socket.display()))?,
        Ok(_) => bail!(
            "{} exists and is not a socket: refusing to replace it",
            socket.display()
        ),
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", socket.display()))?;
    Ok(Bound {
        listener,
        state: Arc::new(state),
        schedule,
        socket: socket.to_path_buf(),
    })
}

impl Bound {
    /// Serves until `shutdown` resolves, with the adaptation schedule running beside;
    /// removes the socket at the end.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let Bound {
            listener,
            state,
            schedule,
            socket,
        } = self;
        let scheduler = {
            let state = state.clone();
            tokio::spawn(async move {
                let every = std::time::Duration::from_secs_f64(schedule.check_s.max(0.01));
                loop {
                    tokio::time::sleep(every).await;
                    match state.adapt_if_due(&schedule).await {
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "adaptation failed"),
                    }
                }
            })
        };
        let result = tonic::transport::Server::builder()
            .add_service(LocalAgentServer::new(LocalService { state }))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                shutdown,
            )
            .await;
        scheduler.abort();
        let _ = std::fs::remove_file(&socket);
        result.context("local API server")
    }
}

fn feedback(v: Option<pb::FeedbackValue>) -> Result<Feedback, LocalError> {
    use pb::FeedbackKind as K;
    let v = v.unwrap_or_default();
    Ok(match K::try_from(v.kind) {
        Ok(K::None) | Ok(K::Unspecified) => Feedback::None,
        Ok(K::Accepted) => Feedback::Accepted,
        Ok(K::Edited) => Feedback::Edited,
        Ok(K::Rejected) => Feedback::Rejected,
        Ok(K::Rating) => match u8::try_from(v.rating) {
            Ok(r @ 1..=5) => Feedback::Rating(r),
            _ => {
                return Err(LocalError::invalid(format!(
                    "rating {} is not in 1..=5",
                    v.rating
                )))
            }
        },
        Err(_) => return Err(LocalError::invalid("unknown feedback kind")),
    })
}

fn check_text(what: &str, s: &str) -> Result<(), LocalError> {
    if s.len() > MAX_TEXT_BYTES {
        return Err(LocalError::invalid(format!(
            "{what} has {} bytes, more than {MAX_TEXT_BYTES}",
            s.len()
        )));
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct LocalService {
    state: Arc<LocalState>,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateChunk, Status>> + Send>>;

#[tonic::async_trait]
impl LocalAgent for LocalService {
    async fn log_interaction(
        &self,
        request: Request<pb::LogInteractionRequest>,
    ) -> Result<Response<pb::LogInteractionResponse>, Status> {
        self.state.touch();
        let r = request.into_inner();
        if r.text.is_empty() {
            return Err(LocalError::invalid("text is empty").into());
        }
        for (what, s) in [
            ("text", Some(&r.text)),
            ("context", r.context.as_ref()),
            ("suggestion", r.suggestion.as_ref()),
            ("app", Some(&r.app)),
            ("kind", Some(&r.kind)),
        ] {
            check_text(what, s.map_or("", |s| s.as_str()))?;
        }
        let interaction = Interaction {
            time_ms: if r.time_ms > 0 { r.time_ms } else { now_ms() },
            context: r.context,
            suggestion: r.suggestion,
            text: r.text,
            feedback: feedback(r.feedback)?,
            app: r.app,
            kind: r.kind,
        };
        let id = self
            .state
            .store()
            .log(&interaction)
            .map_err(LocalError::from)?;
        Ok(Response::new(pb::LogInteractionResponse { id }))
    }

    async fn feedback(
        &self,
        request: Request<pb::FeedbackRequest>,
    ) -> Result<Response<pb::FeedbackResponse>, Status> {
        self.state.touch();
        let r = request.into_inner();
        let fb = feedback(r.feedback)?;
        self.state
            .store()
            .set_feedback(r.id, fb)
            .map_err(LocalError::from)?;
        Ok(Response::new(pb::FeedbackResponse {}))
    }

    type GenerateStream = ChunkStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        self.state.touch();
        let r = request.into_inner();
        check_text("prompt", &r.prompt)?;
        if r.prompt.is_empty() {
            return Err(LocalError::invalid("prompt is empty").into());
        }
        if r.max_tokens == 0 || r.max_tokens > MAX_GENERATE_TOKENS {
            return Err(LocalError::invalid(format!(
                "max_tokens must be in 1..={MAX_GENERATE_TOKENS}"
            ))
            .into());
        }
        let temperature_ok = r.temperature.is_finite() && r.temperature >= 0.0;
        let top_p_ok = r.top_p.is_finite() && (0.0..=1.0).contains(&r.top_p);
        if !(temperature_ok && top_p_ok) {
            return Err(LocalError::invalid("temperature must be ≥ 0 and top_p in [0, 1]").into());
        }
        let adapter = self
            .state
            .personal_adapter()
            .map_err(|e| LocalError::internal("loading the personal adapter", e))?;
        let state = self.state.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::task::spawn_blocking(move || {
            let base = &state.base;
            let mut prompt: Vec<u32> = base.bos().into_iter().collect();
            match base.tokenizer.encode(&r.prompt) {
                Ok(ids) => prompt.extend(ids),
                Err(e) => {
                    let e = LocalError::invalid(format!("prompt does not tokenize: {e}"));
                    let _ = tx.blocking_send(Err(e.into()));
                    return;
                }
            }
            let cfg = base.model.config();
            let eos = if cfg.eos_token_ids.is_empty() {
                base.tokenizer.eos_ids()
            } else {
                cfg.eos_token_ids.clone()
            };
            let sampling = Sampling {
                temperature: f64::from(r.temperature),
                top_p: if r.top_p == 0.0 {
                    1.0
                } else {
                    f64::from(r.top_p)
                },
                seed: r.seed,
            };
            let mut text = crate::generate::TextStream::new(&base.tokenizer);
            let result = generate(
                &base.model,
                adapter.as_ref(),
                &prompt,
                r.max_tokens as usize,
                sampling,
                |id| {
                    if eos.contains(&id) {
                        return false;
                    }
                    let piece = text.push(id);
                    // A closed channel means the app went away: stop generating.
                    piece.is_empty()
                        || tx
                            .blocking_send(Ok(pb::GenerateChunk {
                                text: piece.to_string(),
                            }))
                            .is_ok()
                },
            );
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(LocalError::internal("generation", e).into()));
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_profile(
        &self,
        _: Request<pb::GetProfileRequest>,
    ) -> Result<Response<pb::GetProfileResponse>, Status> {
        self.state.touch();
        let profile = self.state.profile()?;
        Ok(Response::new(pb::GetProfileResponse {
            json: serde_json::to_string_pretty(&profile).expect("plain struct"),
        }))
    }

    async fn export(
        &self,
        _: Request<pb::ExportRequest>,
    ) -> Result<Response<pb::ExportResponse>, Status> {
        self.state.touch();
        let dir = &self.state.dir;
        let items = self.state.store().all().map_err(LocalError::from)?;
        let profile = Profile::compute(&items, now_ms(), None)
            .map_err(|e| LocalError::internal("computing the profile", e))?;
        let consent = Consent::load(dir).map_err(|e| LocalError::internal("reading consent", e))?;
        let personal = dir.personal();
        let has_adapter = personal.join("adapter_config.json").exists();
        let enrolled = dir.agent_state().exists();
        let json = serde_json::json!({
            "exported_ms": now_ms(),
            "interactions": items,
            "profile": profile,
            "consent": consent,
            "personal_adapter": has_adapter.then(|| personal.display().to_string()),
            "enrolled_in_federation": enrolled,
        });
        Ok(Response::new(pb::ExportResponse {
            json: serde_json::to_string_pretty(&json).expect("plain values"),
        }))
    }

    async fn forget(
        &self,
        request: Request<pb::ForgetRequest>,
    ) -> Result<Response<pb::ForgetResponse>, Status> {
        self.state.touch();
        let r = request.into_inner();
        let f = self.state.forget(r.leave_federation).await?;
        Ok(Response::new(pb::ForgetResponse {
            interactions_erased: f.interactions,
            adapter_erased: f.adapter,
            left_federation: f.left_federation,
        }))
    }

    async fn set_consent(
        &self,
        request: Request<pb::SetConsentRequest>,
    ) -> Result<Response<pb::SetConsentResponse>, Status> {
        self.state.touch();
        let r = request.into_inner();
        let c = Consent::set(&self.state.dir, r.federated, now_ms())
            .map_err(|e| LocalError::internal("recording consent", e))?;
        Ok(Response::new(pb::SetConsentResponse {
            federated: c.federated,
            changed_ms: c.changed_ms,
        }))
    }
}
