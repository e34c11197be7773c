//! Profile-driven adaptation on the tiny fixture model: early stopping keeps the best
//! adapter on the held-out slice, and a run cut short by its time budget resumes from its
//! checkpoint.

use candle_core::Device;
use device_agent::adapt::{adapt, Data, Plan, RunLimits};
use fedpersona_model::train::Example;
use fedpersona_model::{BaseModel, LoraAdapter, LoraConfig, Target};

use crate::fixture;

fn examples() -> Vec<Example> {
    (0..30)
        .map(|i| {
            Example::new(
                Some(format!("Question {i}?")),
                format!(
                    "The user answers {} the same way, {i}.",
                    ["so", "thus"][i % 2]
                ),
            )
        })
        .collect()
}

fn data<'a>(examples: &'a [Example], negatives: &'a [Example], id: i64) -> Data<'a> {
    Data {
        examples,
        negatives,
        id,
    }
}

fn adapter(base: &BaseModel) -> LoraAdapter {
    let cfg = LoraConfig {
        rank: 2,
        alpha: 4.0,
        targets: vec![Target::Q, Target::V],
        ..LoraConfig::default()
    };
    LoraAdapter::new(base.model.config(), cfg, &Device::Cpu).unwrap()
}

#[test]
fn early_stopping_keeps_the_best_and_a_cut_run_resumes() {
    let base = BaseModel::load(&fixture(), &Device::Cpu).unwrap();
    let plan = Plan {
        max_steps: 8,
        lr: 0.02,
        batch_size: 4,
        seq_len: 32,
        eval_every: 2,
        patience: 2,
        holdout: 0.1,
        unlikelihood: 0.0,
    };
    let ex = examples();
    let mut a = adapter(&base);
    let none = RunLimits {
        checkpoint: None,
        deadline: None,
        cancel: None,
    };
    let out = adapt(&base, &mut a, data(&ex, &[], 7), &plan, 1, none).unwrap();
    assert!(out.finished && out.steps <= 8 && out.steps >= 2);
    let (start, best) = (out.start_loss.unwrap(), out.best_loss.unwrap());
    assert_eq!(
        start,
        held_out_loss(&base, &adapter(&base), &ex, &plan),
        "start_loss scores the adapter the run started from"
    );
    assert!(
        best < start - 0.1,
        "training improved the held-out loss: {best} vs {start}"
    );
    assert_eq!(
        held_out_loss(&base, &a, &ex, &plan),
        best,
        "the adapter ends as the best one seen"
    );
    assert!(out.best_step >= plan.eval_every && out.best_step <= out.steps);
    assert_eq!(out.best_step % plan.eval_every, 0, "{out:?}");
    if out.stopped_early {
        assert_eq!(out.steps, out.best_step + plan.patience * plan.eval_every);
    } else {
        assert_eq!(out.steps, plan.max_steps);
    }

    // When training only makes things worse, the run stops after `patience` evaluations
    // without improvement and the adapter ends as the one it started from.
    let start_tensors = fitted(&base, &ex[..27]).to_tensors().unwrap();
    let mut w = adapter(&base);
    w.set_tensors(&start_tensors).unwrap();
    let worse = Plan { lr: 2.0, ..plan };
    let out = adapt(&base, &mut w, data(&ex, &[], 7), &worse, 1, none).unwrap();
    assert!(out.finished && out.stopped_early, "{out:?}");
    assert_eq!(out.steps, worse.patience * worse.eval_every, "{out:?}");
    assert_eq!(
        (out.best_step, out.best_loss),
        (0, out.start_loss),
        "{out:?}"
    );
    assert_eq!(w.to_tensors().unwrap(), start_tensors);

    // With rejected suggestions pushed down by an unlikelihood term, their loss rises.
    let negatives: Vec<Example> = (0..6)
        .map(|i| Example::new(Some(format!("Question {i}?")), "Nonsense qqq zzz xxx."))
        .collect();
    let neg_windows = device_agent::adapt::to_windows(&base, &negatives, 32).unwrap();
    let neg_loss = |a: &LoraAdapter| {
        fedpersona_model::train::evaluate(&base.model, Some(a), &base.tokenizer, &neg_windows, 8)
            .unwrap()
            .loss
    };
    let mut u = adapter(&base);
    let before = neg_loss(&u);
    let ul = Plan {
        unlikelihood: 1.0,
        holdout: 0.0,
        ..plan
    };
    adapt(&base, &mut u, data(&ex, &negatives, 7), &ul, 1, none).unwrap();
    assert!(
        neg_loss(&u) > before,
        "the rejected text became less likely"
    );

    // A run whose budget is already spent stops at its first evaluation with its progress
    // saved; the next run on the same data resumes from there.
    let dir = tempfile::tempdir().unwrap();
    let mut b = adapter(&base);
    let cut = RunLimits {
        checkpoint: Some(dir.path()),
        deadline: Some(std::time::Instant::now()),
        cancel: None,
    };
    let first = adapt(&base, &mut b, data(&ex, &[], 7), &plan, 1, cut).unwrap();
    assert!(!first.finished);
    assert_eq!(first.steps, 2);
    assert!(dir.path().join("progress.json").exists());
    let mut c = adapter(&base);
    let resume = RunLimits {
        checkpoint: Some(dir.path()),
        deadline: None,
        cancel: None,
    };
    let second = adapt(&base, &mut c, data(&ex, &[], 7), &plan, 1, resume).unwrap();
    assert!(second.finished && second.steps > 2 && second.steps <= 8);
    assert!(!dir.path().join("progress.json").exists());
    // Other data does not resume someone else's progress.
    let mut d = adapter(&base);
    let cut_again = RunLimits {
        checkpoint: Some(dir.path()),
        deadline: Some(std::time::Instant::now()),
        cancel: None,
    };
    adapt(&base, &mut d, data(&ex, &[], 7), &plan, 1, cut_again).unwrap();
    let mut e = adapter(&base);
    let other = adapt(&base, &mut e, data(&ex[..20], &[], 8), &plan, 1, resume).unwrap();
    assert!(other.finished);
    // It ran exactly as without a checkpoint: from its own start, with its own seed.
    let mut f = adapter(&base);
    let alone = adapt(&base, &mut f, data(&ex[..20], &[], 8), &plan, 1, none).unwrap();
    assert_eq!(other, alone);
    assert_eq!(e.to_tensors().unwrap(), f.to_tensors().unwrap());
    assert_eq!(
        other.start_loss,
        Some(held_out_loss(&base, &adapter(&base), &ex[..20], &plan))
    );
}

