//! `fedpersona-sim pretrain` end to end: a loadable HF model folder, and bad settings refused.

use std::path::Path;
use std::process::Command;

use candle_core::Device;
use fedpersona_model::BaseModel;

#[test]
fn pretrain_writes_a_loadable_hf_model_folder() {
    let dir = tempfile::tempdir().unwrap();
    let plays = dir.path().join("plays");
    std::fs::create_dir(&plays).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/shakespeare");
    // One public play to train on, one other play to evaluate on.
    std::fs::copy(
        src.join("comedies/twelfth-night.md"),
        plays.join("twelfth-night.md"),
    )
    .unwrap();
    std::fs::copy(src.join("tragedies/macbeth.md"), plays.join("macbeth.md")).unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        r#"{"vocab_size":256,"hidden_size":32,"intermediate_size":64,"num_hidden_layers":1,
            "num_attention_heads":2,"max_position_embeddings":64}"#,
    )
    .unwrap();
    let out_dir = dir.path().join("model");
    let out = Command::new(env!("CARGO_BIN_EXE_fedpersona-sim"))
        .env("RUST_LOG", "warn")
        .args([
            "pretrain",
            "--steps",
            "30",
            "--seq-len",
            "32",
            "--batch-size",
            "8",
            "--warmup-steps",
            "5",
        ])
        .args(["--eval-every", "0", "--lr", "1e-2", "--data"])
        .arg(&plays)
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("pretrain.json")).unwrap()).unwrap();
    let bpb = record["held_out"]["bits_per_byte"].as_f64().unwrap();
    assert!(
        bpb < 6.0,
        "30 steps should beat a uniform byte model (8 bits): {bpb}"
    );
    let base = BaseModel::load(&out_dir, &Device::Cpu).unwrap();
    assert_eq!(base.model.config().hidden_size, 32);

    // Bad settings are one clear line and exit code 2.
    let out = Command::new(env!("CARGO_BIN_EXE_fedpersona-sim"))
        .args(["pretrain", "--seq-len", "1000", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--seq-len"));
}
