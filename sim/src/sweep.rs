//! `fedpersona-sim sweep`: the privacy–utility curve. One FedAvg simulation per point of ε
//! (each private point's noise solved for its ε at the run's δ; `inf` is the same federation
//! without DP) and of the share of the training population that takes part (at the same
//! sampling rate q, so the cohort shrinks with the population). Every point scores the same
//! held-out users, so the points compare user by user. Each point is a whole `simulate` run
//! in its own folder; a point whose complete report is already there is read, not re-run, so
//! an interrupted sweep resumes where it stopped.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use fedpersona_model::checkpoint::write_atomic;
use serde::Serialize;
use serde_json::Value;

use crate::args::SimulateArgs;
use crate::plot;
use crate::settings::{PrivacyMode, Settings};

/// Flags of `fedpersona-sim sweep`: the grid, and the simulation flags every point shares.
#[derive(Debug, Clone, clap::Args)]
pub struct SweepArgs {
    /// Target user-level ε of the private points (δ from `--delta`); `inf`: without DP.
    #[arg(long, value_delimiter = ',', default_value = "inf,8,4,2,1,16")]
    pub epsilons: Vec<String>,
    /// Shares of the training population (after `--agents`) that take part, each at the
    /// same sampling rate as `--clients-per-round` over the whole population.
    #[arg(long, value_delimiter = ',', default_value = "1,0.5,0.25")]
    pub population_shares: Vec<f64>,
    #[command(flatten)]
    pub sim: SimulateArgs,
}

/// One point of the curve, read from its run's `report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub population_share: f64,
    pub population: u64,
    pub clients_per_round: u64,
    /// The target ε (None: no DP).
    pub epsilon: Option<f64>,
    /// What the ledger spent, the noise multiplier and the sampling rate (private points).
    pub epsilon_spent: Option<f64>,
    pub noise_multiplier: Option<f64>,
    pub sampling_rate: Option<f64>,
    /// Median measured signal-to-noise ratio per round (private points).
    pub snr_median: Option<f64>,
    pub base: f64,
    /// Held-out users: the global adapter and FedAvg + fine-tuning, as trained (the model's
    /// quality) and as served after the never-harm check.
    pub global: MethodPoint,
    pub fedavg_finetune: MethodPoint,
    pub seconds: f64,
    pub report: PathBuf,
}

/// One method at one point.
#[derive(Debug, Clone, Serialize)]
pub struct MethodPoint {
    pub unchecked_accuracy: f64,
    /// Paired per-user difference from base, as trained, and its 95% interval.
    pub unchecked_minus_base: f64,
    pub unchecked_minus_base_ci95: f64,
    pub unchecked_accuracy_hurt_share: f64,
    pub accuracy: f64,
    pub minus_base: f64,
    pub minus_base_ci95: f64,
    pub accuracy_hurt_share: f64,
}

/// Runs (or resumes) the sweep and writes `sweep.json`, `sweep.md` and
/// `privacy_utility.svg` into `--out`.
pub fn run(args: &SweepArgs) -> anyhow::Result<Vec<Point>> {
    let grid = Grid::of(args)?;
    let out = &args.sim.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut points = Vec::new();
    for &share in &grid.shares {
        for &epsilon in &grid.epsilons {
            let dir = out.join("points").join(point_name(share, epsilon));
            let report = dir.join("report.json");
            if !is_complete(&report) {
                let point_args = grid.point_args(share, epsilon, &dir);
                eprintln!(
                    "sweep: {} users per round of {} ({}), ε {}",
                    point_args.clients_per_round.unwrap_or_default(),
                    point_args.agents.unwrap_or_default(),
                    dir.display(),
                    epsilon.map_or("inf".into(), |e| e.to_string())
                );
                crate::simulate::run(&point_args)?;
                if !is_complete(&report) {
                    bail!("the sweep stopped at {} (interrupted)", dir.display());
                }
            }
            points.push(Point::read(share, epsilon, &report)?);
            write(out, &points)?;
        }
    }
    Ok(points)
}

