//! `aggregator privacy epsilon|noise`: the accountant from the command line, for planning a
//! deployment's noise multiplier, sampling rate and number of rounds.

use fedpersona_privacy::accountant;

/// What the rounds look like.
#[derive(Debug, Clone, clap::Args)]
pub struct Mechanism {
    /// Poisson sampling rate of a user per round (expected cohort / population).
    #[arg(long)]
    pub sampling_rate: f64,
    #[arg(long)]
    pub rounds: u64,
    #[arg(long)]
    pub delta: f64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum PrivacyCommand {
    /// User-level ε of the Poisson-subsampled Gaussian mechanism over the rounds (RDP).
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
            noise_multiplier,
            mechanism: m,
        } => {
            let mut acc = accountant::Accountant::default();
            acc.compose(m.sampling_rate, *noise_multiplier, m.rounds)?;
            let (eps, order) = acc.epsilon(m.delta)?;
            if m.json {
                serde_json::json!({"epsilon": eps, "order": order}).to_string()
            } else {
                format!(
                    "epsilon {eps:.4} (delta {}, optimal RDP order {order})",
                    m.delta
                )
            }
        }
        PrivacyCommand::Noise {
            target_epsilon,
            mechanism: m,
        } => {
            let z = accountant::noise_multiplier_for(
                *target_epsilon,
                m.sampling_rate,
                m.rounds,
                m.delta,
            )?;
            let eps = accountant::epsilon(z, m.sampling_rate, m.rounds, m.delta)?;
            if m.json {
                serde_json::json!({"noise_multiplier": z, "epsilon": eps}).to_string()
            } else {
                format!(
                    "noise multiplier {z:.4} (epsilon {eps:.4} at delta {})",
                    m.delta
                )
            }
        }
    })
}
