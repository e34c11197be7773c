//! The model against HF transformers, LoRA identities and the KV cache.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use fedpersona_model::generate::{generate, Sampling};
use fedpersona_model::model::tensor_shapes;
use fedpersona_model::{BaseModel, KvCache, Llama, LlamaConfig, LoraAdapter, LoraConfig, Target};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Weights by formula, so the Python below builds the identical model.
fn formula_model(cfg: &LlamaConfig) -> Llama {
    let mut names = tensor_shapes(cfg);
    names.sort();
    let mut map = HashMap::new();
    for (k, (name, shape)) in names.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|i| {
                let w = 0.5 * (i as f64 * 0.731 + 1.1 * k as f64).sin();
                (if name.ends_with("norm.weight") {
                    1.0 + 0.2 * w
                } else {
                    w
                }) as f32
            })
            .collect();
        map.insert(name, Tensor::from_vec(data, shape, &Device::Cpu).unwrap());
    }
    Llama::from_tensors(cfg.clone(), map, &Device::Cpu).unwrap()
}

fn tiny_config() -> LlamaConfig {
    LlamaConfig::from_json(
        r#"{"vocab_size":32,"hidden_size":16,"intermediate_size":24,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"head_dim":8,"rope_theta":500.0,
            "rms_norm_eps":1e-5,"max_position_embeddings":64,"tie_word_embeddings":true}"#,
    )
    .unwrap()
}

/// Reference values from transformers 5.23.0 (torch 2.15, CPU, float32):
///
/// ```python
/// import torch
/// from transformers import LlamaConfig, LlamaForCausalLM
/// cfg = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
///            num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=500.0,
///            rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=True)
/// model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
/// with torch.no_grad():
///     for k, (n, p) in enumerate(sorted(model.named_parameters())):
///         i = torch.arange(p.numel(), dtype=torch.float64)
///         w = 0.5 * torch.sin(i * 0.731 + 1.1 * k)
///         if n.endswith("norm.weight"):
///             w = 1.0 + 0.2 * w
///         p.copy_(w.reshape(p.shape).float())
///     logits = model(torch.tensor([[1, 5, 9, 3, 31, 0, 7]])).logits[0]
/// print([round(x, 6) for x in logits[:, :6].flatten().tolist()])
/// print([round(x, 6) for x in logits[-1].tolist()])
/// ```
#[test]
fn logits_match_hf_transformers() {
    let model = formula_model(&tiny_config());
    let ids = Tensor::new(&[[1u32, 5, 9, 3, 31, 0, 7]], &Device::Cpu).unwrap();
    let logits = model.forward(&ids, None, None).unwrap().squeeze(0).unwrap();
    let first6: Vec<f32> = logits
        .narrow(1, 0, 6)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let expected6 = [
        0.902326, 0.903336, 0.262152, -0.565399, -0.991, -0.712086, 0.800078, 1.041647, 0.542696,
        -0.342066, -0.983648, -0.925941, -0.539941, -0.643664, -0.289798, 0.27009, 0.637967,
        0.552305, -1.059536, -1.216905, -0.50916, 0.560554, 1.231762, 1.027294, 0.481123, 1.113217,
        0.95391, 0.116456, -0.803789, -1.152609, 0.660935, 1.088447, 0.742168, -0.131729,
        -0.911978, -1.04389, 1.052957, 1.326712, 0.657289, -0.47941, -1.275289, -1.164549,
    ];
    let last: Vec<f32> = logits.get(6).unwrap().to_vec1().unwrap();
    let expected_last = [
        1.052957, 1.326712, 0.657289, -0.47941, -1.275289, -1.164549, -0.225915, 0.873325,
        1.351706, 0.869141, -0.231308, -1.167318, -1.273465, -0.474289, 0.662066, 1.327749,
        1.049517, 0.02517, -1.017071, -1.336262, -0.705487, 0.426829, 1.255706, 1.191885, 0.280736,
        -0.829991, -1.350667, -0.911135, 0.176135, 1.138188, 1.291088, 0.526136,
    ];
    for (got, want) in first6
        .iter()
        .chain(&last)
        .zip(expected6.iter().chain(&expected_last))
    {
        assert!((got - want).abs() < 2e-5, "got {got}, HF {want}");
    }
}

fn fixture_dir() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hf-tiny-llama"
    ))
}

/// `tests/fixtures/hf-tiny-llama` was written by `save_pretrained` (transformers 5.23.0, its
/// `rope_parameters` form), and its greedy tokens computed by HF:
///
/// ```python
/// torch.manual_seed(7)
/// cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
///                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
///                   rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
///                   initializer_range=0.3)
/// model = LlamaForCausalLM(cfg).eval()
/// model.save_pretrained("hf-tiny-llama")
/// ids = torch.tensor([list(b"Good morrow, ")])
/// print(model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist())
/// ```
pub const HF_GREEDY: [u32; 24] = [
    177, 241, 47, 20, 63, 58, 218, 62, 80, 219, 44, 232, 67, 114, 114, 85, 76, 88, 141, 164, 104,
    51, 198, 107,
];

