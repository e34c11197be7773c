//! `device-agent`: the fedpersona edge binary.

use clap::{Parser, Subcommand};
use device_agent::bench::{self, BenchCommand};
use device_agent::{adapt, evaluate, generate};

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
#[command(name = "device-agent", version, about = "fedpersona device agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a LoRA adapter on the user's own text.
    Train(adapt::TrainArgs),
    /// Continue a prompt (prints only the continuation).
    Generate(generate::GenerateArgs),
    /// Loss, bits per byte and next-token accuracy on a data file.
    Eval(evaluate::EvalArgs),
    /// Time training steps or decoding (prints medians after warm-up).
    #[command(subcommand)]
    Bench(BenchCommand),
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
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(args) => {
            let workers = args.threads.unwrap_or_else(device_agent::available_cores);
            device_agent::set_kernel_threads(if workers > 1 { 1 } else { workers });
            let s = adapt::run(&args)?;
            let fmt = |r: Option<fedpersona_shared::train::EvalReport>| {
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
            device_agent::set_kernel_threads(1);
            generate::run(&args)?;
            // Only the continuation goes to a pipe; a terminal also gets a final newline.
            if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                println!();
            }
        }
        Command::Bench(cmd) => {
            let (r, args) = match &cmd {
                BenchCommand::Train(a) => {
                    device_agent::set_kernel_threads(if a.threads > 1 { 1 } else { a.threads });
                    (bench::train(a)?, a)
                }
                BenchCommand::Generate(a) => {
                    device_agent::set_kernel_threads(a.threads);
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
