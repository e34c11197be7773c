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

/// `--accountant pld`: `dp_accounting`'s PLD value for the same rounds (the reference table of
/// `shared/privacy/tests`), below RDP's; the solved noise inverts it; RDP stays the default.
#[test]
fn privacy_commands_with_the_pld_accountant() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_aggregator"))
            .args(["privacy"])
            .args(args)
            .args([
                "--sampling-rate",
                "0.01",
                "--rounds",
                "1000",
                "--delta",
                "1e-5",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        (
            out.status.code(),
            stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let json = |args: &[&str]| -> serde_json::Value {
        let (code, stdout, stderr) = run(args);
        assert_eq!(code, Some(0), "{stderr}");
        serde_json::from_str(&stdout).unwrap()
    };
    let v = json(&[
        "epsilon",
        "--noise-multiplier",
        "1.0",
        "--accountant",
        "pld",
        "--json",
    ]);
    assert_eq!(v["accountant"], "pld");
    assert_eq!(v["discretization"], 1e-4);
    // dp_accounting 0.6.0, PLDAccountant(): 1.8282436455855091.
    let eps = v["epsilon"].as_f64().unwrap();
    assert!((eps / 1.8282436455855091 - 1.0).abs() < 1e-6, "{eps}");
    let rdp = json(&["epsilon", "--noise-multiplier", "1.0", "--json"]);
    assert_eq!(rdp["accountant"], "rdp");
    assert!(rdp["epsilon"].as_f64().unwrap() > eps);

    let v = json(&[
        "noise",
        "--target-epsilon",
        "1.8282",
        "--accountant",
        "pld",
        "--json",
    ]);
    assert_eq!(v["accountant"], "pld");
    let z = v["noise_multiplier"].as_f64().unwrap();
    assert!((z - 1.0).abs() < 2e-4, "{z}");
    assert!(v["epsilon"].as_f64().unwrap() <= 1.8282);

    let (code, stdout, _) = run(&[
        "epsilon",
        "--noise-multiplier",
        "1.0",
        "--accountant",
        "pld",
    ]);
    assert_eq!(code, Some(0));
    assert!(
        stdout.starts_with("epsilon 1.8282 (delta 0.00001, PLD accountant"),
        "{stdout}"
    );
    let (code, _, stderr) = run(&[
        "epsilon",
        "--noise-multiplier",
        "1.0",
        "--accountant",
        "moments",
    ]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("\"rdp\" or \"pld\""), "{stderr}");
}

/// `privacy plan`: the README's private simulation (N = 194, m = 10, T = 30, ε = 8 at
/// δ = 1e-5, d = 156160): the noise command's z, and z·√d/m of noise on the mean; flags out
/// of range are refused by name.
#[test]
fn privacy_plan_prices_the_noise_on_a_rounds_mean() {
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_aggregator"))
            .args(["privacy", "plan", "--population", "194", "--rounds", "30"])
            .args(["--target-epsilon", "8", "--delta", "1e-5"])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run(&["--cohort", "10", "--dimension", "156160", "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["accountant"], "rdp");
    assert_eq!(v["sampling_rate"], 10.0 / 194.0);
    let z = v["noise_multiplier"].as_f64().unwrap();
    assert!((z - 0.637).abs() < 1e-3, "{z}");
    assert!(v["epsilon"].as_f64().unwrap() <= 8.0);
    // 0.637·√156160/10 = 25.17 C, SNR 0.0397.
    let noise = v["noise_norm_over_clip"].as_f64().unwrap();
    assert!((noise / (z * 156_160f64.sqrt() / 10.0) - 1.0).abs() < 1e-12);
    assert!((v["snr"].as_f64().unwrap() * noise - 1.0).abs() < 1e-12);
    assert!((noise - 25.17).abs() < 0.05, "{noise}");

    let (code, stdout, _) = run(&["--cohort", "97", "--dimension", "2000"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("expected SNR"), "{stdout}");
    assert!(stdout.contains("(d = 2000, m = 97"), "{stdout}");

    for (extra, flag) in [
        (
            &["--cohort", "195", "--dimension", "10"][..],
            "--cohort (195)",
        ),
        (&["--cohort", "0", "--dimension", "10"][..], "--cohort (0)"),
        (
            &["--cohort", "10", "--min-reports", "11", "--dimension", "10"][..],
            "--min-reports (11)",
        ),
        (&["--cohort", "10", "--dimension", "0"][..], "--dimension"),
    ] {
        let (code, _, stderr) = run(extra);
        assert_eq!(code, Some(2), "{extra:?}");
        assert!(stderr.contains(flag), "{extra:?}: {stderr}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_aggregator"))
        .args(["privacy", "plan", "--population", "194", "--rounds", "30"])
        .args(["--target-epsilon", "0", "--delta", "1e-5"])
        .args(["--cohort", "10", "--dimension", "10"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--target-epsilon"));
}
