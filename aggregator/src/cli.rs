//! The operator's commands around a deployment: `serve`, `status`, `revoke`, `tls-cert`.

use std::path::PathBuf;

use anyhow::Context;

use crate::config::Config;
use crate::server;
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration (see deploy/aggregator.toml).
    #[arg(long)]
    pub config: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// The device id to revoke (as the device printed it at enrollment).
    pub device_id: String,
}

#[derive(Debug, clap::Args)]
pub struct TlsCertArgs {
    /// Folder for ca.pem, server.pem and server.key.
    #[arg(long)]
    pub out: PathBuf,
    /// DNS names or IP addresses the server certificate is valid for.
    #[arg(long = "name", default_values_t = vec!["localhost".to_string(), "127.0.0.1".to_string()])]
    pub names: Vec<String>,
}

/// Validates the config, binds the listeners, and serves until Ctrl-C or SIGTERM.
pub async fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let metrics = match config.metrics_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding metrics {a}"))?,
        ),
        None => None,
    };
    tracing::info!(
        listen = %listener.local_addr()?,
        metrics = ?metrics.as_ref().and_then(|m| m.local_addr().ok()),
        "aggregator serving"
    );
    let handle = server::start(config)?;
    server::run(handle, listener, metrics, shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

/// The journal's view: current round, model version and counts.
pub fn status(args: &StatusArgs) -> anyhow::Result<String> {
    let config = Config::load(&args.config)?;
    let path = server::journal_path(&config);
    if !path.exists() {
        anyhow::bail!(
            "no journal at {} (the aggregator never ran with this state_dir)",
            path.display()
        );
    }
    let store = Store::open_read_only(&path)?;
    let s = store.summary()?;
    let round = s.last_round.as_ref();
    let privacy = privacy_status(&config, &store)?;
    if args.json {
        return Ok(serde_json::json!({
            "round": round.map(|r| r.id),
            "round_state": round.map(|r| r.state.to_string()),
            "round_reports": round.map(|r| r.reports),
            "round_base_version": round.map(|r| r.base_version),
            "model_version": s.latest_version,
            "rounds_committed": s.rounds_committed,
            "rounds_abandoned": s.rounds_abandoned,
            "uploads": s.uploads,
            "devices": s.devices,
            "devices_revoked": s.revoked,
            "privacy": privacy.as_ref().map_or(
                serde_json::json!({"mode": config.privacy.mode.name()}),
                |p| serde_json::json!({
                    "mode": config.privacy.mode.name(),
                    "accountant": p.accountant.name(),
                    "epsilon_spent": p.epsilon,
                    "epsilon_budget": p.budget,
                    "epsilon_remaining": fedpersona_privacy::mode::epsilon_remaining(p.budget, p.epsilon),
                    "delta": p.delta,
                    "rounds_charged": p.rounds_charged,
                })
            ),
        })
        .to_string());
    }
    let mut out = String::new();
    match round {
        Some(r) => out.push_str(&format!(
            "round {}: {} ({} reports, from version {}){}\n",
            r.id,
            r.state,
            r.reports,
            r.base_version,
            r.reason
                .as_deref()
                .map(|x| format!(" - {x}"))
                .unwrap_or_default()
        )),
        None => out.push_str("no round yet\n"),
    }
    out.push_str(&format!(
        "model version: {}\nrounds: {} committed, {} abandoned\nuploads accepted: {}\ndevices: {} enrolled, {} revoked",
        s.latest_version.map_or("none".into(), |v| v.to_string()),
        s.rounds_committed,
        s.rounds_abandoned,
        s.uploads,
        s.devices,
        s.revoked
    ));
    match privacy {
        Some(p) => out.push_str(&format!(
            "\nprivacy ({}, {} accountant): epsilon {:.4} spent of {} at delta {} ({:.4} remaining) over {} rounds charged",
            config.privacy.mode.name(),
            p.accountant,
            p.epsilon,
            p.budget,
            p.delta,
            fedpersona_privacy::mode::epsilon_remaining(p.budget, p.epsilon),
            p.rounds_charged
        )),
        None => out.push_str("\nprivacy: none (clipping only, no DP guarantee)"),
    }
    Ok(out)
}

/// ε spent by the journal's privacy ledger, at the configured δ (None without DP).
fn privacy_status(
    config: &Config,
    store: &Store,
) -> anyhow::Result<Option<crate::round::PrivacySpent>> {
    let Some(budget) = config.privacy.budget else {
        return Ok(None);
    };
    let accountant = crate::round::ledger_accountant(store, config.privacy.accountant)?;
    Ok(Some(crate::round::PrivacySpent::of(&accountant, budget)?))
}

pub fn revoke(args: &RevokeArgs) -> anyhow::Result<String> {
    let config = Config::load(&args.config)?;
    let store = Store::open(&server::journal_path(&config))?;
    if store.revoke(&args.device_id)? {
        Ok("device revoked".into())
    } else {
        anyhow::bail!("no such device")
    }
}

pub fn tls_cert(args: &TlsCertArgs) -> anyhow::Result<String> {
    let m = crate::tls::generate(&args.names)?;
    crate::tls::write(&m, &args.out)?;
    Ok(format!(
        "wrote {0}/ca.pem (give it to agents), {0}/server.pem and {0}/server.key",
        args.out.display()
    ))
}
