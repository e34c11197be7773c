//! Versioned global adapters on disk: `adapters/v000042/` holds θ in the PEFT layout
//! (`adapter_config.json`, `adapter_model.safetensors`) and the server optimizer's state.
//!
//! A version is written into a temporary folder and renamed into place, so a folder named
//! `vNNNNNN` is always complete; it only counts once the journal commits its hash (see
//! `store`). An orphan left by a crash between the rename and the commit is replaced.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use fedpersona_model::checkpoint::{self, CheckpointError};
use fedpersona_model::config::LlamaConfig;
use fedpersona_model::lora::{LoraAdapter, LoraConfig, LoraError};
use fedpersona_privacy::tensors::AdapterTensors;
use serde::{Deserialize, Serialize};

use crate::meta::MetaState;

/// Errors reading or writing adapter versions.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Lora(#[from] LoraError),
    #[error("{path}: {message}")]
    Corrupt { path: String, message: String },
    #[error("{path}: SHA-256 differs from the journal's (file changed or corrupt)")]
    HashMismatch { path: String },
}

/// A version's bytes as devices download them.
#[derive(Debug, Clone)]
pub struct Published {
    pub version: u64,
    /// `adapter_model.safetensors`.
    pub bytes: Arc<Vec<u8>>,
    pub sha256: [u8; 32],
    /// [`state_digest`] of the version's folder: what the journal keeps so that no file of
    /// it (the server optimizer's state included) changes unnoticed.
    pub state_sha256: [u8; 32],
}

/// The files of a version's folder, in the order [`state_digest`] covers them.
const STATE_FILES: [&str; 4] = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "server_optimizer.json",
    "server_optimizer.safetensors",
];

/// SHA-256 over every file of a version's folder: each file's name, length and bytes.
fn state_digest(dir: &Path) -> Result<[u8; 32], VersionError> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for name in STATE_FILES {
        let path = dir.join(name);
        let bytes = std::fs::read(&path)
            .map_err(|e| VersionError::Checkpoint(CheckpointError::io(&path, e)))?;
        ctx.update(name.as_bytes());
        ctx.update(&(bytes.len() as u64).to_le_bytes());
        ctx.update(&bytes);
    }
    Ok(ctx
        .finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes"))
}

#[derive(Debug, Serialize, Deserialize)]
struct ServerStateMeta {
    step: u64,
    has_m: bool,
    has_v: bool,
    /// Adaptive clipping's next clip norm (absent in versions written without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    clip_norm: Option<f64>,
}

/// The `adapters/` folder.
#[derive(Debug, Clone)]
pub struct Versions {
    dir: PathBuf,
    model: LlamaConfig,
    lora: LoraConfig,
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

impl Versions {
    pub fn new(state_dir: &Path, model: LlamaConfig, lora: LoraConfig) -> Self {
        Versions {
            dir: state_dir.join("adapters"),
            model,
            lora,
        }
    }

    pub fn path(&self, version: u64) -> PathBuf {
        self.dir.join(format!("v{version:06}"))
    }

    /// The initial θ: A from the configured seed, B zero.
    pub fn initial(&self) -> Result<MetaState, VersionError> {
        let adapter = LoraAdapter::new(&self.model, self.lora.clone(), &Device::Cpu)?;
        Ok(MetaState::new(adapter.to_tensors()?))
    }

