//! The device agent: the user profiling layer ([`user`]), the neural adaptation layer
//! ([`adapt`]: personal LoRA on the frozen base model), the local API apps reach it by
//! ([`local`]), and federated participation ([`federation`], `device-agent run`). Beside
//! them, the commands that work on a model directly: [`train`], [`evaluate`], [`generate`]
//! and [`bench`]. Arrows point one way: federation → local → adapt → user, all on [`fs`].

pub mod adapt;
pub mod bench;
pub mod dataset;
pub mod evaluate;
pub mod federation;
pub mod fs;
pub mod generate;
pub mod local;
pub mod shutdown;
pub mod train;
pub mod user;

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use fedpersona_model::{checkpoint, BaseModel, LoraAdapter};

/// Flags naming the model: the base folder and an optional adapter.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Base model folder in the HF layout (default: the shipped byte-level model).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// LoRA adapter folder in the PEFT layout.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

impl ModelArgs {
    pub fn load_base(&self) -> anyhow::Result<BaseModel> {
        let dir = self
            .base
            .clone()
            .unwrap_or_else(checkpoint::default_model_dir);
        BaseModel::load(&dir, &Device::Cpu)
            .with_context(|| format!("loading base model {}", dir.display()))
    }

    pub fn load_adapter(&self, base: &BaseModel) -> anyhow::Result<Option<LoraAdapter>> {
        self.adapter
            .as_ref()
            .map(|dir| {
                LoraAdapter::load(dir, base.model.config(), &Device::Cpu)
                    .with_context(|| format!("loading adapter {}", dir.display()))
            })
            .transpose()
    }
}

/// Cores available to this process.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
