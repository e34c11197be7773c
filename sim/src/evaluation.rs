//! Scoring: few-shot personalization of held-out users (each method adapts from its starting
//! adapter on the user's support lines and is scored on its query lines), the global
//! adapter on the training users' test split, and the per-round monitoring slice. Users are
//! spread over the cores, one single-threaded worker each.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::corpus::UserSplit;
use crate::settings::{FederationKind, FewShot};
use anyhow::Context;
use candle_core::Device;
use fedpersona_model::keyboard::{score_keyboard, KeyboardReport};
use fedpersona_model::train::{evaluate, fit, EvalReport, FitConfig, TrainConfig, Window};
use fedpersona_model::{BaseModel, LoraAdapter, LoraConfig};
use fedpersona_privacy::AdapterTensors;

use device_agent::adapt::gate::window_losses;
use device_agent::adapt::{held_out_len, to_windows, Gate, Served, HOLDOUT_SHARE};

/// The starting adapters of the federated methods: each federation's final adapter.
pub type Starts = BTreeMap<FederationKind, AdapterTensors>;

/// One adaptation of a held-out user, scored at its checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Curve {
    /// Fine-tuning from a fresh adapter.
    LocalOnly,
    /// Fine-tuning from a federation's adapter (its first point is the adapter untouched).
    From(FederationKind),
    /// The device's profile-driven adaptation from the FedAvg adapter: one point, at the
    /// scored budget's key.
    Adaptive,
    /// The same with rejected suggestions pushed down (unlikelihood).
    AdaptiveUnlikelihood,
}

/// A point a method is scored at: a curve's start (its adapter untouched) or the curve after
/// the scored number of fine-tuning steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Point {
    Start(Curve),
    Budget(Curve),
}

/// What the device's never-harm check served at a point, and that model's scores; and what
/// the plain lowest-loss rule would have served, and its score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Checked {
    pub served: Served,
    pub report: EvalReport,
    pub keyboard: KeyboardReport,
    pub lowest_loss: Served,
    pub lowest_loss_report: EvalReport,
}

/// One held-out user's scores: `base`, per adaptation its curve over checkpoints (the adapter
/// as trained, unchecked), and at each scored point what the never-harm check served.
#[derive(Debug, Clone)]
pub struct UserScores {
    pub base: EvalReport,
    pub base_keyboard: KeyboardReport,
    /// (steps, report) in step order.
    pub curves: BTreeMap<Curve, Vec<(usize, EvalReport)>>,
    /// The keyboard metrics of each scored point's adapter as it is (unchecked).
    pub keyboard: BTreeMap<Point, KeyboardReport>,
    pub checked: BTreeMap<Point, Checked>,
    /// The adaptive run (with a FedAvg start).
    pub adaptive: Option<AdaptiveRun>,
}

/// What the profile-driven adaptation of one held-out user did.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct AdaptiveRun {
    pub steps: usize,
    pub stopped_early: bool,
    /// What the never-harm check served (the arm's score is that model's).
    pub served: Served,
    pub lr: f64,
    pub accepted: usize,
    pub edited: usize,
    pub rejected: usize,
}

/// The user's support lines replayed as interactions, one a day up to `now_ms`: the agent
/// (with `start`) suggests a continuation of each line's context, greedy, as long as the
/// line; the line is what the user "wrote"; the feedback is
/// [`simulated_feedback`](crate::feedback::simulated_feedback) of the two.
fn replay(
    base: &BaseModel,
    start: &LoraAdapter,
    support: &[fedpersona_model::train::Example],
    now_ms: i64,
) -> anyhow::Result<Vec<device_agent::user::store::Stored>> {
    use device_agent::user::store::{Interaction, Stored};
    let mut out = Vec::with_capacity(support.len());
    for (i, ex) in support.iter().enumerate() {
        let mut prompt: Vec<u32> = base.bos().into_iter().collect();
        if let Some(c) = &ex.context {
            prompt.extend(base.tokenizer.encode(c)?);
        }
        prompt.extend(base.tokenizer.encode("\n\n")?);
        let want = base.tokenizer.encode(&ex.text)?.len().clamp(1, 96);
        let ids = fedpersona_model::generate::generate(
            &base.model,
            Some(start),
            &prompt,
            want,
            fedpersona_model::generate::Sampling::default(),
            |_| true,
        )?;
        let suggestion = base.tokenizer.decode(&ids).unwrap_or_default();
        let feedback = crate::feedback::simulated_feedback(&suggestion, &ex.text);
        out.push(Stored {
            id: i as i64 + 1,
            interaction: Interaction {
                time_ms: now_ms - (support.len() - i) as i64 * 86_400_000,
                context: ex.context.clone(),
                suggestion: Some(suggestion),
                text: ex.text.clone(),
                feedback,
                app: "simulation".into(),
                kind: "speech".into(),
            },
        });
    }
    Ok(out)
}

