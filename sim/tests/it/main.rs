//! The composition root end to end: the `fedpersona-sim` binary (simulation, pretraining),
//! real agents against a real aggregator over TLS on loopback, and both sides' deployment
//! examples.

mod deploy;
mod federation;
mod pretrain;
mod simulate;

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fedpersona-sim"));
    c.env("RUST_LOG", "warn");
    c
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/model/tests/fixtures/hf-tiny-llama")
}
