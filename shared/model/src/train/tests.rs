//! The trainer, and the LoRA step's loss and gradients against the autograd losses: every
//! target, FFA-LoRA, data-parallel parts, negatives, and refusals.

use candle_core::Device;

use super::*;
use crate::lora::LoraConfig;
use crate::lora_step::tests::{adapter, assert_close, model, windows};
use crate::lora_step::{loss_and_gradients, Objective, Part, Workspace};
use crate::model::Target;
use crate::train;

/// The loss and every trainable gradient equal the autograd path's (the fused kernels
/// of `kernels`, themselves checked against plain candle ops).
fn matches_autograd(config: LoraConfig) {
    let model = model();
    let adapter = adapter(&model, config);
    let ws = windows(11);
    let refs: Vec<&Window> = ws.iter().collect();
    let batch = Batch::new(&refs, &Device::Cpu).unwrap();
    let total = 1.7;

    let mut workspace = Workspace::default();
    // The second likelihood run reuses the buffers the first left behind.
    for objective in [
        Objective::Likelihood,
        Objective::Likelihood,
        Objective::Unlikelihood,
    ] {
        let part = Part {
            batch: &batch,
            objective,
            scale: 1.0 / total,
        };
        let ours = loss_and_gradients(&model, &adapter, part, &mut workspace).unwrap();
        let plain = match objective {
            Objective::Likelihood => train::loss_part(&model, Some(&adapter), &batch, total),
            Objective::Unlikelihood => {
                train::unlikelihood_part(&model, Some(&adapter), &batch, total)
            }
        }
        .unwrap();
        let plain_loss = f64::from(plain.to_scalar::<f32>().unwrap());
        assert!(
            (ours.loss - plain_loss).abs() <= 1e-5 * plain_loss.abs(),
            "loss {} against {plain_loss}",
            ours.loss
        );
        let grads = plain.backward().unwrap();
        assert_eq!(ours.grads.len(), adapter.trainable_vars().len());
        for (i, (g, var)) in ours.grads.iter().zip(adapter.trainable_vars()).enumerate() {
            let want = grads.get(var).unwrap().flatten_all().unwrap();
            assert_close(&format!("gradient #{i}"), g, &want.to_vec1().unwrap());
        }
    }
}

#[test]
fn every_target_matches_autograd() {
    matches_autograd(LoraConfig {
        rank: 3,
        alpha: 5.0,
        targets: Target::ALL.to_vec(),
        ..LoraConfig::default()
    });
}

#[test]
fn ffa_lora_on_q_and_v_matches_autograd() {
    matches_autograd(LoraConfig {
        rank: 4,
        freeze_a: true,
        ..LoraConfig::default()
    });
}

#[test]
fn a_data_parallel_step_matches_the_autograd_step() {
    let model = model();
    let config = LoraConfig {
        targets: vec![Target::K, Target::O, Target::Down],
        ..LoraConfig::default()
    };
    let ours = adapter(&model, config.clone());
    let plain = adapter(&model, config);
    let ws = windows(5);
    let refs: Vec<&Window> = ws.iter().collect();
    let parts = train::split_batches(&refs, 2, &Device::Cpu).unwrap();
    assert_eq!(parts.len(), 2);
    let opt = TrainConfig {
        lr: 1e-2,
        ..TrainConfig::default()
    };
    let mut t1 = Trainer::new(ours.trainable_vars().to_vec(), opt).unwrap();
    let mut t2 = Trainer::new(plain.trainable_vars().to_vec(), opt).unwrap();
    for _ in 0..3 {
        let a = t1.lora_step(&model, &ours, &parts, None).unwrap();
        let b = t2
            .step_parallel(&parts, |p, total| {
                train::loss_part(&model, Some(&plain), p, total)
            })
            .unwrap();
        assert!(
            (a.loss - b.loss).abs() < 1e-5 * b.loss,
            "{} vs {}",
            a.loss,
            b.loss
        );
        assert!((a.grad_norm - b.grad_norm).abs() < 1e-3 * b.grad_norm);
    }
    for (x, y) in ours.trainable_vars().iter().zip(plain.trainable_vars()) {
        let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_close("updated adapter", &x, &y);
    }
}

