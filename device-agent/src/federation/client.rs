//! The agent's gRPC edge: a TLS channel to the aggregator, signed requests, chunked transfers,
//! and bounded retries with backoff on `Unavailable` / `ResourceExhausted`, except for the
//! refusals the aggregator marks permanent ([`Retired`]). Generated types stay in this module.

use std::time::Duration;

use anyhow::{bail, Context};
use fedpersona_privacy::protect::Privatized;
use fedpersona_proto::auth::Signer;
use fedpersona_proto::refusal;
use fedpersona_proto::v1 as pb;
use fedpersona_proto::v1::federation_client::FederationClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

/// Where and how to reach the aggregator.
#[derive(Debug, Clone)]
pub struct Connection {
    pub url: String,
    /// PEM of the CA that signed the aggregator's certificate (None: plaintext, loopback only).
    pub ca_pem: Option<Vec<u8>>,
    /// TLS server name, if not the URL's host.
    pub domain: Option<String>,
}

/// Retry policy for transient failures.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub max_attempts: u32,
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            max_attempts: 5,
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

/// Connects (lazily: the first call dials). Needs a tokio runtime.
pub fn channel(c: &Connection) -> anyhow::Result<Channel> {
    Ok(endpoint(c)?.connect_lazy())
}

/// Checks the URL and the TLS rules without connecting.
pub fn channel_check(c: &Connection) -> anyhow::Result<()> {
    endpoint(c).map(drop)
}

fn endpoint(c: &Connection) -> anyhow::Result<Endpoint> {
    let mut ep = Endpoint::from_shared(c.url.clone())
        .with_context(|| format!("aggregator url {:?}", c.url))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    match &c.ca_pem {
        Some(ca) => {
            if !c.url.starts_with("https://") {
                bail!("with a CA certificate the aggregator url must be https://");
            }
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
            if let Some(d) = &c.domain {
                tls = tls.domain_name(d.clone());
            }
            ep = ep.tls_config(tls).context("TLS configuration")?;
        }
        None => {
            let uri: tonic::codegen::http::Uri = c.url.parse().context("aggregator url")?;
            let host = uri.host().unwrap_or_default();
            let loopback = host == "localhost"
                || host
                    .trim_matches(|ch| ch == '[' || ch == ']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                bail!("plaintext is only allowed to a loopback aggregator; give a CA certificate");
            }
        }
    }
    Ok(ep)
}

/// What a check-in answered.
#[derive(Debug)]
pub enum CheckIn {
    Task(pb::Task),
    Later {
        retry_after: Duration,
        reason: String,
    },
    /// The round samples its devices: draw with probability `rate` (see
    /// `fedpersona_privacy::sampling`).
    Sample {
        round: u64,
        rate: f64,
        retry_after: Duration,
    },
    /// The aggregator will never give this device work again.
    Retired {
        why: Retired,
        message: String,
    },
}

/// Why the aggregator will never give this device work again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Retired {
    /// The deployment's privacy budget is spent: no round will open again.
    PrivacyBudgetExhausted,
}

/// The permanent refusal a status carries, if it is one: retrying cannot help.
pub fn retired(s: &tonic::Status) -> Option<Retired> {
    match refusal::reason(s) {
        refusal::Reason::PrivacyBudgetExhausted => Some(Retired::PrivacyBudgetExhausted),
        refusal::Reason::Busy | refusal::Reason::Unspecified => None,
    }
}

fn transient(s: &tonic::Status) -> bool {
    retired(s).is_none() && matches!(s.code(), Code::Unavailable | Code::ResourceExhausted)
}

/// Runs `call` until it succeeds, fails permanently, or attempts run out; backoff doubles
/// from `retry.initial` up to `retry.max`, with jitter.
pub async fn with_retry<T, F, Fut>(retry: Retry, mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut wait = retry.initial;
    let mut attempt = 1;
    loop {
        match call().await {
            Err(s) if transient(&s) && attempt < retry.max_attempts => {
                let jitter = wait.mul_f64(rand::random::<f64>() * 0.5);
                tracing::debug!(code = ?s.code(), attempt, "transient failure, retrying");
                tokio::time::sleep(wait + jitter).await;
                wait = (wait * 2).min(retry.max);
                attempt += 1;
            }
            r => return r,
        }
    }
}