/// The sweep's grid and the flags its points share.
struct Grid {
    epsilons: Vec<Option<f64>>,
    shares: Vec<f64>,
    /// The training population before any share (after `--agents`).
    population: usize,
    /// The sampling rate every point keeps.
    rate: f64,
    mode: PrivacyMode,
    sim: SimulateArgs,
}

impl Grid {
    fn of(args: &SweepArgs) -> anyhow::Result<Grid> {
        let sim = &args.sim;
        ensure!(
            sim.epsilon.is_none() && sim.noise_multiplier.is_none(),
            "the sweep sets each point's ε: give --epsilons, not --epsilon or --noise-multiplier"
        );
        ensure!(!sim.scale_test, "--scale-test is its own run, not a sweep");
        let mut epsilons = Vec::new();
        for e in &args.epsilons {
            epsilons.push(match e.trim() {
                "inf" | "∞" => None,
                x => {
                    let v: f64 = x
                        .parse()
                        .with_context(|| format!("--epsilons: {x:?} is not a number or inf"))?;
                    ensure!(v.is_finite() && v > 0.0, "--epsilons must be positive");
                    Some(v)
                }
            });
        }
        ensure!(!epsilons.is_empty(), "--epsilons names no point");
        ensure!(
            !args.population_shares.is_empty()
                && args
                    .population_shares
                    .iter()
                    .all(|s| s.is_finite() && *s > 0.0 && *s <= 1.0),
            "--population-shares must be in (0, 1]"
        );
        // The shared settings, without the privacy each point sets for itself.
        let settings = Settings::resolve(&SimulateArgs {
            privacy: PrivacyMode::None,
            ..sim.clone()
        })?;
        let (data, _) = sim.paths();
        let splits = settings.splits(&data)?;
        let population = settings
            .max_train_users
            .map_or(splits.train_users.len(), |cap| {
                cap.min(splits.train_users.len())
            });
        ensure!(population >= 2, "the sweep needs at least 2 training users");
        let rate = (settings.clients_per_round as f64 / population as f64).min(1.0);
        Ok(Grid {
            epsilons,
            shares: args.population_shares.clone(),
            population,
            rate,
            mode: match sim.privacy {
                PrivacyMode::None => PrivacyMode::Central,
                m => m,
            },
            sim: sim.clone(),
        })
    }

    /// The `simulate` flags of one point: FedAvg only (no meta-learned start, no adaptive
    /// ablation, no local-only baseline, which no federation changes, and no non-private
    /// reference: the `inf` point is that reference).
    fn point_args(&self, share: f64, epsilon: Option<f64>, dir: &Path) -> SimulateArgs {
        let agents = ((share * self.population as f64).round() as usize).max(2);
        let cohort = ((self.rate * agents as f64).round() as usize).clamp(1, agents);
        SimulateArgs {
            out: dir.to_path_buf(),
            agents: Some(agents),
            clients_per_round: Some(cohort),
            privacy: if epsilon.is_some() {
                self.mode
            } else {
                PrivacyMode::None
            },
            epsilon,
            secure_aggregation: self.sim.secure_aggregation && epsilon.is_some(),
            no_meta: true,
            no_adaptive: true,
            no_local_only: true,
            no_nonprivate_reference: true,
            no_progress: true,
            ..self.sim.clone()
        }
    }
}

fn point_name(share: f64, epsilon: Option<f64>) -> String {
    format!(
        "share-{share}-eps-{}",
        epsilon.map_or("inf".into(), |e| e.to_string())
    )
}

fn is_complete(report: &Path) -> bool {
    std::fs::read(report)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|r| r["complete"] == Value::Bool(true))
}

