//! `aggregator privacy epsilon|noise|plan`: the accountant from the command line, for
//! planning a deployment's noise multiplier, sampling rate and number of rounds, and what the
//! noise leaves of a round's signal.

use anyhow::ensure;
use fedpersona_privacy::accountant::{pld, rdp, Method};
use fedpersona_privacy::snr;

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
    /// The noise a target ε needs over a deployment's rounds, and the expected signal-to-noise
    /// ratio it leaves on each round's mean.
    Plan(PlanArgs),
}

/// `privacy plan`: the deployment, its target and the update's size.
#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    /// N: devices eligible per round.
    #[arg(long)]
    pub population: u64,
    /// m: the expected cohort (reports per round); the sampling rate is m / N.
    #[arg(long)]
    pub cohort: u64,
    /// The fewest reports the distributed noise is sized for (`rounds.min_reports`); the
    /// cohort when left out.
    #[arg(long)]
    pub min_reports: Option<u64>,
    /// T: rounds over the deployment's life.
    #[arg(long)]
    pub rounds: u64,
    #[arg(long)]
    pub target_epsilon: f64,
    #[arg(long)]
    pub delta: f64,
    /// d: values in an update, the adapter's trained parameters.
    #[arg(long)]
    pub dimension: usize,
    /// "rdp" (the default) or "pld".
    #[arg(long, default_value_t = Method::Rdp)]
    pub accountant: Method,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

impl PlanArgs {
    /// The deployment, or an error naming the flag that is out of range.
    fn deployment(&self) -> anyhow::Result<snr::Deployment> {
        ensure!(self.population >= 1, "--population must be at least 1");
        ensure!(
            (1..=self.population).contains(&self.cohort),
            "--cohort ({}) must be in [1, --population ({})]",
            self.cohort,
            self.population
        );
        let min_reports = self.min_reports.unwrap_or(self.cohort);
        ensure!(
            (1..=self.cohort).contains(&min_reports),
            "--min-reports ({min_reports}) must be in [1, --cohort ({})]",
            self.cohort
        );
        ensure!(self.rounds >= 1, "--rounds must be at least 1");
        ensure!(
            self.target_epsilon.is_finite() && self.target_epsilon > 0.0,
            "--target-epsilon must be positive and finite, not {}",
            self.target_epsilon
        );
        ensure!(
            self.delta > 0.0 && self.delta < 1.0,
            "--delta must be in (0, 1), not {}",
            self.delta
        );
        ensure!(self.dimension >= 1, "--dimension must be at least 1");
        Ok(snr::Deployment {
            population: self.population,
            cohort: self.cohort,
            min_reports,
            rounds: self.rounds,
            target_epsilon: self.target_epsilon,
            delta: self.delta,
            accountant: self.accountant,
            dimension: self.dimension,
        })
    }
}

fn plan(args: &PlanArgs) -> anyhow::Result<String> {
    let d = args.deployment()?;
    let p = snr::plan(&d)?;
    Ok(if args.json {
        serde_json::json!({
            "accountant": d.accountant.name(),
            "sampling_rate": p.sampling_rate,
            "noise_multiplier": p.noise_multiplier,
            "epsilon": p.epsilon,
            "noise_norm_over_clip": p.noise_norm_over_clip,
            "snr": p.snr,
        })
        .to_string()
    } else {
        format!(
            "noise multiplier {:.4} (epsilon {:.4} at delta {} over {} rounds at q = {:.4}, {} \
             accountant)\nnoise on the round's mean {:.4} C (d = {}, m = {}, noise sized for {} \
             reports)\nexpected SNR {:.4} per round (signal at most C)",
            p.noise_multiplier,
            p.epsilon,
            d.delta,
            d.rounds,
            p.sampling_rate,
            d.accountant.name().to_uppercase(),
            p.noise_norm_over_clip,
            d.dimension,
            d.cohort,
            d.min_reports,
            p.snr
        )
    })
}

/// Runs the command and returns the line to print.
pub fn run(cmd: &PrivacyCommand) -> anyhow::Result<String> {
    Ok(match cmd {
        PrivacyCommand::Plan(args) => plan(args)?,
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
