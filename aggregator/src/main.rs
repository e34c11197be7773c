//! `aggregator`: the fedpersona server binary.

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "aggregator", version, about = "fedpersona aggregator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run federated rounds over gRPC (TLS) with the given config.
    Serve(aggregator::cli::ServeArgs),
    /// Current round, model version and counts, from the journal.
    Status(aggregator::cli::StatusArgs),
    /// Revoke a device: its requests are refused from now on.
    Revoke(aggregator::cli::RevokeArgs),
    /// Write a self-signed CA and a server certificate for a test deployment.
    TlsCert(aggregator::cli::TlsCertArgs),
    /// Privacy accounting: epsilon of a plan, the noise a target epsilon needs, and the
    /// signal-to-noise ratio it leaves.
    #[command(subcommand)]
    Privacy(aggregator::privacy::PrivacyCommand),
    /// Benchmarks (not tests): upload ingest throughput and memory.
    #[command(subcommand)]
    Bench(aggregator::bench::BenchCommand),
}

fn main() {
    let cli = Cli::parse();
    // A long-running server returns freed memory.
    fedpersona_model::runtime::return_freed_memory();
    fedpersona_model::runtime::init_logging();
    let print = |r: anyhow::Result<String>| r.map(|line| println!("{line}"));
    let result = match &cli.command {
        Command::Serve(args) => {
            tokio_runtime().and_then(|rt| rt.block_on(aggregator::cli::serve(args)))
        }
        Command::Status(args) => print(aggregator::cli::status(args)),
        Command::Revoke(args) => print(aggregator::cli::revoke(args)),
        Command::TlsCert(args) => print(aggregator::cli::tls_cert(args)),
        Command::Privacy(cmd) => print(aggregator::privacy::run(cmd)),
        Command::Bench(cmd) => {
            tokio_runtime().and_then(|rt| print(rt.block_on(aggregator::bench::run(cmd))))
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