impl Point {
    fn read(share: f64, epsilon: Option<f64>, report: &Path) -> anyhow::Result<Point> {
        let r: Value = serde_json::from_slice(
            &std::fs::read(report).with_context(|| format!("reading {}", report.display()))?,
        )
        .with_context(|| format!("parsing {}", report.display()))?;
        let num = |v: &Value, what: &str| {
            v.as_f64()
                .with_context(|| format!("{}: no {what}", report.display()))
        };
        let method = |name: &str| -> anyhow::Result<MethodPoint> {
            let m = &r["methods"][name];
            let vs_base = r["comparisons"]
                .as_array()
                .and_then(|c| {
                    c.iter().find(|c| {
                        c["better"] == name && c["worse"] == "base" && c["metric"] == "accuracy"
                    })
                })
                .with_context(|| format!("{}: no {name} − base", report.display()))?;
            Ok(MethodPoint {
                unchecked_accuracy: num(&m["unchecked_accuracy"], "unchecked accuracy")?,
                unchecked_minus_base: num(&vs_base["unchecked_mean_difference"], "difference")?,
                unchecked_minus_base_ci95: num(&vs_base["unchecked_ci95"], "interval")?,
                unchecked_accuracy_hurt_share: num(
                    &m["unchecked_accuracy_hurt_share"],
                    "hurt share",
                )?,
                accuracy: num(&m["accuracy"], "accuracy")?,
                minus_base: num(&vs_base["mean_difference"], "difference")?,
                minus_base_ci95: num(&vs_base["ci95"], "interval")?,
                accuracy_hurt_share: num(&m["accuracy_hurt_share"], "hurt share")?,
            })
        };
        let p = &r["privacy"];
        Ok(Point {
            population_share: share,
            population: r["users"]["train"].as_u64().unwrap_or_default(),
            clients_per_round: r["settings"]["clients_per_round"]
                .as_u64()
                .unwrap_or_default(),
            epsilon,
            epsilon_spent: p["epsilon"].as_f64(),
            noise_multiplier: p["noise_multiplier"].as_f64(),
            sampling_rate: p["sampling_rate"].as_f64(),
            snr_median: p["snr"]["fedavg"]["median"].as_f64(),
            base: num(&r["methods"]["base"]["accuracy"], "base accuracy")?,
            global: method("global")?,
            fedavg_finetune: method("fedavg_finetune")?,
            seconds: num(&r["seconds"], "seconds")?,
            report: report.to_path_buf(),
        })
    }
}

/// Writes what is done so far: `sweep.json`, `sweep.md`, `privacy_utility.svg`.
fn write(out: &Path, points: &[Point]) -> anyhow::Result<()> {
    write_atomic(
        &out.join("sweep.json"),
        &serde_json::to_vec_pretty(points).context("serializing the sweep")?,
    )?;
    write_atomic(&out.join("sweep.md"), markdown(points).as_bytes())?;
    plot_curves(&out.join("privacy_utility.svg"), points)
}

fn pct(x: f64) -> String {
    format!("{:.2}", 100.0 * x)
}

/// The table: one row per point.
pub fn markdown(points: &[Point]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Privacy–utility sweep\n\nHeld-out users (the same at every point), next-byte accuracy %. \"Trained\": the adapter as the federation left it, paired difference from base ± 95% interval; \"served\": after the device's never-harm check; s: the point's wall time. {} points, {:.0} s in all.\n",
        points.len(),
        points.iter().map(|p| p.seconds).sum::<f64>()
    );
    let _ = writeln!(
        s,
        "| users | per round | ε | z | SNR | base | global trained (− base) | global served, hurt % | fedavg_finetune trained (− base) | fedavg_finetune served, hurt % | s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    for p in points {
        let opt = |v: Option<f64>, d: usize| v.map_or("-".to_string(), |v| format!("{v:.d$}"));
        let trained = |m: &MethodPoint| {
            format!(
                "{} ({:+.2} ± {:.2})",
                pct(m.unchecked_accuracy),
                100.0 * m.unchecked_minus_base,
                100.0 * m.unchecked_minus_base_ci95
            )
        };
        let served =
            |m: &MethodPoint| format!("{}, {:.0}", pct(m.accuracy), 100.0 * m.accuracy_hurt_share);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
            p.population,
            p.clients_per_round,
            p.epsilon.map_or("∞".to_string(), |e| format!("{e}")),
            opt(p.noise_multiplier, 3),
            opt(p.snr_median, 2),
            pct(p.base),
            trained(&p.global),
            served(&p.global),
            trained(&p.fedavg_finetune),
            served(&p.fedavg_finetune),
            p.seconds
        );
    }
    s
}