/// When the replayed interactions end (ms since the epoch).
const REPLAY_NOW_MS: i64 = 1_750_000_000_000;

/// Profile-driven adaptation from `start` on the replayed support lines, scored on the query:
/// the agent's own adaptation ([`device_agent::adapt::adapt_on_interactions`]) with the
/// settings the local API runs on a device, and its never-harm check against the base model
/// and `start` (the global adapter), so the arm measures what users get: the served model.
fn adaptive(
    base: &BaseModel,
    start: &AdapterTensors,
    support: &[fedpersona_model::train::Example],
    query: &[Window],
    base_scores: (EvalReport, KeyboardReport),
    global_scores: (EvalReport, KeyboardReport),
    fs: &FewShot,
) -> anyhow::Result<(AdaptiveScores, AdaptiveRun)> {
    use device_agent::adapt::{adapt_on_interactions, RunLimits, Settings};
    use device_agent::user::store::Feedback;
    let now_ms = REPLAY_NOW_MS;
    let fresh =
        || LoraAdapter::from_tensors(base.model.config(), fs.lora.clone(), start, &Device::Cpu);
    let global = fresh()?;
    let mut adapter = fresh()?;
    let items = replay(base, &adapter.frozen(), support, now_ms)?;
    // The trained adapter as it is, and what the check served in its place.
    let scores = |gate: Option<Gate>, trained: &LoraAdapter| -> anyhow::Result<_> {
        let gate = gate.unwrap_or_else(Gate::unchecked);
        let trained = (
            evaluate(&base.model, Some(trained), &base.tokenizer, query, 16)?,
            keyboard(base, Some(trained), query, fs)?,
        );
        let pick = |served: Served| match served {
            Served::Base => base_scores,
            Served::Global => global_scores,
            Served::Personal => trained,
        };
        let (report, keyboard) = pick(gate.served);
        let checked = Checked {
            served: gate.served,
            report,
            keyboard,
            lowest_loss: gate.lowest_loss,
            lowest_loss_report: pick(gate.lowest_loss).0,
        };
        Ok((trained, checked))
    };
    let device = Settings::device(
        base,
        device_agent::local::Schedule::default().max_batch_tokens,
    );
    // The device runs without a deadline here: a run cut by its time budget resumes on the
    // same data and keeps its best adapter, so this is what the device ends with.
    let budget = RunLimits {
        checkpoint: None,
        deadline: None,
        cancel: None,
    };
    let run = adapt_on_interactions(
        base,
        &mut adapter,
        Some(&global),
        &items,
        now_ms,
        &device,
        fs.seed,
        budget,
    )?;
    let plain = scores(run.gate, &adapter)?;
    // The same run with the rejected suggestions pushed down (unlikelihood, weight 0.5).
    let mut with_ul = fresh()?;
    let ul = Settings {
        unlikelihood: 0.5,
        ..device
    };
    let run_ul = adapt_on_interactions(
        base,
        &mut with_ul,
        Some(&global),
        &items,
        now_ms,
        &ul,
        fs.seed,
        budget,
    )?;
    let unlikelihood = scores(run_ul.gate, &with_ul)?;
    let count = |f: Feedback| items.iter().filter(|s| s.interaction.feedback == f).count();
    Ok((
        AdaptiveScores {
            plain,
            unlikelihood,
        },
        AdaptiveRun {
            steps: run.outcome.steps,
            stopped_early: run.outcome.stopped_early,
            served: plain.1.served,
            lr: run.plan.lr,
            accepted: count(Feedback::Accepted),
            edited: count(Feedback::Edited),
            rejected: count(Feedback::Rejected),
        },
    ))
}

