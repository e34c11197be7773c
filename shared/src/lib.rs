//! fedpersona's shared library: the LLaMA-family model with LoRA, tokenizers, training and
//! evaluation, checkpoints in the HF/PEFT layouts, adapter tensors, and the data formats.
//! It does no network I/O.

pub mod accountant;
pub mod checkpoint;
pub mod codec;
pub mod config;
pub mod corpus;
pub mod data;
pub mod delta;
pub mod generate;
pub mod kernels;
pub mod lora;
pub mod lora_step;
pub mod model;
pub mod noise;
pub mod pretrain;
pub mod privacy;
pub mod runtime;
pub mod secagg;
pub mod tokenizer;
pub mod train;

pub use checkpoint::BaseModel;
pub use config::LlamaConfig;
pub use delta::AdapterTensors;
pub use lora::{LoraAdapter, LoraConfig, Target};
pub use model::{KvCache, Llama};
pub use tokenizer::Tokenizer;
