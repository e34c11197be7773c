//! `fedpersona-sim`: the whole system on one machine, and the base model's training run.

use clap::{Parser, Subcommand};
use fedpersona_sim::args::SimulateArgs;
use fedpersona_sim::{pretrain_cli, report, scale, simulate};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "fedpersona-sim", version, about = "fedpersona simulation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run an aggregator and many agents on this machine and report how well each method
    /// personalizes held-out users (`--quick` for a few minutes' run).
    Simulate(Box<SimulateArgs>),
    /// The privacy–utility curve: FedAvg simulations over a grid of ε and of shares of the
    /// population (each at the same sampling rate), scored on the same held-out users;
    /// resumes an interrupted sweep in the same `--out`.
    Sweep(Box<fedpersona_sim::sweep::SweepArgs>),
    /// Train the byte-level base model on the public plays (the shipped checkpoint).
    Pretrain(pretrain_cli::PretrainArgs),
}

fn main() {
    // Training reuses the same large buffers every step: keep freed pages mapped.
    fedpersona_model::runtime::keep_freed_memory();
    let cli = Cli::parse();
    // A simulation runs hundreds of agents and its own aggregator in this process: their
    // per-round lines would drown the progress bars, so only warnings by default.
    let quiet = matches!(cli.command, Command::Simulate(_) | Command::Sweep(_));
    fedpersona_model::runtime::init_logging_with(if quiet { "warn" } else { "info" });
    let result = match &cli.command {
        Command::Simulate(args) => {
            fedpersona_model::runtime::set_kernel_threads(1);
            run_simulate(args)
        }
        Command::Sweep(args) => {
            fedpersona_model::runtime::set_kernel_threads(1);
            run_sweep(args)
        }
        Command::Pretrain(args) => {
            // Data-parallel workers each run single-threaded kernels.
            if args.workers > 1 {
                fedpersona_model::runtime::set_kernel_threads(1);
            }
            pretrain_cli::run(args)
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

fn run_sweep(args: &fedpersona_sim::sweep::SweepArgs) -> anyhow::Result<()> {
    let points = fedpersona_sim::sweep::run(args)?;
    print!("{}", fedpersona_sim::sweep::markdown(&points));
    println!("wrote {}", args.sim.out.join("sweep.md").display());
    Ok(())
}

fn run_simulate(args: &SimulateArgs) -> anyhow::Result<()> {
    if args.scale_test {
        let r = scale::run(args)?;
        println!(
            "{} agents resident: RSS {:.0} MB -> {:.0} MB ({:.1} KB per agent), enrolled in {:.1} s",
            r.agents, r.rss_before_agents_mb, r.rss_with_agents_mb, r.kb_per_agent, r.enroll_seconds
        );
        println!(
            "rounds of {} clients: median {:.2} s per round ({}); peak RSS {:.0} MB; wrote {}",
            r.clients_per_round,
            r.median_seconds_per_round,
            r.seconds_per_round
                .iter()
                .map(|s| format!("{s:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            r.peak_rss_mb,
            args.out.join("scale.json").display()
        );
        return Ok(());
    }
    let r = simulate::run(args)?;
    print!("{}", report::summary(&r));
    println!("wrote {}", args.out.join("report.md").display());
    Ok(())
}
