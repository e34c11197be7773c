//! `device-agent local …`: `serve` runs the local API; the other commands are its
//! command-line client.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::Device;
use fedpersona_model::BaseModel;
use fedpersona_proto::local as pb;
use fedpersona_proto::local::local_agent_client::LocalAgentClient;
use tonic::Status;

use crate::fs::StateDir;
use crate::local::{serve, LocalState, Schedule};

#[derive(Debug, clap::Subcommand)]
pub enum LocalCommand {
    /// Serve the local API on a Unix socket (mode 0600) until Ctrl-C or SIGTERM.
    Serve {
        /// The agent's folder (store, key, personal adapter, consent).
        #[arg(long)]
        state_dir: PathBuf,
        /// Base model folder (default: the shipped model).
        #[arg(long)]
        base: Option<PathBuf>,
        /// Socket path (default: STATE_DIR/local.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        #[command(flatten)]
        schedule: Schedule,
    },
    /// Record an interaction; prints its id.
    Log {
        #[arg(long)]
        socket: PathBuf,
        /// What the user wrote or chose.
        #[arg(long)]
        text: String,
        /// What the user was responding to.
        #[arg(long)]
        context: Option<String>,
        /// The model's suggestion, if one was shown.
        #[arg(long)]
        suggestion: Option<String>,
        /// none, accepted, edited, rejected, or a rating 1 to 5.
        #[arg(long, default_value = "none")]
        feedback: String,
        #[arg(long, default_value = "cli")]
        app: String,
        #[arg(long, default_value = "note")]
        kind: String,
    },
    /// Set the feedback of a recorded interaction.
    Feedback {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        id: i64,
        /// none, accepted, edited, rejected, or a rating 1 to 5.
        #[arg(long)]
        feedback: String,
    },
    /// Continue a prompt with the personal adapter (streams the continuation).
    Generate {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 200)]
        max_tokens: u32,
        /// 0 is greedy decoding.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0.9)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Print the user's profile (JSON).
    Profile {
        #[arg(long)]
        socket: PathBuf,
    },
    /// Print everything stored about the user, decrypted (JSON).
    Export {
        #[arg(long)]
        socket: PathBuf,
    },
    /// Erase the interactions and personal adapters (and with --leave-federation, the
    /// device's federation credentials, with consent off).
    Forget {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        leave_federation: bool,
    },
    /// Federated participation: on or off.
    Consent {
        #[arg(long)]
        socket: PathBuf,
        #[arg(value_parser = ["on", "off"])]
        choice: String,
    },
}

/// Runs a `device-agent local` command; returns what to print.
pub async fn run(cmd: LocalCommand) -> anyhow::Result<String> {
    match cmd {
        LocalCommand::Serve {
            state_dir,
            base,
            socket,
            schedule,
        } => {
            let base_dir = base.unwrap_or_else(fedpersona_model::checkpoint::default_model_dir);
            let base = BaseModel::load(&base_dir, &Device::Cpu)
                .with_context(|| format!("loading base model {}", base_dir.display()))?;
            let state_dir = StateDir::new(state_dir);
            let socket = socket.unwrap_or_else(|| state_dir.socket());
            let local = LocalState::open(state_dir, Arc::new(base))?;
            tracing::info!(socket = %socket.display(), "local API serving");
            serve(local, schedule, &socket, crate::shutdown::shutdown_signal()).await?;
            Ok(String::new())
        }
        LocalCommand::Log {
            socket,
            text,
            context,
            suggestion,
            feedback,
            app,
            kind,
        } => {
            let r = connect(&socket)
                .await?
                .log_interaction(pb::LogInteractionRequest {
                    time_ms: 0,
                    context,
                    suggestion,
                    text,
                    feedback: Some(feedback_arg(&feedback)?),
                    app,
                    kind,
                })
                .await
                .map_err(refused)?;
            Ok(r.into_inner().id.to_string())
        }
        LocalCommand::Feedback {
            socket,
            id,
            feedback,
        } => {
            connect(&socket)
                .await?
                .feedback(pb::FeedbackRequest {
                    id,
                    feedback: Some(feedback_arg(&feedback)?),
                })
                .await
                .map_err(refused)?;
            Ok("feedback recorded".into())
        }
        LocalCommand::Generate {
            socket,
            prompt,
            max_tokens,
            temperature,
            top_p,
            seed,
        } => {
            use std::io::Write;
            let mut stream = connect(&socket)
                .await?
                .generate(pb::GenerateRequest {
                    prompt,
                    max_tokens,
                    temperature,
                    top_p,
                    seed,
                })
                .await
                .map_err(refused)?
                .into_inner();
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = stream.message().await.map_err(refused)? {
                out.write_all(chunk.text.as_bytes())?;
                out.flush()?;
            }
            Ok(String::new())
        }
        LocalCommand::Profile { socket } => Ok(connect(&socket)
            .await?
            .get_profile(pb::GetProfileRequest {})
            .await
            .map_err(refused)?
            .into_inner()
            .json),
        LocalCommand::Export { socket } => Ok(connect(&socket)
            .await?
            .export(pb::ExportRequest {})
            .await
            .map_err(refused)?
            .into_inner()
            .json),
        LocalCommand::Forget {
            socket,
            leave_federation,
        } => {
            let r = connect(&socket)
                .await?
                .forget(pb::ForgetRequest { leave_federation })
                .await
                .map_err(refused)?
                .into_inner();
            Ok(format!(
                "erased {} interactions{}{}",
                r.interactions_erased,
                if r.adapter_erased {
                    " and the personal adapter"
                } else {
                    ""
                },
                if r.left_federation {
                    "; left the federation"
                } else {
                    ""
                }
            ))
        }
        LocalCommand::Consent { socket, choice } => {
            let r = connect(&socket)
                .await?
                .set_consent(pb::SetConsentRequest {
                    federated: choice == "on",
                })
                .await
                .map_err(refused)?
                .into_inner();
            Ok(format!(
                "federated participation {}",
                if r.federated { "on" } else { "off" }
            ))
        }
    }
}

fn refused(s: Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}

fn feedback_arg(s: &str) -> anyhow::Result<pb::FeedbackValue> {
    use pb::FeedbackKind as K;
    let (kind, rating) = match s {
        "none" => (K::None, 0),
        "accepted" => (K::Accepted, 0),
        "edited" => (K::Edited, 0),
        "rejected" => (K::Rejected, 0),
        r => match r.parse::<u32>() {
            Ok(v @ 1..=5) => (K::Rating, v),
            _ => bail!(
                "feedback must be none, accepted, edited, rejected or a rating 1 to 5, not {s:?}"
            ),
        },
    };
    Ok(pb::FeedbackValue {
        kind: kind as i32,
        rating,
    })
}

/// A client of the local API on `socket`.
pub async fn connect(socket: &Path) -> anyhow::Result<LocalAgentClient<tonic::transport::Channel>> {
    let path = socket.to_path_buf();
    // The URI is unused: every connection goes to the socket.
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| format!("connecting to the local API at {}", socket.display()))?;
    Ok(LocalAgentClient::new(channel))
}
