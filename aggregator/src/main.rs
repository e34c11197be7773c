//! `aggregator`: the fedpersona server binary.

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps freed memory mapped instead of returning it to the OS: training allocates and frees
/// the same sizes every step, and re-faulting (zeroing) those pages cost about a quarter of a
/// step. Same as `MIMALLOC_PURGE_DELAY=-1`, which still overrides it when set.
#[allow(unsafe_code)]
fn keep_freed_memory() {
    /// `mi_option_purge_delay` in mimalloc's `mi_option_e` (v2 and v3).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads options atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

#[derive(Debug, Parser)]
#[command(name = "aggregator", version, about = "fedpersona aggregator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train the byte-level base model on the public plays (the shipped checkpoint).
    Pretrain(aggregator::pretrain::PretrainArgs),
    /// Privacy accounting: epsilon of a plan, or the noise a target epsilon needs.
    #[command(subcommand)]
    Privacy(aggregator::privacy::PrivacyCommand),
}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match &cli.command {
        Command::Pretrain(args) => {
            // Data-parallel workers each run single-threaded kernels.
            if args.workers > 1 && std::env::var_os("RAYON_NUM_THREADS").is_none() {
                std::env::set_var("RAYON_NUM_THREADS", "1");
            }
            aggregator::pretrain::run(args)
        }
        Command::Privacy(cmd) => aggregator::privacy::run(cmd).map(|line| println!("{line}")),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}
