//! The checkpoint of a resumable adaptation: the current adapter (PEFT layout), the best
//! one so far (`best-<step>.safetensors`) and `progress.json` naming it, written so that a
//! crash at any point leaves a consistent checkpoint.

use std::path::{Path, PathBuf};

use anyhow::Context;
use fedpersona_model::LoraAdapter;
use fedpersona_privacy::tensors::AdapterTensors;
use serde::{Deserialize, Serialize};

/// Saved progress of a resumable run. The checkpoint folder holds the current adapter (PEFT
/// layout) and the best one so far (`best-<best_step>.safetensors`), which a resumed run
/// restores with `best_loss`, so it keeps (and publishes) the best adapter of every part.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Progress {
    /// Identifies the data: the number of examples and the newest interaction's id.
    pub data: (usize, i64),
    pub steps: usize,
    pub best_loss: Option<f64>,
    pub best_step: usize,
    /// Evaluations without improvement since the best (patience goes on across a resume).
    #[serde(default)]
    pub stale: usize,
    /// Held-out loss of the adapter the first part started from.
    #[serde(default)]
    pub start_loss: Option<f64>,
}

const PROGRESS_FILE: &str = "progress.json";

/// The best adapter so far of a resumable run, by the step it was scored at.
fn best_file(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("best-{step}.safetensors"))
}

/// Removes the best-adapter files of `dir`, except the one of step `keep`.
fn remove_best_files(dir: &Path, keep: Option<usize>) {
    let keep = keep.map(|s| best_file(dir, s));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("best-")
            && name.ends_with(".safetensors")
            && Some(&path) != keep.as_ref()
        {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Removes the progress of a finished run (the adapter files stay for the caller).
pub(crate) fn clear(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(PROGRESS_FILE));
    remove_best_files(dir, None);
}

pub(crate) fn load_progress(dir: &Path, data: (usize, i64)) -> anyhow::Result<Option<Progress>> {
    let path = dir.join(PROGRESS_FILE);
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(None);
    };
    let p: Progress =
        serde_json::from_slice(&bytes).with_context(|| format!("{} is corrupt", path.display()))?;
    Ok((p.data == data).then_some(p))
}

/// The best adapter of a resumable run, saved when it was scored at `step`.
pub(crate) fn load_best(dir: &Path, step: usize) -> anyhow::Result<AdapterTensors> {
    let path = best_file(dir, step);
    let named = fedpersona_model::checkpoint::load_safetensors(&path)
        .with_context(|| format!("the best adapter of {}", dir.display()))?;
    fedpersona_model::tensors::from_named(named)
        .with_context(|| format!("{} is corrupt", path.display()))
}

/// Saves the current adapter, the best one if it changed since the last save, then the
/// progress that names it: `progress.json` is written last, and best files it does not name
/// are removed only after it, so a crash at any point leaves a consistent checkpoint.
pub(crate) fn save_progress(
    dir: &Path,
    adapter: &LoraAdapter,
    best: Option<&AdapterTensors>,
    progress: &Progress,
) -> anyhow::Result<()> {
    adapter.save(dir)?;
    if let Some(best) = best {
        fedpersona_model::checkpoint::save_safetensors(
            &best_file(dir, progress.best_step),
            &fedpersona_model::tensors::into_named(best.clone()),
        )?;
    }
    fedpersona_model::checkpoint::write_atomic(
        &dir.join(PROGRESS_FILE),
        &serde_json::to_vec(progress).expect("plain struct"),
    )?;
    remove_best_files(dir, Some(progress.best_step));
    crate::fs::restrict(dir)
}
