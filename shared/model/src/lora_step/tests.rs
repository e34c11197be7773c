//! The step against the plain candle forward pass (scoring), its input checks, and the fast
//! `exp`. The fixtures serve `crate::train`'s tests too, which check the step's loss and
//! gradients against the autograd losses and the trainer built on it.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use super::elementwise::exp;
use super::*;
use crate::batch::Window;
use crate::config::LlamaConfig;
use crate::lora::LoraConfig;
use crate::model::Target;
use fedpersona_privacy::AdapterTensors;

/// Grouped-query attention, a head width that differs from hidden / heads, three layers,
/// and sequences longer than one causal block and not a multiple of it.
pub(crate) fn model() -> Llama {
    let cfg = LlamaConfig::from_json(
        r#"{"vocab_size":64,"hidden_size":32,"intermediate_size":48,"num_hidden_layers":3,
            "num_attention_heads":4,"num_key_value_heads":2,"head_dim":12,
            "max_position_embeddings":64,"tie_word_embeddings":true}"#,
    )
    .unwrap();
    let tensors = Llama::random_tensors(&cfg, 7)
        .into_iter()
        .map(|(n, s, d)| (n, Tensor::from_vec(d, s, &Device::Cpu).unwrap()))
        .collect();
    Llama::from_tensors(cfg, tensors, &Device::Cpu).unwrap()
}

/// An adapter with random A and B (B = 0 would hide A's gradient).
pub(crate) fn adapter(model: &Llama, config: LoraConfig) -> LoraAdapter {
    let fresh = LoraAdapter::new(model.config(), config.clone(), &Device::Cpu).unwrap();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
    let mut tensors = AdapterTensors::default();
    for (name, t) in fresh.to_tensors().unwrap().iter() {
        let data = t.data.iter().map(|_| rng.random_range(-0.2..0.2)).collect();
        tensors.insert(name.clone(), t.shape.clone(), data);
    }
    LoraAdapter::from_tensors(model.config(), config, &tensors, &Device::Cpu).unwrap()
}

/// Windows of different lengths (so the batch is padded) and weights.
pub(crate) fn windows(seed: u64) -> Vec<Window> {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    [(46, 1.0), (30, 2.5), (41, 0.5)]
        .into_iter()
        .map(|(len, weight)| Window {
            tokens: (0..len).map(|_| rng.random_range(0..64u32)).collect(),
            targets: 5..len,
            weight,
        })
        .collect()
}

pub(crate) fn assert_close(what: &str, ours: &[f32], plain: &[f32]) {
    let scale = plain.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let diff = ours
        .iter()
        .zip(plain)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= 2e-4 * scale,
        "{what}: max difference {diff} against max magnitude {scale}"
    );
}

/// Scoring (one layer's buffers reused) gives the autograd forward's NLL and argmax, with
/// and without an adapter, and a workspace used for training then scores correctly.
#[test]
fn scoring_matches_the_candle_forward() {
    let model = model();
    let lora = adapter(
        &model,
        LoraConfig {
            targets: Target::ALL.to_vec(),
            ..LoraConfig::default()
        },
    );
    let ws = windows(21);
    let refs: Vec<&Window> = ws.iter().collect();
    let batch = Batch::new(&refs, &Device::Cpu).unwrap();
    let mut workspace = Workspace::default();
    let part = Part {
        batch: &batch,
        objective: Objective::Likelihood,
        scale: 1.0,
    };
    loss_and_gradients(&model, &lora, part, &mut workspace).unwrap();
    for a in [None, Some(&lora)] {
        let ours = score(&model, a, &batch, &mut workspace).unwrap();
        let adapter = a.map(|a| a as &dyn Adapter);
        let logits = model.forward(&batch.inputs, adapter, None).unwrap();
        let (b, t, v) = logits.dims3().unwrap();
        let flat = logits.reshape((b * t, v)).unwrap();
        let nll: Vec<f32> =
            crate::kernels::cross_entropy(&flat, &batch.targets.flatten_all().unwrap())
                .unwrap()
                .to_vec1()
                .unwrap();
        let pred: Vec<u32> = flat.argmax(1).unwrap().to_vec1().unwrap();
        let targets: Vec<u32> = batch.targets.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(ours.len(), b * t);
        for (i, s) in ours.iter().enumerate() {
            assert!(
                (s.nll - nll[i]).abs() < 1e-4,
                "position {i}: {} vs {}",
                s.nll,
                nll[i]
            );
            assert_eq!(s.correct, pred[i] == targets[i], "position {i}");
        }
    }
}

/// Weights that are `Var`s (pretraining) change under the optimizer: scoring must see
/// their current values, not a copy cached at the first call.
#[test]
fn scoring_follows_weights_that_train() {
    let cfg = model().config().clone();
    let mut vars = Vec::new();
    let tensors = Llama::random_tensors(&cfg, 7)
        .into_iter()
        .map(|(n, s, d)| {
            let v = candle_core::Var::from_tensor(&Tensor::from_vec(d, s, &Device::Cpu).unwrap())
                .unwrap();
            let t = v.as_tensor().clone();
            vars.push((n.clone(), v));
            (n, t)
        })
        .collect();
    let model = Llama::from_tensors(cfg, tensors, &Device::Cpu).unwrap();
    let ws = windows(2);
    let refs: Vec<&Window> = ws.iter().collect();
    let batch = Batch::new(&refs, &Device::Cpu).unwrap();
    let mut workspace = Workspace::default();
    let before = score(&model, None, &batch, &mut workspace).unwrap();
    let (_, norm) = vars.iter().find(|(n, _)| n == "model.norm.weight").unwrap();
    norm.set(&(norm.as_tensor() * 3.0).unwrap()).unwrap();
    let after = score(&model, None, &batch, &mut workspace).unwrap();
    let logits = model.forward(&batch.inputs, None, None).unwrap();
    let (b, t, v) = logits.dims3().unwrap();
    let targets = batch.targets.flatten_all().unwrap();
    let nll: Vec<f32> =
        crate::kernels::cross_entropy(&logits.reshape((b * t, v)).unwrap(), &targets)
            .unwrap()
            .to_vec1()
            .unwrap();
    assert!((before[0].nll - after[0].nll).abs() > 1e-3);
    for (s, want) in after.iter().zip(&nll) {
        assert!((s.nll - want).abs() < 1e-4, "{} vs {want}", s.nll);
    }
}

#[test]
fn out_of_vocabulary_tokens_are_refused() {
    let model = model();
    let a = adapter(&model, LoraConfig::default());
    let w = Window {
        tokens: vec![1, 2, 99, 3],
        targets: 1..4,
        weight: 1.0,
    };
    let batch = Batch::new(&[&w], &Device::Cpu).unwrap();
    let part = Part {
        batch: &batch,
        objective: Objective::Likelihood,
        scale: 1.0,
    };
    let err = loss_and_gradients(&model, &a, part, &mut Workspace::default()).unwrap_err();
    assert!(
        matches!(err, ModelError::TokenOutOfRange { id: 99, .. }),
        "{err}"
    );
}

#[test]
fn fast_exp_is_within_a_few_ulp() {
    let mut x = -87.0f32;
    while x < 88.0 {
        let (ours, libm) = (exp(x), x.exp());
        assert!(
            (ours - libm).abs() <= 4.0 * f32::EPSILON * libm,
            "exp({x}) = {ours}, libm {libm}"
        );
        x += 0.0137;
    }
    assert_eq!(exp(-1000.0), (-87f32).exp());
    assert!(exp(1000.0).is_finite());
}