    /// Writes a version and returns what devices will download.
    pub fn save(&self, version: u64, state: &MetaState) -> Result<Published, VersionError> {
        let io = |p: &Path, e| VersionError::Checkpoint(CheckpointError::io(p, e));
        std::fs::create_dir_all(&self.dir).map_err(|e| io(&self.dir, e))?;
        let target = self.path(version);
        let tmp = self.dir.join(format!(".v{version:06}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        }
        let adapter =
            LoraAdapter::from_tensors(&self.model, self.lora.clone(), &state.theta, &Device::Cpu)?;
        adapter.save(&tmp)?;
        let mut opt = Vec::new();
        for (prefix, t) in [("m.", &state.m), ("v.", &state.v)] {
            if let Some(t) = t {
                opt.extend(
                    fedpersona_model::tensors::into_named(t.clone())
                        .into_iter()
                        .map(|(n, t)| (format!("{prefix}{n}"), t)),
                );
            }
        }
        checkpoint::save_safetensors(&tmp.join("server_optimizer.safetensors"), &opt)?;
        let meta = ServerStateMeta {
            step: state.step,
            has_m: state.m.is_some(),
            has_v: state.v.is_some(),
            clip_norm: state.clip_norm,
        };
        checkpoint::write_atomic(
            &tmp.join("server_optimizer.json"),
            &serde_json::to_vec(&meta).expect("plain struct"),
        )?;
        if target.exists() {
            // An orphan from a crash before its commit: never a committed version, since
            // versions only grow.
            std::fs::remove_dir_all(&target).map_err(|e| io(&target, e))?;
        }
        std::fs::rename(&tmp, &target).map_err(|e| io(&target, e))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(&self.dir, e))?;
        let file = target.join("adapter_model.safetensors");
        let bytes = std::fs::read(&file).map_err(|e| io(&file, e))?;
        Ok(Published {
            version,
            sha256: sha256(&bytes),
            state_sha256: state_digest(&target)?,
            bytes: Arc::new(bytes),
        })
    }

    /// Loads a committed version, checking its hashes against the journal's (the folder's
    /// digest where the journal has one).
    pub fn load(
        &self,
        version: u64,
        expected_sha256: &[u8],
        expected_state_sha256: Option<&[u8]>,
    ) -> Result<(MetaState, Published), VersionError> {
        let dir = self.path(version);
        let state_sha256 = state_digest(&dir)?;
        if expected_state_sha256.is_some_and(|want| want != state_sha256.as_slice()) {
            return Err(VersionError::HashMismatch {
                path: dir.display().to_string(),
            });
        }
        let io = |p: &Path, e| VersionError::Checkpoint(CheckpointError::io(p, e));
        let file = dir.join("adapter_model.safetensors");
        let bytes = std::fs::read(&file).map_err(|e| io(&file, e))?;
        let digest = sha256(&bytes);
        if digest.as_slice() != expected_sha256 {
            return Err(VersionError::HashMismatch {
                path: file.display().to_string(),
            });
        }
        let corrupt = |p: &Path, message: String| VersionError::Corrupt {
            path: p.display().to_string(),
            message,
        };
        let theta = fedpersona_model::tensors::from_safetensors(&bytes)
            .map_err(|e| corrupt(&file, e.to_string()))?;
        // Validates names and shapes against the configured adapter.
        LoraAdapter::from_tensors(&self.model, self.lora.clone(), &theta, &Device::Cpu)?;
        let meta_path = dir.join("server_optimizer.json");
        let meta: ServerStateMeta =
            serde_json::from_slice(&std::fs::read(&meta_path).map_err(|e| io(&meta_path, e))?)
                .map_err(|e| corrupt(&meta_path, e.to_string()))?;
        let opt_path = dir.join("server_optimizer.safetensors");
        let opt = fedpersona_model::tensors::from_safetensors(
            &std::fs::read(&opt_path).map_err(|e| io(&opt_path, e))?,
        )
        .map_err(|e| corrupt(&opt_path, e.to_string()))?;
        let part = |prefix: &str, present: bool| -> Option<AdapterTensors> {
            present.then(|| {
                let mut t = AdapterTensors::default();
                for (n, v) in opt.iter() {
                    if let Some(name) = n.strip_prefix(prefix) {
                        t.insert(name.to_string(), v.shape.clone(), v.data.clone());
                    }
                }
                t
            })
        };
        let state = MetaState {
            theta,
            m: part("m.", meta.has_m),
            v: part("v.", meta.has_v),
            step: meta.step,
            clip_norm: meta.clip_norm.filter(|c| c.is_finite() && *c > 0.0),
        };
        Ok((
            state,
            Published {
                version,
                sha256: digest,
                state_sha256,
                bytes: Arc::new(bytes),
            },
        ))
    }

    /// The newest version folder on disk (complete or not yet committed), if any.
    pub fn newest_on_disk(&self) -> std::io::Result<Option<u64>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            other => other?,
        };
        let mut newest = None;
        for e in entries {
            let name = e?.file_name();
            let version = name
                .to_str()
                .and_then(|n| n.strip_prefix('v'))
                .and_then(|n| n.parse::<u64>().ok());
            newest = newest.max(version);
        }
        Ok(newest)
    }

    /// Deletes a version's folder (pruning old versions).
    pub fn remove(&self, version: u64) -> std::io::Result<()> {
        match std::fs::remove_dir_all(self.path(version)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}
