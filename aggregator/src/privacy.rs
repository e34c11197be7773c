//! `aggregator privacy epsilon|noise`: the accountant from the command line, for planning a
//! deployment's noise multiplier, sampling rate and number of rounds.

use fedpersona_privacy::accountant::{pld, rdp, Method};

/// What the rounds look like, and which accountant bounds them.
#[derive(Debug, Clone, clap::Args)]
pub struct Mechanism {
    /// Poisson sampling rate of a user per round (expected cohort / population).
    #[arg(long)]
    pub sampling_rate: f64,
    #[arg(long)]
    pub rounds: u64,
    #[arg(long)]
    pub delta: f64,
    /// The accountant: "rdp" (Rényi DP; the default, as in the aggregator's config) or "pld"
    /// (privacy loss distributions: tighter, so less noise for the same epsilon).
    #[arg(long, default_value_t = Method::Rdp)]
    pub accountant: Method,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum PrivacyCommand {
    /// User-level ε of the Poisson-subsampled Gaussian mechanism over the rounds.
    Epsilon {
        /// Noise standard deviation over the clipping norm.
        #[arg(long)]
        noise_multiplier: f64,
        #[command(flatten)]
        mechanism: Mechanism,
    },
    /// The smallest noise multiplier that keeps ε within a target.
    Noise {
        #[arg(long)]
        target_epsilon: f64,
        #[command(flatten)]
        mechanism: Mechanism,
    },
}

/// Runs the command and returns the line to print.
pub fn run(cmd: &PrivacyCommand) -> anyhow::Result<String> {
    Ok(match cmd {
        PrivacyCommand::Epsilon {
            noise_multiplier: z,
            mechanism: m,
        } => {
            let name = m.accountant.name();
            match m.accountant {
                Method::Rdp => {
                    let mut acc = rdp::RdpAccountant::default();
                    acc.compose(m.sampling_rate, *z, m.rounds)?;
                    let (eps, order) = acc.epsilon(m.delta)?;
                    if m.json {
                        serde_json::json!({"accountant": name, "epsilon": eps, "order": order})
                            .to_string()
                    } else {
                        format!(
                            "epsilon {eps:.4} (delta {}, RDP accountant, optimal order {order})",
                            m.delta
                        )
                    }
                }
                Method::Pld => {
                    let eps = pld::epsilon(*z, m.sampling_rate, m.rounds, m.delta)?;
                    let h = pld::DEFAULT_DISCRETIZATION;
                    if m.json {
                        serde_json::json!({"accountant": name, "epsilon": eps, "discretization": h})
                            .to_string()
                    } else {
                        format!(
                            "epsilon {eps:.4} (delta {}, PLD accountant, pessimistic discretization {h})",
                            m.delta
                        )
                    }
                }
            }
        }
        PrivacyCommand::Noise {
            target_epsilon,
            mechanism: m,
        } => {
            let method = m.accountant;
            let z =
                method.noise_multiplier_for(*target_epsilon, m.sampling_rate, m.rounds, m.delta)?;
            let eps = method.epsilon(z, m.sampling_rate, m.rounds, m.delta)?;
            if m.json {
                serde_json::json!({
                    "accountant": method.name(),
                    "noise_multiplier": z,
                    "epsilon": eps,
                })
                .to_string()
            } else {
                format!(
                    "noise multiplier {z:.4} (epsilon {eps:.4} at delta {}, {} accountant)",
                    m.delta,
                    method.name().to_uppercase()
                )
            }
        }
    })
}
