//! `device-agent`: the fedpersona edge binary.

use clap::{Parser, Subcommand};
use device_agent::bench::{self, BenchCommand};
use device_agent::{evaluate, generate, train};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "device-agent", version, about = "fedpersona device agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a LoRA adapter on the user's own text.
    Train(train::TrainArgs),
    /// Continue a prompt (prints only the continuation).
    Generate(generate::GenerateArgs),
    /// Loss, bits per byte and next-token accuracy on a data file.
    Eval(evaluate::EvalArgs),
    /// Take part in federated rounds with the given config (see deploy/agent.toml).
    Run {
        #[arg(long)]
        config: std::path::PathBuf,
    },
    /// The local API for apps on the device (Unix socket): serve it, or call it.
    #[command(subcommand)]
    Local(device_agent::local::LocalCommand),
    /// Time training steps or decoding (prints medians after warm-up).
    #[command(subcommand)]
    Bench(BenchCommand),
}

fn main() {
    fedpersona_model::runtime::keep_freed_memory();
    let cli = Cli::parse();
    fedpersona_model::runtime::init_logging();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(args) => {
            fedpersona_model::runtime::set_kernel_threads(1);
            let s = train::run(&args)?;
            let fmt = |r: Option<fedpersona_model::train::EvalReport>| {
                r.map_or("-".to_string(), |r| {
                    format!(
                        "loss {:.4}, bits/byte {:.4}, accuracy {:.4}",
                        r.loss, r.bits_per_byte, r.accuracy
                    )
                })
            };
            println!(
                "trained on {} examples in {:.1} s (final train loss {:.4}); wrote {}",
                s.train_examples,
                s.seconds,
                s.final_train_loss,
                args.out.display()
            );
            if s.held_out_examples > 0 {
                println!(
                    "held-out ({} examples) before: {}",
                    s.held_out_examples,
                    fmt(s.before)
                );
                println!(
                    "held-out ({} examples) after:  {}",
                    s.held_out_examples,
                    fmt(s.after)
                );
            }
        }
        Command::Generate(args) => {
            fedpersona_model::runtime::set_kernel_threads(1);
            generate::run(&args)?;
            // Only the continuation goes to a pipe; a terminal also gets a final newline.
            if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                println!();
            }
        }
        Command::Bench(cmd) => {
            let (r, args) = match &cmd {
                BenchCommand::Train(a) => {
                    fedpersona_model::runtime::set_kernel_threads(if a.threads > 1 {
                        1
                    } else {
                        a.threads
                    });
                    (bench::train(a)?, a)
                }
                BenchCommand::Generate(a) => {
                    fedpersona_model::runtime::set_kernel_threads(a.threads);
                    (bench::generate_bench(a)?, a)
                }
            };
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "median step {:.1} ms  tokens/s {:.0}  peak RSS {:.0} MB{}",
                    r.median_step_ms,
                    r.tokens_per_s,
                    r.peak_rss_mb,
                    match (r.loss_first, r.loss_last) {
                        (Some(a), Some(b)) => format!("  loss {a:.4} -> {b:.4}"),
                        _ => String::new(),
                    }
                );
            }
        }
        Command::Local(cmd) => {
            fedpersona_model::runtime::set_kernel_threads(1);
            let out = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(device_agent::local::run(cmd))?;
            if !out.is_empty() {
                println!("{out}");
            }
        }
        Command::Run { config } => {
            fedpersona_model::runtime::set_kernel_threads(1);
            let summary = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(device_agent::federation::run_from_config(&config))?;
            println!(
                "reported in {} rounds ({} failed attempts)",
                summary.rounds_reported, summary.tasks_failed
            );
            if let Some(device_agent::federation::client::Retired::PrivacyBudgetExhausted) =
                summary.retired
            {
                println!(
                    "stopped: the aggregator's privacy budget is spent, no round will open again"
                );
            }
        }
        Command::Eval(args) => {
            let r = evaluate::run(&args)?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "loss {:.4}  bits/byte {:.4}  accuracy {:.4}  ({} tokens)",
                    r.loss, r.bits_per_byte, r.accuracy, r.tokens
                );
            }
        }
    }
    Ok(())
}