/// The adaptive arms' scores: each trained adapter as it is, and what the check served.
struct AdaptiveScores {
    plain: ((EvalReport, KeyboardReport), Checked),
    unlikelihood: ((EvalReport, KeyboardReport), Checked),
}

/// The keyboard metrics of the base model with `adapter` on a user's query windows.
fn keyboard(
    base: &BaseModel,
    adapter: Option<&LoraAdapter>,
    query: &[Window],
    fs: &FewShot,
) -> anyhow::Result<KeyboardReport> {
    Ok(score_keyboard(
        &base.model,
        adapter,
        &base.tokenizer,
        query,
        &fs.keyboard,
    )?)
}

/// Adapts one held-out user with each method and scores it on its query lines. Every method
/// ends as a device does, with the never-harm check: the newest support lines
/// ([`held_out_len`]) are held out, the fine-tuned methods train on the others, and the
/// check picks among base, the method's starting adapter and its result on the held-out
/// lines; a method is scored with what the check served.
pub fn personalize(
    base: &BaseModel,
    user: &UserSplit,
    starts: &Starts,
    fs: &FewShot,
) -> anyhow::Result<UserScores> {
    let support: Vec<_> = user.train.iter().take(fs.support_lines).cloned().collect();
    let (fit_lines, held_lines) =
        support.split_at(support.len() - held_out_len(support.len(), HOLDOUT_SHARE));
    let train_w = to_windows(base, fit_lines, fs.train_seq_len)?;
    let held_w = to_windows(base, held_lines, fs.eval_seq_len)?;
    let query_w = to_windows(base, &user.test, fs.eval_seq_len)?;
    anyhow::ensure!(
        !train_w.is_empty() && !query_w.is_empty(),
        "a held-out user has no support or no query text"
    );
    let base_report = evaluate(&base.model, None, &base.tokenizer, &query_w, 16)?;
    let base_keyboard = keyboard(base, None, &query_w, fs)?;
    let base_held = window_losses(base, None, &held_w)?;
    let mut scores = UserScores {
        base: base_report,
        base_keyboard,
        curves: BTreeMap::new(),
        keyboard: BTreeMap::new(),
        checked: BTreeMap::new(),
        adaptive: None,
    };
    if fs.local_only {
        // A fresh adapter (B = 0) is the base model: its keyboard figures are base's.
        let fresh = LoraAdapter::new(base.model.config(), fs.lora.clone(), &Device::Cpu)?;
        let tuned = fine_tune(
            base,
            fresh,
            Some(base_keyboard),
            &train_w,
            &query_w,
            &held_w,
            fs,
        )?;
        scores.add(Curve::LocalOnly, tuned, &base_held, false, fs.steps);
    }
    for (&kind, theta) in starts {
        let adapter =
            LoraAdapter::from_tensors(base.model.config(), fs.lora.clone(), theta, &Device::Cpu)
                .context("starting adapter")?;
        let tuned = fine_tune(base, adapter, None, &train_w, &query_w, &held_w, fs)?;
        scores.add(Curve::From(kind), tuned, &base_held, true, fs.steps);
    }
    if let Some(theta) = starts.get(&FederationKind::Fedavg).filter(|_| fs.adaptive) {
        // The FedAvg adapter as it is: its curve's start, scored above.
        let fedavg = Curve::From(FederationKind::Fedavg);
        let global_scores = (
            scores.curves[&fedavg][0].1,
            scores.keyboard[&Point::Start(fedavg)],
        );
        let (arms, run) = adaptive(
            base,
            theta,
            &support,
            &query_w,
            (base_report, base_keyboard),
            global_scores,
            fs,
        )?;
        for (curve, ((trained, trained_keyboard), checked)) in [
            (Curve::Adaptive, arms.plain),
            (Curve::AdaptiveUnlikelihood, arms.unlikelihood),
        ] {
            scores.curves.insert(curve, vec![(fs.steps, trained)]);
            scores
                .keyboard
                .insert(Point::Budget(curve), trained_keyboard);
            scores.checked.insert(Point::Budget(curve), checked);
        }
        scores.adaptive = Some(run);
    }
    Ok(scores)
}