/// Accuracy (as trained) against log₂ ε, one line per population and method; the
/// non-private point sits one step right of the largest ε.
fn plot_curves(path: &Path, points: &[Point]) -> anyhow::Result<()> {
    let top = points
        .iter()
        .filter_map(|p| p.epsilon)
        .fold(f64::NEG_INFINITY, f64::max);
    let x_inf = if top.is_finite() {
        top.log2() + 1.0
    } else {
        0.0
    };
    let mut populations: Vec<u64> = points.iter().map(|p| p.population).collect();
    populations.sort_unstable();
    populations.dedup();
    let mut series = Vec::new();
    for n in populations.into_iter().rev() {
        for (name, pick) in [
            (
                "global",
                (|p: &Point| p.global.unchecked_accuracy) as fn(&Point) -> f64,
            ),
            ("fedavg_finetune", |p: &Point| {
                p.fedavg_finetune.unchecked_accuracy
            }),
        ] {
            let mut pts: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.population == n)
                .map(|p| (p.epsilon.map_or(x_inf, f64::log2), pick(p)))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            series.push(plot::Series {
                name: format!("{name}, {n} users"),
                points: pts,
            });
        }
    }
    plot::line_chart(
        path,
        "Held-out users: accuracy against the privacy budget",
        "log2 ε (rightmost: no DP)",
        "next-byte accuracy %",
        &series,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sweep: SweepArgs,
    }

    fn grid(flags: &[&str]) -> anyhow::Result<Grid> {
        let mut argv = vec!["sweep", "--out", "/tmp/sweep-test"];
        argv.extend(flags);
        Grid::of(&Cli::try_parse_from(argv)?.sweep)
    }

    fn corpus(dir: &Path) -> PathBuf {
        let path = dir.join("corpus.jsonl");
        let mut text = String::new();
        for u in 0..25 {
            for i in 0..20 {
                text.push_str(
                    &serde_json::json!({"user": format!("u{u}"), "text": format!("line {i}")})
                        .to_string(),
                );
                text.push('\n');
            }
        }
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn each_point_keeps_the_sampling_rate_and_runs_fedavg_alone() {
        let dir = tempfile::tempdir().unwrap();
        let data = corpus(dir.path());
        // 25 users, 20% held out: a population of 20, 10 per round (q = 0.5).
        let g = grid(&[
            "--data",
            data.to_str().unwrap(),
            "--clients-per-round",
            "10",
            "--epsilons",
            "inf,4",
            "--population-shares",
            "1,0.25",
            "--privacy",
            "central",
        ])
        .unwrap();
        assert_eq!((g.population, g.rate), (20, 0.5));
        assert_eq!(g.epsilons, [None, Some(4.0)]);
        let quarter = g.point_args(0.25, Some(4.0), Path::new("p"));
        assert_eq!(
            (quarter.agents, quarter.clients_per_round),
            (Some(5), Some(3))
        );
        assert_eq!(quarter.privacy, PrivacyMode::Central);
        assert_eq!(quarter.epsilon, Some(4.0));
        assert!(quarter.no_meta && quarter.no_adaptive && quarter.no_local_only);
        assert!(quarter.no_nonprivate_reference);
        let reference = g.point_args(1.0, None, Path::new("p"));
        assert_eq!(reference.privacy, PrivacyMode::None);
        assert_eq!(reference.clients_per_round, Some(10));
        // The points' own settings resolve.
        Settings::resolve(&quarter).unwrap();
        Settings::resolve(&reference).unwrap();
    }

    #[test]
    fn a_bad_grid_is_refused() {
        let err = |flags: &[&str]| grid(flags).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(&["--epsilons", "8,x"]).contains("--epsilons"));
        assert!(err(&["--epsilons", "8,0"]).contains("--epsilons must be positive"));
        assert!(err(&["--population-shares", "1.5"]).contains("--population-shares"));
        assert!(err(&["--epsilon", "8", "--privacy", "central"]).contains("--epsilons"));
    }
}
