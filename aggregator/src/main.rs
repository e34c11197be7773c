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
    /// Train the byte-level base model on the public plays (the shipped checkpoint).
    Pretrain(aggregator::pretrain::PretrainArgs),
    /// Privacy accounting: epsilon of a plan, or the noise a target epsilon needs.
    #[command(subcommand)]
    Privacy(aggregator::privacy::PrivacyCommand),
}

fn main() {
    fedpersona_shared::runtime::keep_freed_memory();
    let cli = Cli::parse();
    fedpersona_shared::runtime::init_logging();
    let result = match &cli.command {
        Command::Pretrain(args) => {
            // Data-parallel workers each run single-threaded kernels.
            if args.workers > 1 {
                fedpersona_shared::runtime::set_kernel_threads(1);
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