impl UserScores {
    /// Adds a fine-tuning curve and the never-harm checks at its points: at its start (only
    /// where the start is a federation's adapter, `start_is_candidate`: base against it) and at
    /// `budget` steps (base, that start and the result).
    fn add(
        &mut self,
        curve: Curve,
        tuned: Tuned,
        base_held: &[f64],
        start_is_candidate: bool,
        budget: usize,
    ) {
        let at = |step: usize| {
            tuned
                .curve
                .iter()
                .find(|(k, _)| *k == step)
                .map(|(_, r)| *r)
        };
        let start = at(0).expect("a curve starts at 0 steps");
        let trained = at(budget).expect("the scored budget is a checkpoint");
        let start_held = start_is_candidate.then_some(tuned.held_start.as_slice());
        let report = |served: Served| match served {
            Served::Base => (self.base, self.base_keyboard),
            Served::Global => (start, tuned.keyboard_start),
            Served::Personal => (trained, tuned.keyboard_budget),
        };
        let checked = |gate: Gate| Checked {
            served: gate.served,
            report: report(gate.served).0,
            keyboard: report(gate.served).1,
            lowest_loss: gate.lowest_loss,
            lowest_loss_report: report(gate.lowest_loss).0,
        };
        let at_start = start_held.map(|s| checked(Gate::of_losses(base_held, Some(s), None)));
        let at_budget = checked(Gate::of_losses(
            base_held,
            start_held,
            Some(&tuned.held_budget),
        ));
        if let Some(c) = at_start {
            self.checked.insert(Point::Start(curve), c);
        }
        self.checked.insert(Point::Budget(curve), at_budget);
        self.keyboard
            .insert(Point::Start(curve), tuned.keyboard_start);
        self.keyboard
            .insert(Point::Budget(curve), tuned.keyboard_budget);
        self.curves.insert(curve, tuned.curve);
    }
}

/// A fine-tuning run: its curve on the query lines, and at the start and at the scored
/// budget its keyboard metrics on the query lines and its per-window held-out losses.
struct Tuned {
    curve: Vec<(usize, EvalReport)>,
    keyboard_start: KeyboardReport,
    keyboard_budget: KeyboardReport,
    held_start: Vec<f64>,
    held_budget: Vec<f64>,
}

