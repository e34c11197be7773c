//! fedpersona's model crate: the LLaMA-family model with LoRA, tokenizers, training and
//! evaluation, checkpoints in the HF/PEFT layouts, and the data formats. Adapter values
//! leave it as [`fedpersona_privacy::AdapterTensors`] ([`tensors`] converts). It does no
//! network I/O.

pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod generate;
pub mod kernels;
pub mod keyboard;
pub mod lora;
pub mod lora_step;
pub mod model;
pub mod runtime;
pub mod tensors;
pub mod tokenizer;
pub mod train;

pub use checkpoint::BaseModel;
pub use config::LlamaConfig;
pub use error::ModelError;
pub use lora::{LoraAdapter, LoraConfig};
pub use model::{Adapter, KvCache, Llama, Target};
pub use tokenizer::Tokenizer;