#[test]
fn a_step_with_negatives_matches_the_autograd_step() {
    let model = model();
    let ours = adapter(&model, LoraConfig::default());
    let plain = adapter(&model, LoraConfig::default());
    let (pos, neg) = (windows(5), windows(9));
    let pos: Vec<&Window> = pos.iter().collect();
    let neg: Vec<&Window> = neg.iter().collect();
    let parts = train::split_batches(&pos, 2, &Device::Cpu).unwrap();
    let whole = Batch::new(&pos, &Device::Cpu).unwrap();
    let neg = Batch::new(&neg, &Device::Cpu).unwrap();
    let sum = |b: &Batch| f64::from(b.weights.sum_all().unwrap().to_scalar::<f32>().unwrap());
    let opt = TrainConfig::default();
    let mut t1 = Trainer::new(ours.trainable_vars().to_vec(), opt).unwrap();
    let mut t2 = Trainer::new(plain.trainable_vars().to_vec(), opt).unwrap();
    for _ in 0..2 {
        let a = t1
            .lora_step(&model, &ours, &parts, Some((&neg, 0.3)))
            .unwrap();
        let l = train::loss_part(&model, Some(&plain), &whole, sum(&whole)).unwrap();
        let ul = train::unlikelihood_part(&model, Some(&plain), &neg, sum(&neg)).unwrap();
        let b = t2.step(&(l + (ul * 0.3).unwrap()).unwrap()).unwrap();
        assert!(
            (a.loss - b.loss).abs() < 1e-5 * b.loss,
            "{} vs {}",
            a.loss,
            b.loss
        );
        assert!((a.grad_norm - b.grad_norm).abs() < 1e-3 * b.grad_norm);
    }
}

#[test]
fn bad_adapters_and_batches_are_refused_without_panicking() {
    let model = model();
    let lora = adapter(&model, LoraConfig::default());
    let ws = windows(1);
    let refs: Vec<&Window> = ws.iter().collect();
    let batch = Batch::new(&refs, &Device::Cpu).unwrap();
    // A frozen copy has no trainable tensors.
    let mut t = Trainer::new(Vec::new(), TrainConfig::default()).unwrap();
    let err = t
        .lora_step(&model, &lora.frozen(), std::slice::from_ref(&batch), None)
        .unwrap_err();
    assert!(err.to_string().contains("frozen copy"), "{err}");
    // Targets of another shape than the inputs.
    let bad = Batch {
        targets: batch.targets.narrow(1, 0, 3).unwrap(),
        ..batch.clone()
    };
    let part = Part {
        batch: &bad,
        objective: Objective::Likelihood,
        scale: 1.0,
    };
    let err = loss_and_gradients(&model, &lora, part, &mut Workspace::default()).unwrap_err();
    assert!(
        err.to_string().contains("batch targets have shape"),
        "{err}"
    );
    // A target listed twice.
    let twice = LoraConfig {
        targets: vec![Target::Q, Target::V, Target::Q],
        ..LoraConfig::default()
    };
    let err = twice.validate().unwrap_err();
    assert!(err.to_string().contains("q_proj is listed twice"), "{err}");
}

#[test]
fn a_trainer_refuses_another_adapter() {
    let model = model();
    let a = adapter(&model, LoraConfig::default());
    let b = adapter(&model, LoraConfig::default());
    let ws = windows(1);
    let refs: Vec<&Window> = ws.iter().collect();
    let parts = train::split_batches(&refs, 1, &Device::Cpu).unwrap();
    let mut t = Trainer::new(a.trainable_vars().to_vec(), TrainConfig::default()).unwrap();
    let err = t.lora_step(&model, &b, &parts, None).unwrap_err();
    assert!(err.to_string().contains("another adapter"), "{err}");
}
