//! `aggregator serve`: wires the journal, the round driver, the gRPC server (TLS, health,
//! reflection) and the metrics endpoint, on listeners the caller bound.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fedpersona_proto::v1::federation_server::FederationServer;
use tokio::net::TcpListener;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::auth::Authenticator;
use crate::config::{Config, Transport};
use crate::metrics::Metrics;
use crate::round::Coordinator;
use crate::service::FederationService;
use crate::store::Store;

/// Path of the journal inside the state folder.
pub fn journal_path(config: &Config) -> std::path::PathBuf {
    config.state_dir.join("journal.sqlite")
}

/// A started aggregator: its round logic (for tests and the simulation) and the future that
/// serves until shutdown.
#[derive(Debug, Clone)]
pub struct Handle {
    pub coordinator: Arc<Coordinator>,
}

/// Recovers state and builds the round logic (no sockets).
pub fn start(config: Config) -> anyhow::Result<Handle> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
    let store = Arc::new(Store::open(&journal_path(&config)).context("opening the journal")?);
    let coordinator = Arc::new(Coordinator::start(Arc::new(config), store, Metrics::new())?);
    Ok(Handle { coordinator })
}

/// Serves the federation on `listener` (and metrics on `metrics`, if given) until `shutdown`
/// resolves, running rounds meanwhile.
pub async fn run(
    handle: Handle,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let coordinator = handle.coordinator;
    let config = coordinator.config().clone();
    let auth = Arc::new(Authenticator::new(
        coordinator.store().clone(),
        config.enrollment_token_digests.clone(),
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let driver = tokio::spawn(coordinator.clone().drive(stopped()));
    let metrics_task =
        metrics.map(|l| tokio::spawn(coordinator.metrics().clone().serve(l, stopped())));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<FederationServer<FederationService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(fedpersona_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;

    // Upload chunks are at most `chunk_bytes`, a masked input 4 bytes a value; leave room for
    // the header fields (and secure aggregation's shares: 94 bytes per neighbour).
    let masked = match config.secure_aggregation {
        Some(_) => 4 * coordinator.spec().num_values(),
        None => 0,
    };
    let max_message = (config.update.chunk_bytes as usize).max(masked) + 64 * 1024;
    let federation = FederationServer::new(FederationService::new(coordinator.clone(), auth))
        .max_decoding_message_size(max_message);

    // Connections that hold resources and say nothing are closed: a TLS handshake has its
    // timeout, an HTTP/2 connection answers keep-alive pings, and every connection is
    // recycled after an hour (its streams get the upload timeout's grace to finish).
    let limits = &config.connections;
    let mut builder = Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .max_connection_age(Duration::from_secs(3600))
        .max_connection_age_grace(config.upload_timeout);
    if let Transport::Tls { cert_pem, key_pem } = &config.transport {
        builder = builder
            .tls_config(
                ServerTlsConfig::new()
                    .identity(Identity::from_pem(cert_pem, key_pem))
                    .timeout(limits.handshake_timeout),
            )
            .context("TLS configuration")?;
    }
    let incoming = crate::connections::incoming(listener, limits.max_connections);
    let served = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(federation)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = stop_tx.send(true);
    let _ = driver.await;
    if let Some(t) = metrics_task {
        if let Ok(Err(e)) = t.await {
            tracing::warn!(error = %e, "metrics endpoint failed");
        }
    }
    served.context("gRPC server")
}
