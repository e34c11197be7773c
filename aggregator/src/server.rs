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
use crate::versions::Versions;

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

/// Recovers state and builds the round logic (no sockets). The journal holds the privacy
/// ledger, so a journal that is missing, empty, damaged, stripped of ledger rows or behind
/// the adapter versions on disk is refused with what to do, and nothing is written.
pub fn start(config: Config) -> anyhow::Result<Handle> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
    let journal = journal_path(&config);
    let versions = Versions::new(
        &config.state_dir,
        config.model.clone(),
        config.adapter.clone(),
    );
    let on_disk = versions
        .newest_on_disk()
        .context("listing the adapter versions")?;
    let empty = std::fs::metadata(&journal).map_or(true, |m| m.len() == 0);
    if let (true, Some(newest)) = (empty, on_disk) {
        anyhow::bail!(
            "the journal {} is missing or empty, but adapter versions up to {newest} are in {}: \
             starting afresh would reset the privacy ledger (ε back to 0) under a federation \
             that already released updates. Restore the journal (with its -wal file) from a \
             backup, or, to start a new federation on purpose, move the state folder away",
            journal.display(),
            config.state_dir.join("adapters").display()
        );
    }
    let store = Arc::new(Store::open(&journal).context("opening the journal")?);
    let refuse = |what: String| {
        anyhow::anyhow!(
            "the journal {} {what}: it holds the privacy ledger, so the aggregator will not \
             serve from it. Restore it (with its -wal file) from a backup",
            journal.display()
        )
    };
    if let Some(found) = store.integrity_problems().context("checking the journal")? {
        return Err(refuse(format!("fails SQLite's integrity check ({found})")));
    }
    if config.privacy.mode != crate::config::PrivacyMode::None {
        let uncharged = store
            .rounds_without_charge()
            .context("checking the journal")?;
        if uncharged > 0 {
            return Err(refuse(format!(
                "has {uncharged} rounds without a privacy-ledger row (deleted, or run \
                 without DP: a private federation needs a state folder of its own)"
            )));
        }
    }
    let latest = store
        .latest()
        .context("reading the journal")?
        .map(|v| v.version);
    // A crash between writing a version's folder and committing it leaves one orphan; more
    // than one version ahead means the journal lost committed rounds.
    if let Some(newest) = on_disk {
        let latest = latest.unwrap_or(0);
        if newest > latest + 1 {
            return Err(refuse(format!(
                "ends at adapter version {latest}, but versions up to {newest} are on disk \
                 (rolled back, or replaced by an older copy)"
            )));
        }
    }
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
    // Reflection in both protocol versions (grpcurl and many deployed tools speak only
    // v1alpha), advertising only the services served here: the contract's descriptor set
    // also holds the device's local API.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(fedpersona_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(
                <FederationServer<FederationService> as tonic::server::NamedService>::NAME,
            )
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
    };
    let reflection_v1 = reflection()
        .build_v1()
        .context("building the reflection service")?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
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
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
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
