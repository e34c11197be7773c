//! Fixtures for the phase tests: a coordinator over a fresh journal and the tiny test model,
//! its config built as a typed file (plaintext on loopback), and uploads of the round's shapes.

use std::path::Path;
use std::sync::Arc;

use fedpersona_privacy::codec::{self, Encoding};
use fedpersona_privacy::AdapterTensors;
use rand::SeedableRng;

use super::{Coordinator, UploadHeader};
use crate::auth::DeviceId;
use crate::config::file::{ConfigFile, EnrollmentFile, ModelFile, RoundsFile, ServerFile, TlsFile};
use crate::config::Config;
use crate::error::{FedError, Kind};
use crate::versions::sha256;

/// A started coordinator and the folder its state lives in.
pub(super) struct Fixture {
    pub coordinator: Arc<Coordinator>,
    _dir: tempfile::TempDir,
}

/// A coordinator whose rounds close at `cohort` reports and commit with `min`; `edit` changes
/// the file (a 600 s round, 1 s minimum task time, f32 uploads) before it is loaded.
pub(super) fn start(cohort: u32, min: u32, edit: impl FnOnce(&mut ConfigFile)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/model/tests/fixtures/hf-tiny-llama");
    let mut file = ConfigFile::new(
        ServerFile::new("127.0.0.1:0".parse().unwrap(), "state"),
        TlsFile::plaintext(),
        EnrollmentFile::tokens(vec!["test-enrollment-token-0123456789".into()]),
        ModelFile { dir: model },
        RoundsFile::new(cohort, min, 600.0),
    );
    file.rounds.min_task_time_s = 1.0;
    file.adapter.rank = 2;
    file.adapter.targets = vec!["q_proj".into()];
    file.training.seq_len = 32;
    file.update.encoding = "f32".into();
    edit(&mut file);
    let config = Config::parse(&toml::to_string(&file).unwrap(), dir.path()).unwrap();
    let handle = crate::server::start(config).unwrap();
    Fixture {
        coordinator: handle.coordinator,
        _dir: dir,
    }
}

pub(super) fn device(n: u32) -> DeviceId {
    DeviceId(format!("device-{n}"))
}

/// An update of the round's shapes with every value `v`, encoded as f32.
pub(super) fn update(c: &Coordinator, v: f32) -> Vec<u8> {
    let mut t = AdapterTensors::default();
    for (name, shape) in c.spec().shapes() {
        t.insert(name.clone(), shape.clone(), vec![v; shape.iter().product()]);
    }
    encode(&t)
}

pub(super) fn encode(t: &AdapterTensors) -> Vec<u8> {
    codec::encode(
        t,
        Encoding::F32,
        &mut rand_chacha::ChaCha8Rng::seed_from_u64(0),
    )
}

/// The header that matches `bytes`, with the nonce `[nonce; 16]`.
pub(super) fn header(round: u64, nonce: u8, bytes: &[u8]) -> UploadHeader {
    UploadHeader {
        round,
        nonce: vec![nonce; 16],
        total_bytes: bytes.len() as u64,
        sha256: sha256(bytes).to_vec(),
        num_examples: 1,
    }
}

/// A small valid update of `device` for `round` (header and data); the reports so far.
pub(super) fn report(
    c: &Coordinator,
    device: &DeviceId,
    round: u64,
    nonce: u8,
) -> Result<u32, FedError> {
    let bytes = update(c, 1e-3);
    let ticket = c.begin_upload(device.clone(), header(round, nonce, &bytes))?;
    c.finish_upload(ticket, &bytes)
}

/// The kind and reason of a refusal.
pub(super) fn refusal<T: std::fmt::Debug>(r: Result<T, FedError>) -> (Kind, &'static str) {
    let e = r.expect_err("refused");
    (e.kind, e.reason)
}