#[test]
fn save_pretrained_folder_generates_hf_greedy_tokens() {
    let base = BaseModel::load(fixture_dir(), &Device::Cpu).unwrap();
    let prompt: Vec<u32> = b"Good morrow, ".iter().map(|&b| b as u32).collect();
    let out = generate(&base.model, None, &prompt, 24, Sampling::default(), |_| {
        true
    })
    .unwrap();
    assert_eq!(out, HF_GREEDY);
}

#[test]
fn kv_cache_matches_full_forward() {
    let model = formula_model(&tiny_config());
    let ids = Tensor::new(&[[1u32, 5, 9, 3, 31, 0, 7]], &Device::Cpu).unwrap();
    let full = model.forward(&ids, None, None).unwrap();
    let mut cache = KvCache::new();
    let a = model
        .forward(&ids.narrow(1, 0, 4).unwrap(), None, Some(&mut cache))
        .unwrap();
    let b = model
        .forward(&ids.narrow(1, 4, 1).unwrap(), None, Some(&mut cache))
        .unwrap();
    let c = model
        .forward(&ids.narrow(1, 5, 2).unwrap(), None, Some(&mut cache))
        .unwrap();
    let inc = Tensor::cat(&[a, b, c], 1).unwrap();
    assert!(max_abs_diff(&full, &inc) < 1e-5);
    assert_eq!(cache.len(), 7);
}

fn all_targets() -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: Target::ALL.to_vec(),
        freeze_a: false,
        seed: 3,
    }
}

/// Sets every B to a non-zero pattern so the adapter changes the output.
fn perturb(adapter: &mut LoraAdapter) {
    let mut t = adapter.to_tensors().unwrap();
    let mut changed = fedpersona_privacy::AdapterTensors::default();
    for (name, flat) in t.iter() {
        let data = if name.contains("lora_B") {
            (0..flat.data.len())
                .map(|i| 0.05 * ((i as f32) * 0.37).cos())
                .collect()
        } else {
            flat.data.clone()
        };
        changed.insert(name.clone(), flat.shape.clone(), data);
    }
    t = changed;
    adapter.set_tensors(&t).unwrap();
}

#[test]
fn lora_identities_and_peft_layout() {
    let model = formula_model(&tiny_config());
    let ids = Tensor::new(&[[1u32, 5, 9, 3, 31]], &Device::Cpu).unwrap();
    let base = model.forward(&ids, None, None).unwrap();
    let mut adapter = LoraAdapter::new(model.config(), all_targets(), &Device::Cpu).unwrap();
    // B = 0: the adapted model is the base model.
    let zero = model.forward(&ids, Some(&adapter), None).unwrap();
    assert_eq!(max_abs_diff(&base, &zero), 0.0);

    perturb(&mut adapter);
    let adapted = model.forward(&ids, Some(&adapter), None).unwrap();
    assert!(
        max_abs_diff(&base, &adapted) > 1e-3,
        "the adapter must matter"
    );
    // Merged weights give the same outputs as the separate low-rank path.
    let merged = model
        .merged(&adapter)
        .unwrap()
        .forward(&ids, None, None)
        .unwrap();
    assert!(max_abs_diff(&adapted, &merged) < 1e-4);

    // PEFT names and shapes, and a save/load round trip.
    let tensors = adapter.to_tensors().unwrap();
    let a = tensors
        .get("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
        .unwrap();
    assert_eq!(a.shape, vec![4, 16]);
    let b = tensors
        .get("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight")
        .unwrap();
    assert_eq!(b.shape, vec![16, 4]);
    assert_eq!(tensors.len(), 2 * 2 * 7);
    let dir = tempfile::tempdir().unwrap();
    adapter.save(dir.path()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    let loaded = LoraAdapter::load(dir.path(), model.config(), &Device::Cpu).unwrap();
    assert_eq!(loaded.to_tensors().unwrap(), tensors);
    let again = model.forward(&ids, Some(&loaded), None).unwrap();
    assert_eq!(max_abs_diff(&adapted, &again), 0.0);

    // A corrupt or mismatched adapter is refused with a precise message.
    std::fs::write(dir.path().join("adapter_model.safetensors"), b"garbage").unwrap();
    let e = LoraAdapter::load(dir.path(), model.config(), &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("adapter_model.safetensors"), "{e}");
    let other = LlamaConfig::reference();
    adapter.save(dir.path()).unwrap();
    let e = LoraAdapter::load(dir.path(), &other, &Device::Cpu).unwrap_err();
    assert!(
        e.to_string().contains("shape") || e.to_string().contains("unexpected"),
        "{e}"
    );
}

#[test]
fn ffa_lora_trains_only_b_and_shares_a() {
    let cfg = tiny_config();
    let lora = LoraConfig {
        freeze_a: true,
        ..all_targets()
    };
    let one = LoraAdapter::new(&cfg, lora.clone(), &Device::Cpu).unwrap();
    let two = LoraAdapter::new(&cfg, lora, &Device::Cpu).unwrap();
    assert_eq!(one.trainable_vars().len(), 2 * 7, "only B matrices train");
    assert_eq!(
        one.to_tensors().unwrap(),
        two.to_tensors().unwrap(),
        "same seed, same A"
    );
}

#[test]
fn bad_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture_dir().join(f), dir.path().join(f)).unwrap();
    }
    // Missing tensor: a config with one more layer than the weights.
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    cfg["num_hidden_layers"] = 3.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let e = BaseModel::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.layers.2"), "{e}");
    cfg["num_hidden_layers"] = 2.into();
    cfg["hidden_size"] = 32.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let e = BaseModel::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("shape"), "{e}");
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\x08\0\0\0\0\0\0\0{}",
    )
    .unwrap();
    assert!(BaseModel::load(dir.path(), &Device::Cpu).is_err());
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = BaseModel::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no model.safetensors"), "{e}");
}

