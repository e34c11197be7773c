//! Windows, masking and a short training run.

use candle_core::Device;
use fedpersona_model::data::paragraphs;
use fedpersona_model::train::{
    evaluate, loss, tokenize, windows, Batch, Example, TrainConfig, Trainer, Window,
};
use fedpersona_model::{Llama, LlamaConfig, LoraAdapter, LoraConfig, Tokenizer};

#[test]
fn windows_score_every_target_once_with_context() {
    let tok = Tokenizer::bytes(256).unwrap();
    let ex = tokenize(&tok, None, &Example::new(Some("ab".into()), "cdefghij")).unwrap();
    assert_eq!(ex.target_start, 4); // "ab\n\n"
    for max_len in [4usize, 5, 8, 64] {
        let ws = windows(&ex, max_len);
        let mut covered = Vec::new();
        for w in &ws {
            assert!(w.tokens.len() <= max_len + 1);
            assert!(w.targets.start >= 1 && w.targets.end <= w.tokens.len());
            covered.extend(w.targets.clone().map(|p| w.tokens[p]));
        }
        assert_eq!(covered, ex.tokens[4..].to_vec(), "max_len {max_len}");
    }
}

fn corpus() -> Vec<Example> {
    let text = include_str!("../../../../data/shakespeare/tragedies/macbeth.md");
    let speeches = fedpersona_model::data::parse_play("macbeth", text);
    assert!(speeches.len() > 500);
    speeches
        .into_iter()
        .map(|s| Example::new(s.context, s.text))
        .collect()
}

#[test]
fn short_lora_run_lowers_held_out_loss() {
    let cfg = LlamaConfig::from_json(
        r#"{"vocab_size":256,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":128}"#,
    )
    .unwrap();
    let tensors = Llama::random_tensors(&cfg, 1)
        .into_iter()
        .map(|(n, s, d)| {
            (
                n,
                candle_core::Tensor::from_vec(d, s, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let model = Llama::from_tensors(cfg, tensors, &Device::Cpu).unwrap();
    let tok = Tokenizer::bytes(256).unwrap();
    let all: Vec<Window> = corpus()
        .iter()
        .flat_map(|e| windows(&tokenize(&tok, None, e).unwrap(), 64))
        .collect();
    let (train, held_out) = all.split_at(all.len() - 64);
    let lora = LoraConfig {
        rank: 8,
        alpha: 16.0,
        targets: fedpersona_model::Target::ALL.to_vec(),
        ..LoraConfig::default()
    };
    let adapter = LoraAdapter::new(model.config(), lora, &Device::Cpu).unwrap();
    let before = evaluate(&model, Some(&adapter), &tok, held_out, 32).unwrap();
    let mut trainer = Trainer::new(
        adapter.trainable_vars().to_vec(),
        TrainConfig {
            lr: 1e-2,
            ..TrainConfig::default()
        },
    )
    .unwrap();
    for step in 0..30 {
        let refs: Vec<&Window> = train.iter().skip(step * 16).take(16).collect();
        let batch = Batch::new(&refs, &Device::Cpu).unwrap();
        let l = loss(&model, Some(&adapter), &batch).unwrap();
        let stats = trainer.step(&l).unwrap();
        assert!(stats.loss.is_finite() && stats.grad_norm > 0.0);
    }
    let after = evaluate(&model, Some(&adapter), &tok, held_out, 32).unwrap();
    assert!(
        after.loss < before.loss - 0.1,
        "held-out loss {} -> {}",
        before.loss,
        after.loss
    );
    assert!(after.bits_per_byte > 0.0 && after.accuracy > before.accuracy);
}

#[test]
fn masked_positions_do_not_contribute_and_weights_matter() {
    let cfg = LlamaConfig::from_json(
        r#"{"vocab_size":256,"hidden_size":32,"intermediate_size":64,"num_hidden_layers":1,
            "num_attention_heads":2,"max_position_embeddings":64}"#,
    )
    .unwrap();
    let tensors = Llama::random_tensors(&cfg, 2)
        .into_iter()
        .map(|(n, s, d)| {
            (
                n,
                candle_core::Tensor::from_vec(d, s, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let model = Llama::from_tensors(cfg, tensors, &Device::Cpu).unwrap();
    let tok = Tokenizer::bytes(256).unwrap();
    let ex = paragraphs("thou art\n\nmore lovely");
    let a = windows(&tokenize(&tok, None, &ex[1]).unwrap(), 32);
    let mut other_ctx = ex[1].clone();
    other_ctx.context = Some("and more temperate".into());
    let b = windows(&tokenize(&tok, None, &other_ctx).unwrap(), 32);
    // Changing the context changes the loss (it conditions), but is never scored itself.
    let la = loss(&model, None, &Batch::new(&[&a[0]], &Device::Cpu).unwrap()).unwrap();
    let lb = loss(&model, None, &Batch::new(&[&b[0]], &Device::Cpu).unwrap()).unwrap();
    assert_ne!(
        la.to_scalar::<f32>().unwrap(),
        lb.to_scalar::<f32>().unwrap()
    );
    // Weighting one example to zero gives the other's loss alone.
    let mut zero = b[0].clone();
    zero.weight = 0.0;
    let mixed = loss(
        &model,
        None,
        &Batch::new(&[&a[0], &zero], &Device::Cpu).unwrap(),
    )
    .unwrap();
    assert!((mixed.to_scalar::<f32>().unwrap() - la.to_scalar::<f32>().unwrap()).abs() < 1e-5);
}

proptest::proptest! {
    /// Windows fit the model, and together score each target token exactly once, in order.
    #[test]
    fn windows_cover_targets_exactly_once(
        tokens in proptest::collection::vec(0u32..256, 1..300),
        start_frac in 0.0f64..1.0,
        max_len in 2usize..80,
    ) {
        let target_start = ((tokens.len() as f64) * start_frac) as usize;
        let ex = fedpersona_model::train::TokenizedExample { tokens: tokens.clone(), target_start, weight: 1.0 };
        let ws = windows(&ex, max_len);
        let mut covered = Vec::new();
        for w in &ws {
            proptest::prop_assert!(w.tokens.len() <= max_len + 1);
            proptest::prop_assert!(w.targets.start >= 1 && w.targets.end <= w.tokens.len());
            covered.extend(w.targets.clone().map(|p| w.tokens[p]));
        }
        proptest::prop_assert_eq!(covered, tokens[target_start.max(1).min(tokens.len())..].to_vec());
    }
}