/// The held-out loss `adapt` scores with `plan` on `examples`: its held-out slice is the
/// most recent `max(ceil(n * holdout), 2)` examples (with at least 10 examples).
fn held_out_loss(base: &BaseModel, a: &LoraAdapter, examples: &[Example], plan: &Plan) -> f64 {
    let held = ((examples.len() as f64 * plan.holdout).ceil() as usize).max(2);
    let val = &examples[examples.len() - held..];
    let w = device_agent::adapt::to_windows(base, val, plan.seq_len).unwrap();
    fedpersona_model::train::evaluate(&base.model, Some(a), &base.tokenizer, &w, 16)
        .unwrap()
        .loss
}

/// An adapter already fitted to `examples` (8 steps at a moderate learning rate): a start
/// that a destructive learning rate can only make worse.
fn fitted(base: &BaseModel, examples: &[Example]) -> LoraAdapter {
    let a = adapter(base);
    let w = device_agent::adapt::to_windows(base, examples, 32).unwrap();
    let cfg = fedpersona_model::train::FitConfig {
        steps: 8,
        batch_size: 4,
        optimizer: fedpersona_model::train::TrainConfig {
            lr: 0.2,
            ..Default::default()
        },
        workers: 1,
        seed: 0,
    };
    fedpersona_model::train::fit(&base.model, &a, &w, &cfg, |_, _| {}).unwrap();
    a
}

/// A run cut by its time budget after its best adapter, then resumed: the resumed run keeps
/// that best (it is what gets published), and its patience goes on from where the cut run
/// left it.
#[test]
fn a_resumed_run_keeps_the_best_adapter_of_the_cut_run() {
    let base = BaseModel::load(&fixture(), &Device::Cpu).unwrap();
    // From a fitted start, a learning rate this large makes every step worse on the held-out
    // slice (by more than half a nat on this fixture): the best adapter is the start (step 0).
    let plan = Plan {
        max_steps: 8,
        lr: 2.0,
        batch_size: 4,
        seq_len: 32,
        eval_every: 2,
        patience: 2,
        holdout: 0.1,
        unlikelihood: 0.0,
    };
    let ex = examples();
    let start = fitted(&base, &ex[..27]).to_tensors().unwrap();
    let from_start = || {
        let mut a = adapter(&base);
        a.set_tensors(&start).unwrap();
        a
    };
    let start_loss = held_out_loss(&base, &from_start(), &ex, &plan);
    let dir = tempfile::tempdir().unwrap();

    let mut b = from_start();
    let cut = RunLimits {
        checkpoint: Some(dir.path()),
        deadline: Some(std::time::Instant::now()),
        cancel: None,
    };
    let first = adapt(&base, &mut b, data(&ex, &[], 7), &plan, 1, cut).unwrap();
    assert!(!first.finished);
    assert_eq!(first.steps, 2);
    assert_eq!(
        first.best_step, 0,
        "step 2 is worse than the start: {first:?}"
    );
    assert_eq!(first.best_loss, Some(start_loss));

    // The resumed run starts from whatever adapter the caller has (here: the cut run's
    // current one, as the local API would not have published anything).
    let resume = RunLimits {
        checkpoint: Some(dir.path()),
        deadline: None,
        cancel: None,
    };
    let second = adapt(&base, &mut b, data(&ex, &[], 7), &plan, 1, resume).unwrap();
    assert!(second.finished);
    // The best of both runs is still the start, and it is what the adapter ends as.
    assert_eq!(second.best_step, 0, "{second:?}");
    assert_eq!(second.best_loss, Some(start_loss), "{second:?}");
    assert_eq!(
        second.start_loss,
        Some(start_loss),
        "the start is the cut run's start"
    );
    assert_eq!(b.to_tensors().unwrap(), start);
    assert_eq!(held_out_loss(&base, &b, &ex, &plan), start_loss);
    // Patience carried over: one stale evaluation before the cut (step 2), the second one
    // (step 4) stops the run.
    assert!(second.stopped_early, "{second:?}");
    assert_eq!(second.steps, 4, "{second:?}");
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !left
            .iter()
            .any(|n| n == "progress.json" || n.starts_with("best-")),
        "a finished run leaves no progress: {left:?}"
    );
}
