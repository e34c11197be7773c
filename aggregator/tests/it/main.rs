//! The `aggregator` binary end to end, and the federation service over TLS on loopback.

mod deploy;
mod federation;
mod privacy;

use std::process::Command;

#[test]
fn privacy_commands() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_aggregator"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&[
        "privacy",
        "epsilon",
        "--noise-multiplier",
        "1.0",
        "--sampling-rate",
        "0.01",
        "--rounds",
        "1000",
        "--delta",
        "1e-5",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!((v["epsilon"].as_f64().unwrap() - 2.1014).abs() < 5e-5);
    let out = run(&[
        "privacy",
        "noise",
        "--target-epsilon",
        "2.1014",
        "--sampling-rate",
        "0.01",
        "--rounds",
        "1000",
        "--delta",
        "1e-5",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!((v["noise_multiplier"].as_f64().unwrap() - 1.0).abs() < 1e-3);
    let out = run(&[
        "privacy",
        "epsilon",
        "--noise-multiplier",
        "1",
        "--sampling-rate",
        "2",
        "--rounds",
        "1",
        "--delta",
        "1e-5",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sampling rate"));
}
