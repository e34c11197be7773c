//! Profile-driven adaptation on the tiny fixture model: early stopping keeps the best
//! adapter on the held-out slice, and a run cut short by its time budget resumes from its
//! checkpoint.

use candle_core::Device;
use device_agent::adaptation::{adapt, Budget, Data, Plan};
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
    let none = Budget {
        checkpoint: None,
        deadline: None,
    };
    let out = adapt(&base, &mut a, data(&ex, &[], 7), &plan, 1, none).unwrap();
    assert!(out.finished && out.steps <= 8 && out.steps >= 2);
    let (start, best) = (out.start_loss.unwrap(), out.best_loss.unwrap());
    assert!(
        best <= start,
        "the kept adapter is the best seen: {best} vs {start}"
    );

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
    let cut = Budget {
        checkpoint: Some(dir.path()),
        deadline: Some(std::time::Instant::now()),
    };
    let first = adapt(&base, &mut b, data(&ex, &[], 7), &plan, 1, cut).unwrap();
    assert!(!first.finished);
    assert_eq!(first.steps, 2);
    assert!(dir.path().join("progress.json").exists());
    let mut c = adapter(&base);
    let resume = Budget {
        checkpoint: Some(dir.path()),
        deadline: None,
    };
    let second = adapt(&base, &mut c, data(&ex, &[], 7), &plan, 1, resume).unwrap();
    assert!(second.finished && second.steps > 2 && second.steps <= 8);
    assert!(!dir.path().join("progress.json").exists());
    // Other data does not resume someone else's progress.
    let mut d = adapter(&base);
    let cut_again = Budget {
        checkpoint: Some(dir.path()),
        deadline: Some(std::time::Instant::now()),
    };
    adapt(&base, &mut d, data(&ex, &[], 7), &plan, 1, cut_again).unwrap();
    let mut e = adapter(&base);
    let other = adapt(&base, &mut e, data(&ex[..20], &[], 8), &plan, 1, resume).unwrap();
    assert!(other.finished);
}
