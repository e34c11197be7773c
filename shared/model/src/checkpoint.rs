//! Files on disk: atomic writes, safetensors I/O, and base-model folders in the HF layout
//! (`config.json` + `model.safetensors`, or shards listed in `model.safetensors.index.json`).

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::config::{ConfigError, LlamaConfig};
use crate::error::ModelError;
use crate::model::Llama;
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Errors from reading or writing checkpoint files.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// (Causes are in the messages, not the errors' sources: a chain printed with `{:#}`
    /// would say them twice.)
    #[error("{path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    #[error("{path} is not a valid safetensors file: {message}")]
    Corrupt { path: String, message: String },
    #[error("{0} holds no model.safetensors (nor a sharded index)")]
    NoWeights(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{path}: {cause}")]
    Model { path: String, cause: ModelError },
}

impl CheckpointError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        CheckpointError::Io {
            path: path.display().to_string(),
            cause: source,
        }
    }
}

/// `p` as is if absolute, else relative to `base` (config files name paths relative to
/// their own folder).
pub fn resolve_path(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Writes `bytes` to `path` so that readers see the old file or the new one, never a mix:
/// a temporary file in the same directory, fsync, rename over the target, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| CheckpointError::io(path, e))
}

/// Serializes named tensors to a safetensors file, atomically.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), CheckpointError> {
    let bytes = safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| CheckpointError::Corrupt {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    write_atomic(path, &bytes)
}

/// Reads every tensor of a safetensors file onto the CPU.
pub fn load_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|e| CheckpointError::io(path, e))?;
    let map = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
        CheckpointError::Corrupt {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    })?;
    let mut v: Vec<_> = map.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// The safetensors files of a model folder.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| CheckpointError::io(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| CheckpointError::Corrupt {
                path: index.display().to_string(),
                message: e.to_string(),
            })?;
        let files: BTreeSet<String> = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| CheckpointError::Corrupt {
                path: index.display().to_string(),
                message: "no weight_map object".into(),
            })?
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        return files
            .into_iter()
            .map(|f| {
                if f.contains('/') || f.contains("..") {
                    Err(CheckpointError::Corrupt {
                        path: index.display().to_string(),
                        message: format!("shard name {f:?} leaves the folder"),
                    })
                } else {
                    Ok(dir.join(f))
                }
            })
            .collect();
    }
    Err(CheckpointError::NoWeights(dir.display().to_string()))
}

/// A base model loaded from a folder: weights, config and tokenizer.
#[derive(Debug)]
pub struct BaseModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
}

impl BaseModel {
    pub fn load(dir: &Path, device: &Device) -> Result<Self, CheckpointError> {
        let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
        let mut tensors = HashMap::new();
        for file in weight_files(dir)? {
            tensors.extend(load_safetensors(&file)?);
        }
        let tokenizer = Tokenizer::for_model_dir(dir, cfg.vocab_size)?;
        let model =
            Llama::from_tensors(cfg, tensors, device).map_err(|cause| CheckpointError::Model {
                path: dir.display().to_string(),
                cause,
            })?;
        Ok(BaseModel { model, tokenizer })
    }

    /// The id that starts every sequence: the config's BOS for HF tokenizers; none for bytes.
    pub fn bos(&self) -> Option<u32> {
        self.model
            .config()
            .bos_token_id
            .filter(|_| !self.tokenizer.is_bytes())
    }
}

/// The shipped base model (`models/shakespeare-base` in the repository), found relative to
/// the source tree or the working directory; `FEDPERSONA_MODEL` overrides.
pub fn default_model_dir() -> PathBuf {
    if let Ok(p) = std::env::var("FEDPERSONA_MODEL") {
        return PathBuf::from(p);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/shakespeare-base");
    if repo.exists() {
        return repo;
    }
    PathBuf::from("models/shakespeare-base")
}

/// Writes a model folder in the HF layout (`config.json` + `model.safetensors`), storing
/// weights as `dtype` (f16 keeps shipped checkpoints small).
pub fn save_model(dir: &Path, model: &Llama, dtype: DType) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|e| CheckpointError::io(dir, e))?;
    let mut cfg = model.config().to_json();
    cfg["torch_dtype"] = match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
    .into();
    let tensors = model
        .named_tensors()
        .into_iter()
        .map(|(n, t)| Ok((n, t.detach().to_dtype(dtype)?)))
        .collect::<Result<Vec<_>, candle_core::Error>>()
        .map_err(|e| CheckpointError::Model {
            path: dir.display().to_string(),
            cause: e.into(),
        })?;
    save_safetensors(&dir.join("model.safetensors"), &tensors)?;
    let json = serde_json::to_vec_pretty(&cfg).expect("json value serializes");
    write_atomic(&dir.join("config.json"), &json)
}