/// `start_keyboard`: the start's keyboard figures where they are already known.
fn fine_tune(
    base: &BaseModel,
    adapter: LoraAdapter,
    start_keyboard: Option<KeyboardReport>,
    train: &[Window],
    query: &[Window],
    held: &[Window],
    fs: &FewShot,
) -> anyhow::Result<Tuned> {
    let checkpoints = fs.checkpoints();
    let score = |a: &LoraAdapter| evaluate(&base.model, Some(a), &base.tokenizer, query, 16);
    let mut curve = vec![(0, score(&adapter)?)];
    let held_start = window_losses(base, Some(&adapter), held)?;
    let keyboard_start = match start_keyboard {
        Some(k) => k,
        None => keyboard(base, Some(&adapter), query, fs)?,
    };
    let (mut held_budget, mut keyboard_budget) = if fs.steps == 0 {
        (held_start.clone(), keyboard_start)
    } else {
        (Vec::new(), KeyboardReport::default())
    };
    let end = fs.curve_to.max(fs.steps);
    if end > 0 {
        let cfg = FitConfig {
            steps: end,
            batch_size: fs.batch_size,
            optimizer: TrainConfig {
                lr: fs.lr,
                ..TrainConfig::default()
            },
            workers: 1,
            seed: fs.seed,
        };
        let mut failed = None;
        fit(&base.model, &adapter, train, &cfg, |step, _| {
            let done = step + 1;
            if failed.is_some() {
                return;
            }
            let scored = (|| -> anyhow::Result<()> {
                if checkpoints.contains(&done) {
                    curve.push((done, score(&adapter)?));
                }
                if done == fs.steps {
                    held_budget = window_losses(base, Some(&adapter), held)?;
                    keyboard_budget = keyboard(base, Some(&adapter), query, fs)?;
                }
                Ok(())
            })();
            if let Err(e) = scored {
                failed = Some(e);
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
    }
    Ok(Tuned {
        curve,
        keyboard_start,
        keyboard_budget,
        held_start,
        held_budget,
    })
}

/// Runs `f` on every item over `workers` threads, in any order, until done or `stop`; calls
/// `tick` after each item. Results come back in item order (None where skipped).
pub fn par_map<T: Sync, R: Send>(
    items: &[T],
    workers: usize,
    stop: &AtomicBool,
    tick: impl Fn() + Sync,
    f: impl Fn(&T) -> anyhow::Result<R> + Sync,
) -> anyhow::Result<Vec<Option<R>>> {
    let next = AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let failure = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, items.len().max(1)) {
            s.spawn(|| loop {
                if stop.load(Ordering::Relaxed) || failure.lock().expect("lock").is_some() {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { return };
                match f(item) {
                    Ok(r) => *results[i].lock().expect("lock") = Some(r),
                    Err(e) => {
                        *failure.lock().expect("lock") = Some(e);
                        return;
                    }
                }
                tick();
            });
        }
    });
    if let Some(e) = failure.into_inner().expect("lock") {
        return Err(e);
    }
    Ok(results
        .into_iter()
        .map(|m| m.into_inner().expect("lock"))
        .collect())
}

/// Merges reports of disjoint windows (token-weighted; bits per byte through the byte
/// counts each report implies).
pub fn merge(reports: &[EvalReport]) -> EvalReport {
    let tokens: usize = reports.iter().map(|r| r.tokens).sum();
    let n = tokens.max(1) as f64;
    let nll: f64 = reports.iter().map(|r| r.loss * r.tokens as f64).sum();
    let bytes: f64 = reports
        .iter()
        .filter(|r| r.bits_per_byte > 0.0)
        .map(|r| r.loss * r.tokens as f64 / std::f64::consts::LN_2 / r.bits_per_byte)
        .sum();
    EvalReport {
        loss: nll / n,
        bits_per_byte: if bytes > 0.0 {
            nll / std::f64::consts::LN_2 / bytes
        } else {
            0.0
        },
        accuracy: reports
            .iter()
            .map(|r| r.accuracy * r.tokens as f64)
            .sum::<f64>()
            / n,
        tokens,
    }
}

/// Scores an adapter (or the bare base model) on windows, spread over `workers` threads.
pub fn score_windows(
    base: &BaseModel,
    theta: Option<&AdapterTensors>,
    lora: &LoraConfig,
    windows: &[Window],
    workers: usize,
) -> anyhow::Result<EvalReport> {
    let adapter = theta
        .map(|t| LoraAdapter::from_tensors(base.model.config(), lora.clone(), t, &Device::Cpu))
        .transpose()?;
    let per = windows.len().div_ceil(workers.max(1)).max(1);
    let chunks: Vec<&[Window]> = windows.chunks(per).collect();
    let stop = AtomicBool::new(false);
    let parts = par_map(
        &chunks,
        workers,
        &stop,
        || {},
        |c| {
            Ok(evaluate(
                &base.model,
                adapter.as_ref(),
                &base.tokenizer,
                c,
                16,
            )?)
        },
    )?;
    Ok(merge(&parts.into_iter().flatten().collect::<Vec<_>>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The adaptive arm is the device's own adaptation: the same function with the settings
    /// the local API uses, not the simulation's fine-tuning knobs.
    #[test]
    fn the_adaptive_arm_is_the_devices_adaptation() {
        use device_agent::adapt::{adapt_on_interactions, RunLimits, Settings};
        use fedpersona_model::train::Example;
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/model/tests/fixtures/hf-tiny-llama");
        let base = BaseModel::load(&fixture, &Device::Cpu).unwrap();
        let lora = LoraConfig {
            rank: 2,
            alpha: 4.0,
            targets: vec![fedpersona_model::Target::Q, fedpersona_model::Target::V],
            ..LoraConfig::default()
        };
        let start = LoraAdapter::new(base.model.config(), lora.clone(), &Device::Cpu)
            .unwrap()
            .to_tensors()
            .unwrap();
        let support: Vec<Example> = (0..12)
            .map(|i| {
                Example::new(
                    Some(format!("Question {i}?")),
                    format!("The user answers the same way, {i}."),
                )
            })
            .collect();
        let query = to_windows(&base, &support[..3], 64).unwrap();
        // Knobs unlike the device's: the adaptive arm must not take them.
        let fs = FewShot {
            lora: lora.clone(),
            support_lines: 12,
            keyboard: fedpersona_model::keyboard::KeyboardConfig {
                max_chars: 40,
                ..Default::default()
            },
            steps: 1,
            curve_to: 2,
            lr: 0.5,
            batch_size: 2,
            train_seq_len: 32,
            eval_seq_len: 64,
            seed: 3,
            adaptive: true,
            local_only: true,
        };
        let base_scores = (
            evaluate(&base.model, None, &base.tokenizer, &query, 16).unwrap(),
            keyboard(&base, None, &query, &fs).unwrap(),
        );
        let as_started =
            LoraAdapter::from_tensors(base.model.config(), lora.clone(), &start, &Device::Cpu)
                .unwrap();
        let global_scores = (
            evaluate(&base.model, Some(&as_started), &base.tokenizer, &query, 16).unwrap(),
            keyboard(&base, Some(&as_started), &query, &fs).unwrap(),
        );
        let (arms, run) = adaptive(
            &base,
            &start,
            &support,
            &query,
            base_scores,
            global_scores,
            &fs,
        )
        .unwrap();
        let report = arms.plain.1.report;

        // What the local API would run on the same interactions, with the same seed.
        let mut a =
            LoraAdapter::from_tensors(base.model.config(), lora.clone(), &start, &Device::Cpu)
                .unwrap();
        let items = replay(&base, &a.frozen(), &support, REPLAY_NOW_MS).unwrap();
        let device = Settings::device(
            &base,
            device_agent::local::Schedule::default().max_batch_tokens,
        );
        let none = RunLimits {
            checkpoint: None,
            deadline: None,
            cancel: None,
        };
        let global =
            LoraAdapter::from_tensors(base.model.config(), lora, &start, &Device::Cpu).unwrap();
        let want = adapt_on_interactions(
            &base,
            &mut a,
            Some(&global),
            &items,
            REPLAY_NOW_MS,
            &device,
            fs.seed,
            none,
        )
        .unwrap();
        assert_eq!(run.lr, want.plan.lr, "the device's learning rate");
        assert_eq!(run.steps, want.outcome.steps);
        let gate = want.gate.expect("a finished run is checked");
        assert_eq!(run.served, gate.served, "what the device would serve");
        let served = match gate.served {
            Served::Base => None,
            Served::Global => Some(&global),
            Served::Personal => Some(&a),
        };
        assert_eq!(
            report,
            evaluate(&base.model, served, &base.tokenizer, &query, 16).unwrap(),
            "the served model"
        );
        assert_eq!(
            arms.plain.1.keyboard,
            keyboard(&base, served, &query, &fs).unwrap(),
            "the served model's keyboard"
        );
        assert_eq!(
            arms.plain.0,
            (
                evaluate(&base.model, Some(&a), &base.tokenizer, &query, 16).unwrap(),
                keyboard(&base, Some(&a), &query, &fs).unwrap()
            ),
            "the trained adapter, unchecked"
        );
        assert!(arms.plain.0 .1.words > 0, "the keyboard scored words");
    }

    #[test]
    fn each_point_is_scored_with_what_the_check_serves() {
        let r = |accuracy: f64| EvalReport {
            loss: 1.0,
            bits_per_byte: 1.0,
            accuracy,
            tokens: 10,
        };
        let shifted = |by: f64| vec![2.0 + by, 2.2 + by, 1.8 + by, 2.1 + by];
        let base_held = shifted(0.0);
        // Keyboard figures told apart by their word counts: base 1, start 2, trained 3.
        let kb = |words: usize| KeyboardReport {
            words,
            ..KeyboardReport::default()
        };
        let tuned = |start_by: f64, trained_by: f64| Tuned {
            curve: vec![(0, r(0.5)), (1, r(0.55)), (2, r(0.6))],
            keyboard_start: kb(2),
            keyboard_budget: kb(3),
            held_start: shifted(start_by),
            held_budget: shifted(trained_by),
        };
        let fedavg = Curve::From(FederationKind::Fedavg);
        let mut s = UserScores {
            base: r(0.4),
            base_keyboard: kb(1),
            curves: BTreeMap::new(),
            keyboard: BTreeMap::new(),
            checked: BTreeMap::new(),
            adaptive: None,
        };
        let at = |s: &UserScores, p: Point| s.checked[&p];
        // The start beats base and the result on every held-out window: the start is served,
        // at both points, with its query score.
        s.add(fedavg, tuned(-0.1, 0.1), &base_held, true, 2);
        assert_eq!(at(&s, Point::Start(fedavg)).served, Served::Global);
        let b = at(&s, Point::Budget(fedavg));
        assert_eq!((b.served, b.report.accuracy), (Served::Global, 0.5));
        assert_eq!(b.keyboard, kb(2), "the start's keyboard figures");
        assert_eq!(s.curves[&fedavg].len(), 3, "the curve is kept as trained");
        assert_eq!(s.keyboard[&Point::Budget(fedavg)], kb(3), "as trained");
        // Local-only: no start to serve; its result wins.
        s.add(Curve::LocalOnly, tuned(0.0, -0.5), &base_held, false, 2);
        assert!(!s.checked.contains_key(&Point::Start(Curve::LocalOnly)));
        let local = at(&s, Point::Budget(Curve::LocalOnly));
        assert_eq!(
            (local.served, local.report.accuracy, local.keyboard),
            (Served::Personal, 0.6, kb(3))
        );
        // Both worse than base: base, with its score.
        s.add(fedavg, tuned(0.2, 0.3), &base_held, true, 2);
        let b = at(&s, Point::Budget(fedavg));
        assert_eq!((b.served, b.report.accuracy), (Served::Base, 0.4));
        assert_eq!(b.keyboard, kb(1));
        // Lower on average but not on every window: only the lowest-loss rule serves it.
        let mut noisy = tuned(0.0, 0.0);
        noisy.held_budget = vec![1.0, 2.9, 1.0, 2.9];
        s.add(fedavg, noisy, &base_held, true, 2);
        let b = at(&s, Point::Budget(fedavg));
        assert_eq!((b.served, b.lowest_loss), (Served::Base, Served::Personal));
        assert_eq!(
            (b.report.accuracy, b.lowest_loss_report.accuracy),
            (0.4, 0.6)
        );
        // No held-out lines: nothing can be checked, so base.
        let mut none = tuned(0.0, 0.0);
        (none.held_start, none.held_budget) = (Vec::new(), Vec::new());
        s.add(fedavg, none, &[], true, 2);
        assert_eq!(at(&s, Point::Budget(fedavg)).served, Served::Base);
        assert_eq!(at(&s, Point::Start(fedavg)).served, Served::Base);
    }

    #[test]
    fn merge_is_token_weighted() {
        let a = EvalReport {
            loss: 1.0,
            bits_per_byte: 1.0 / std::f64::consts::LN_2,
            accuracy: 0.5,
            tokens: 100,
        };
        let b = EvalReport {
            loss: 2.0,
            bits_per_byte: 2.0 / std::f64::consts::LN_2,
            accuracy: 0.8,
            tokens: 300,
        };
        let m = merge(&[a, b]);
        assert_eq!(m.tokens, 400);
        assert!((m.accuracy - 0.725).abs() < 1e-12);
        assert!((m.loss - 1.75).abs() < 1e-12);
        assert!((m.bits_per_byte - 1.75 / std::f64::consts::LN_2).abs() < 1e-12);
    }

    #[test]
    fn par_map_keeps_order_and_reports_failure() {
        let stop = AtomicBool::new(false);
        let xs: Vec<u32> = (0..20).collect();
        let r = par_map(&xs, 3, &stop, || {}, |x| Ok(x * 2)).unwrap();
        assert_eq!(
            r.iter().map(|v| v.unwrap()).collect::<Vec<_>>(),
            (0..40).step_by(2).collect::<Vec<_>>()
        );
        let e = par_map(
            &xs,
            2,
            &stop,
            || {},
            |x| {
                anyhow::ensure!(*x != 7, "seven");
                Ok(*x)
            },
        );
        assert!(e.unwrap_err().to_string().contains("seven"));
        stop.store(true, Ordering::Relaxed);
        let r = par_map(&xs, 2, &stop, || {}, |x| Ok(*x)).unwrap();
        assert!(r.iter().all(Option::is_none));
    }
}
