//! `fedpersona-sim simulate`: the whole system on one machine. A real aggregator (its gRPC
//! server, TLS with a certificate generated for the run, on loopback) and one real agent per
//! training user, sharing one in-memory copy of the frozen base model, run two federations
//! (FedAvg, and a meta-learned initialization by Reptile-style local adaptation with a server
//! step); held-out users then personalize from each starting point in a few local steps and
//! are scored on their own later lines. See DESIGN.md (Benchmark) for the protocol.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::corpus::UserSplit;
use anyhow::Context;
use candle_core::Device;
use fedpersona_model::train::Window;
use fedpersona_model::BaseModel;
use fedpersona_privacy::AdapterTensors;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::args::SimulateArgs;
use crate::evaluation::{self, UserScores};
use crate::federation::{runtime, Env, Federation, Interrupted};
use crate::methods::{self, Method};
use crate::plot;
use crate::progress::Progress;
use crate::report::{self, Report, RoundRecord};
use crate::settings::{FederationKind, FewShot, Settings};

/// Runs the simulation and writes the report into `--out`.
pub fn run(args: &SimulateArgs) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut settings = Settings::resolve(args)?;
    let (data_path, base_dir) = args.paths();
    let mut splits = settings.splits(&data_path)?;
    if let Some(cap) = settings.max_train_users {
        splits.train_users.truncate(cap);
    }
    if let Some(cap) = settings.max_heldout_users {
        splits.heldout_users.truncate(cap);
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let base = Arc::new(
        BaseModel::load(&base_dir, &Device::Cpu)
            .with_context(|| format!("loading base model {}", base_dir.display()))?,
    );
    // Windows no longer than the base model's context.
    let max_pos = base.model.config().max_position_embeddings;
    settings.eval_seq_len = settings.eval_seq_len.min(max_pos);
    settings.train_seq_len = settings.train_seq_len.min(max_pos as u32);
    tracing::info!(
        train_users = splits.train_users.len(),
        heldout_users = splits.heldout_users.len(),
        dropped = splits.dropped_users,
        "users"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let rt = runtime(settings.workers)?;
    {
        let stop = stop.clone();
        rt.spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.store(true, Ordering::Relaxed);
                eprintln!("\nstopping: writing a partial report (Ctrl-C again to quit now)");
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
    }
    let tls_dir = args.out.join("tls");
    let material = aggregator::tls::generate(&["localhost".into(), "127.0.0.1".into()])?;
    aggregator::tls::write(&material, &tls_dir)?;
    let env = Env {
        base: base.clone(),
        base_dir: base_dir.clone(),
        tls_dir,
        stop: stop.clone(),
        workers: settings.workers,
    };
    let progress = Progress::new(!args.no_progress);
    let lora = settings.lora();

    // The monitoring slice: a fixed sample of the training users' test windows.
    let train_test: Vec<Window> = windows_of(&base, &splits.train_users, settings.eval_seq_len)?;
    let monitor: Vec<Window> = {
        let mut w = train_test.clone();
        w.shuffle(&mut rand_chacha::ChaCha20Rng::seed_from_u64(settings.seed));
        w.truncate(settings.monitor_windows);
        w
    };
    let monitor_base =
        evaluation::score_windows(&base, None, &lora, &monitor, settings.workers)?.accuracy;

    let mut rounds: Vec<RoundRecord> = Vec::new();
    let mut thetas: BTreeMap<FederationKind, AdapterTensors> = BTreeMap::new();
    let mut interrupted = None;
    let mut rounds_completed = u64::MAX;
    let mut spent = Vec::new();
    let mut snr = BTreeMap::new();
    for kind in settings.kinds() {
        let spec = settings.federation(kind);
        let name = kind.name();
        let dir = args.out.join(name);
        let enroll = progress.bar(
            splits.train_users.len() as u64,
            &format!("{name}: enrolling"),
        );
        let tick = enroll.clone();
        let mut fed = Federation::start(&rt, spec, &env, &splits.train_users, &dir, move || {
            tick.inc(1)
        })?;
        enroll.finish_and_clear();
        let bar = progress.bar(settings.rounds, &format!("{name}: rounds"));
        let mut done = 0;
        for n in 1..=settings.rounds {
            if stop.load(Ordering::Relaxed) {
                interrupted = Some("federation");
                break;
            }
            if fed.budget_exhausted() {
                tracing::warn!(
                    federation = name,
                    "the privacy budget is spent: no more rounds"
                );
                break;
            }
            let mut record = match fed.round(&rt) {
                Ok(r) => r,
                Err(e) if e.is::<Interrupted>() => {
                    interrupted = Some("federation");
                    break;
                }
                Err(e) => return Err(e),
            };
            done += u64::from(record.committed);
            if n.is_multiple_of(settings.eval_every) || n == settings.rounds {
                let theta = fed.theta();
                record.monitor_accuracy = Some(
                    evaluation::score_windows(
                        &base,
                        Some(&theta),
                        &lora,
                        &monitor,
                        settings.workers,
                    )?
                    .accuracy,
                );
            }
            bar.set_message(format!(
                "loss {:.3}{}",
                record.train_loss.unwrap_or(f64::NAN),
                record
                    .monitor_accuracy
                    .map(|a| format!(", acc {:.2}%", 100.0 * a))
                    .unwrap_or_default()
            ));
            rounds.push(record);
            report::write_rounds(&rounds, &args.out)?;
            tracing::info!(
                federation = name,
                round = n,
                "round recorded in rounds.jsonl"
            );
            bar.inc(1);
        }
        bar.finish();
        tracing::info!(
            federation = name,
            rounds = done,
            rss_mb = fedpersona_model::runtime::rss_mb(),
            peak_rss_mb = fedpersona_model::runtime::peak_rss_mb(),
            "federation finished"
        );
        rounds_completed = rounds_completed.min(done);
        spent.push((fed.privacy, fed.epsilon_spent()));
        if let Some(expected) = fed.expected_snr() {
            snr.insert(name, report::SnrSummary::of(expected, &rounds, kind));
        }
        thetas.insert(kind, fed.theta());
        fed.shutdown(&rt)?;
        if interrupted.is_some() {
            break;
        }
    }
    if rounds_completed == u64::MAX {
        rounds_completed = 0;
    }

    // Evaluation (skipped when the federation was interrupted).
    let mut global_accuracy = None;
    let mut global_accuracy_nonprivate = None;
    let mut base_accuracy_train_users = None;
    let mut results = BTreeMap::new();
    let mut comparisons = Vec::new();
    let mut adaptive = None;
    let mut few_shot = Vec::new();
    if interrupted.is_none() {
        let g = evaluation::score_windows(
            &base,
            thetas.get(&FederationKind::Fedavg),
            &lora,
            &train_test,
            settings.workers,
        )?;
        let b = evaluation::score_windows(&base, None, &lora, &train_test, settings.workers)?;
        if let Some(theta) = thetas.get(&FederationKind::FedavgNonprivate) {
            let reference = evaluation::score_windows(
                &base,
                Some(theta),
                &lora,
                &train_test,
                settings.workers,
            )?;
            global_accuracy_nonprivate = Some(reference.accuracy);
        }
        tracing::info!(
            peak_rss_mb = fedpersona_model::runtime::peak_rss_mb(),
            "global accuracy scored"
        );
        global_accuracy = Some(g.accuracy);
        base_accuracy_train_users = Some(b.accuracy);

        // Adapts and scores `users` with `fs` over the cores; also says whether all finished.
        let personalize = |users: &[&UserSplit], fs: &FewShot, what: &str| {
            let bar = progress.bar(users.len() as u64, what);
            let scores = evaluation::par_map(
                users,
                settings.workers,
                &stop,
                || bar.inc(1),
                |u| evaluation::personalize(&base, u, &thetas, fs),
            );
            bar.finish();
            let scores: Vec<UserScores> = scores?.into_iter().flatten().collect();
            anyhow::Ok((scores.len() == users.len(), scores))
        };
        let steps = settings.finetune_steps;
        let everyone: Vec<&UserSplit> = splits.heldout_users.iter().collect();
        let (finished, scores) = personalize(&everyone, &settings.few_shot(), "held-out users")?;
        if !finished {
            interrupted = Some("evaluation");
        }
        results = methods::results(&scores, steps);
        adaptive = report::AdaptiveSummary::of(scores.iter().filter_map(|s| s.adaptive));
        comparisons = methods::comparisons(&scores, steps, Some(settings.support_lines));

        // The few-shot curves: every method again at each support size.
        for &k in &settings.few_shot_lines {
            if interrupted.is_some() {
                break;
            }
            let fs = FewShot {
                support_lines: k.unwrap_or(usize::MAX),
                ..settings.few_shot()
            };
            let users: Vec<&UserSplit> = everyone
                .iter()
                .copied()
                .filter(|u| k.is_none_or(|k| u.train.len() >= k))
                .collect();
            let label = k.map_or("all".to_string(), |k| k.to_string());
            let (finished, scores) = personalize(&users, &fs, &format!("few-shot: {label} lines"))?;
            if !finished {
                interrupted = Some("the few-shot curves");
            }
            for (method, r) in methods::results(&scores, steps) {
                few_shot.push(report::FewShotEntry::of(method, k, steps, &r));
            }
            if k != Some(settings.support_lines) {
                comparisons.extend(methods::comparisons(&scores, steps, k));
            }
        }
    }

    let mut privacy = report::PrivacyReport::new(
        &settings.privacy,
        &spent,
        global_accuracy,
        global_accuracy_nonprivate,
    );
    privacy.snr = snr;
    let rep = Report {
        users: report::UserCounts {
            train: splits.train_users.len(),
            heldout: splits.heldout_users.len(),
            dropped: splits.dropped_users,
        },
        rounds_completed,
        privacy,
        global_accuracy,
        base_accuracy_train_users,
        methods: results,
        comparisons,
        few_shot,
        adaptive,
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_mb: fedpersona_model::runtime::peak_rss_mb(),
        complete: interrupted.is_none(),
        interrupted_during: interrupted,
        settings: serde_json::to_value(&settings)?,
        data: data_path.display().to_string(),
        base_model: base_dir.display().to_string(),
    };
    write_plots(&args.out, &rounds, &rep, monitor_base)?;
    report::write(&rep, &args.out)?;
    Ok(rep)
}

fn windows_of(
    base: &BaseModel,
    users: &[UserSplit],
    seq_len: usize,
) -> anyhow::Result<Vec<Window>> {
    let mut out = Vec::new();
    for u in users {
        out.extend(device_agent::adapt::to_windows(base, &u.test, seq_len)?);
    }
    Ok(out)
}

fn write_plots(
    out: &Path,
    rounds: &[RoundRecord],
    rep: &Report,
    monitor_base: f64,
) -> anyhow::Result<()> {
    let mut series = Vec::new();
    for kind in [FederationKind::Fedavg, FederationKind::Meta] {
        let points: Vec<(f64, f64)> = rounds
            .iter()
            .filter(|r| r.federation == kind)
            .filter_map(|r| r.monitor_accuracy.map(|a| (r.round as f64, a)))
            .collect();
        if !points.is_empty() {
            let mut pts = vec![(0.0, monitor_base)];
            pts.extend(points);
            series.push(plot::Series {
                name: format!("{} global adapter", kind.name()),
                points: pts,
            });
        }
    }
    plot::line_chart(
        &out.join("accuracy_vs_round.svg"),
        "Global adapter accuracy on training users' test data (monitoring slice)",
        "round",
        "next-byte accuracy %",
        &series,
    )?;
    let mut series = Vec::new();
    for m in [
        Method::LocalOnly,
        Method::FedavgFinetune,
        Method::MetaFinetune,
    ] {
        if let Some(x) = rep.methods.get(m.name()) {
            series.push(plot::Series {
                name: m.name().to_string(),
                points: x
                    .accuracy_by_steps
                    .iter()
                    .map(|(k, v)| (*k as f64, *v))
                    .collect(),
            });
        }
    }
    plot::line_chart(
        &out.join("accuracy_vs_steps.svg"),
        "Held-out users: accuracy after local fine-tuning steps",
        "local steps",
        "next-byte accuracy %",
        &series,
    )?;
    let series: Vec<plot::Series> = Method::ALL
        .iter()
        .filter_map(|m| {
            let points: Vec<(f64, f64)> = rep
                .few_shot
                .iter()
                .filter(|e| e.method == m.name())
                .filter_map(|e| Some((e.support_lines? as f64, e.next_word_top1)))
                .collect();
            (!points.is_empty()).then(|| plot::Series {
                name: m.name().to_string(),
                points,
            })
        })
        .collect();
    plot::line_chart(
        &out.join("few_shot.svg"),
        "Held-out users: next-word top-1 by support lines (what was served)",
        "support lines",
        "next-word top-1 %",
        &series,
    )
}