#[test]
fn out_of_range_tokens_are_an_error() {
    let model = formula_model(&tiny_config());
    let ids = Tensor::new(&[[1u32, 32]], &Device::Cpu).unwrap();
    let e = model.forward(&ids, None, None).unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
}

/// `tests/fixtures/peft-adapter-tiny` was written by `device-agent train` on the HF fixture
/// (rank 4, alpha 8, every projection, 20 steps on macbeth/MACBETH at lr 1e-2, seed 5), then
/// loaded with PEFT 0.21.2 on transformers 5.23.0:
///
/// ```python
/// base = LlamaForCausalLM.from_pretrained("hf-tiny-llama").eval()
/// model = PeftModel.from_pretrained(base, "peft-adapter-tiny").eval()
/// ids = torch.tensor([list(b"Good morrow, ")])
/// print(model.generate(input_ids=ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist())
/// logits = model(input_ids=ids).logits[0, -1]
/// print([round(x, 5) for x in logits[:8].tolist()], [round(x, 5) for x in logits[[32, 116, 101]].tolist()])
/// ```
#[test]
fn adapter_written_by_train_matches_peft() {
    let base = BaseModel::load(fixture_dir(), &Device::Cpu).unwrap();
    let dir = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/peft-adapter-tiny"
    ));
    let adapter = LoraAdapter::load(dir, base.model.config(), &Device::Cpu).unwrap();
    let prompt: Vec<u32> = b"Good morrow, ".iter().map(|&b| b as u32).collect();
    let peft_greedy = [
        32, 32, 32, 32, 32, 32, 32, 32, 32, 116, 32, 116, 32, 32, 32, 116, 32, 116, 32, 32, 32, 32,
        116, 32,
    ];
    let out = generate(
        &base.model,
        Some(&adapter),
        &prompt,
        24,
        Sampling::default(),
        |_| true,
    )
    .unwrap();
    assert_eq!(out, peft_greedy);
    let ids = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = base.model.forward(&ids, Some(&adapter), None).unwrap();
    let last: Vec<f32> = logits
        .get(0)
        .unwrap()
        .get(prompt.len() - 1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let peft = [
        (0, -5.7776),
        (1, -0.7409),
        (2, -1.75065),
        (3, -4.2434),
        (4, -0.27426),
        (5, 0.32302),
        (6, -0.5562),
        (7, -0.79528),
        (32, 6.61513),
        (116, 4.15543),
        (101, 5.00368),
    ];
    for (i, want) in peft {
        assert!(
            (last[i] - want).abs() < 1e-3,
            "logit {i}: {} vs PEFT {want}",
            last[i]
        );
    }
    // The merged model agrees with the adapter applied on the side.
    let merged = base.model.merged(&adapter).unwrap();
    let out = generate(&merged, None, &prompt, 24, Sampling::default(), |_| true).unwrap();
    assert_eq!(out, peft_greedy);
}

#[test]
fn sharded_checkpoints_load() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let all =
        fedpersona_model::checkpoint::load_safetensors(&fixture_dir().join("model.safetensors"))
            .unwrap();
    let (first, second) = all.split_at(all.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        fedpersona_model::checkpoint::save_safetensors(&dir.path().join(file), part).unwrap();
        for (name, _) in part {
            map.insert(name.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let sharded = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
    let prompt: Vec<u32> = b"Good morrow, ".iter().map(|&b| b as u32).collect();
    let out = generate(
        &sharded.model,
        None,
        &prompt,
        24,
        Sampling::default(),
        |_| true,
    )
    .unwrap();
    assert_eq!(out, HF_GREEDY);
}