/// Enrolls a public key with a token; returns the device id.
pub async fn enroll(
    channel: Channel,
    token: &str,
    public_key: Vec<u8>,
    retry: Retry,
) -> Result<String, tonic::Status> {
    let client = FederationClient::new(channel);
    with_retry(retry, || {
        let req = pb::EnrollRequest {
            token: token.to_string(),
            public_key: public_key.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let mut client = client.clone();
        async move { client.enroll(req).await }
    })
    .await
    .map(|r| r.into_inner().device_id)
}

/// A signed session with the aggregator.
#[derive(Debug, Clone)]
pub struct Session {
    client: FederationClient<Channel>,
    signer: std::sync::Arc<Signer>,
    pub retry: Retry,
}

impl Session {
    pub fn new(channel: Channel, signer: std::sync::Arc<Signer>, retry: Retry) -> Self {
        Session {
            client: FederationClient::new(channel).max_decoding_message_size(8 << 20),
            signer,
            retry,
        }
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// Checks in; `sampled_round` is the round this device drew itself into (0: none).
    pub async fn check_in(
        &self,
        last_round: u64,
        sampled_round: u64,
    ) -> Result<CheckIn, tonic::Status> {
        let r = with_retry(self.retry, || {
            let mut req = pb::CheckInRequest {
                auth: None,
                last_round,
                sampled_round,
            };
            req.auth = Some(self.signer.auth("CheckIn", &req));
            let mut client = self.client.clone();
            async move { client.check_in(req).await }
        })
        .await;
        let r = match r {
            Ok(r) => r.into_inner(),
            Err(s) => match retired(&s) {
                Some(why) => {
                    return Ok(CheckIn::Retired {
                        why,
                        message: s.message().to_string(),
                    })
                }
                None => return Err(s),
            },
        };
        match r.outcome {
            Some(pb::check_in_response::Outcome::Task(t)) => Ok(CheckIn::Task(t)),
            Some(pb::check_in_response::Outcome::Later(l)) => Ok(CheckIn::Later {
                retry_after: Duration::from_millis(u64::from(l.retry_after_ms)),
                reason: l.reason,
            }),
            Some(pb::check_in_response::Outcome::Sampling(s)) => Ok(CheckIn::Sample {
                round: s.round,
                rate: s.rate,
                retry_after: Duration::from_millis(u64::from(s.retry_after_ms)),
            }),
            None => Err(tonic::Status::internal(
                "check-in answer without an outcome",
            )),
        }
    }

    /// Downloads a global adapter version and checks its length and SHA-256.
    pub async fn download(
        &self,
        version: u64,
        sha256: &[u8],
        max_bytes: u64,
    ) -> anyhow::Result<Vec<u8>> {
        let bytes = with_retry(self.retry, || {
            let mut req = pb::DownloadRequest {
                auth: None,
                adapter_version: version,
            };
            req.auth = Some(self.signer.auth("DownloadAdapter", &req));
            let mut client = self.client.clone();
            async move {
                let mut stream = client.download_adapter(req).await?.into_inner();
                let mut buf = Vec::new();
                while let Some(chunk) = stream.message().await? {
                    if chunk.offset != buf.len() as u64 {
                        return Err(tonic::Status::data_loss("adapter chunk out of order"));
                    }
                    if buf.len() as u64 + chunk.data.len() as u64 > max_bytes {
                        return Err(tonic::Status::data_loss("adapter larger than announced"));
                    }
                    buf.extend_from_slice(&chunk.data);
                }
                Ok(buf)
            }
        })
        .await
        .context("downloading the global adapter")?;
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        if digest.as_ref() != sha256 {
            bail!("downloaded adapter does not match its SHA-256");
        }
        Ok(bytes)
    }

    /// Uploads a privatized update in chunks. A retry resends the same nonce, so an upload
    /// whose answer was lost is refused as a duplicate rather than counted twice; that
    /// answer counts as success.
    pub async fn upload(
        &self,
        task: &pb::Task,
        update: &Privatized,
        num_examples: u32,
        train_loss: f32,
    ) -> Result<u32, tonic::Status> {
        let bytes = update.bytes();
        let nonce = self.signer.nonce().to_vec();
        let sha = ring::digest::digest(&ring::digest::SHA256, bytes)
            .as_ref()
            .to_vec();
        let chunk = (task.chunk_bytes as usize).clamp(1024, 4 << 20);
        let r = with_retry(self.retry, || {
            let mut header = pb::UploadHeader {
                auth: None,
                round: task.round,
                upload_nonce: nonce.clone(),
                total_bytes: bytes.len() as u64,
                sha256: sha.clone(),
                num_examples,
                train_loss,
            };
            header.auth = Some(self.signer.auth("UploadUpdate", &header));
            let mut parts = vec![pb::UploadChunk {
                part: Some(pb::upload_chunk::Part::Header(header)),
            }];
            parts.extend(bytes.chunks(chunk).map(|c| pb::UploadChunk {
                part: Some(pb::upload_chunk::Part::Data(c.to_vec())),
            }));
            let mut client = self.client.clone();
            async move { client.upload_update(tokio_stream::iter(parts)).await }
        })
        .await;
        match r {
            Ok(r) => Ok(r.into_inner().reports),
            Err(s) if s.code() == Code::AlreadyExists => Ok(0),
            Err(s) => Err(s),
        }
    }

    /// One step of secure aggregation; the answer comes when the aggregator closes the phase,
    /// so the call may wait up to `wait`. Never retried: a resent step would be refused as a
    /// second submission.
    pub async fn secure_aggregate(
        &self,
        round: u64,
        step: pb::sec_agg_request::Step,
        wait: Duration,
    ) -> Result<pb::sec_agg_response::Step, tonic::Status> {
        let mut req = pb::SecAggRequest {
            auth: None,
            round,
            step: Some(step),
        };
        req.auth = Some(self.signer.auth("SecureAggregate", &req));
        let mut request = tonic::Request::new(req);
        request.set_timeout(wait);
        let mut client = self.client.clone();
        client
            .secure_aggregate(request)
            .await?
            .into_inner()
            .step
            .ok_or_else(|| tonic::Status::internal("secure aggregation answer without a step"))
    }
}
