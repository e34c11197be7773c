//! The LLaMA-family decoder: token embedding, RMSNorm, rotary embeddings, grouped-query
//! attention, SwiGLU MLP, optional tied embeddings, a KV cache for generation.
//!
//! Every op on the training path has a backward: the fused kernels of `kernels` are used
//! (candle's own fused `rms_norm`, `softmax_last_dim` and `rope` have none and would silently
//! stop gradients). LoRA adapters are not part of the model: `forward` takes any [`Adapter`]
//! (the LoRA layer, `crate::lora`, sits above the plain model, as PEFT wraps a base model),
//! so many users share one copy of the frozen weights.

mod adapter;
mod flat_weights;
mod rope;
mod target;

pub use crate::error::ModelError;
pub use adapter::Adapter;
pub(crate) use flat_weights::{flat, FlatWeights};
pub use target::Target;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::config::LlamaConfig;
use crate::kernels;
use crate::kernels::RopeTables;

pub type Result<T> = std::result::Result<T, ModelError>;

/// One decoder block's weights. Projections are indexed by [`Target`].
#[derive(Debug, Clone)]
pub(crate) struct Block {
    pub input_norm: Tensor,
    pub post_attention_norm: Tensor,
    pub proj: [Tensor; Target::COUNT],
}

/// Keys and values of past positions, per layer, for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }
    /// Number of positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cache of the first `len` positions (views, no copy).
    pub fn truncated(&self, len: usize) -> Result<KvCache> {
        if len > self.len {
            return Err(ModelError::TooLong {
                needed: len,
                max: self.len,
            });
        }
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some((k, v)) => Ok(Some((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?))),
                None => Ok(None),
            })
            .collect::<Result<_>>()?;
        Ok(KvCache { layers, len })
    }

    /// The cache of a batch made of the given rows of this one's batch, in that order (rows
    /// may repeat: a beam search continues one prefix several ways).
    pub fn select_rows(&self, rows: &[u32]) -> Result<KvCache> {
        let Some(device) = self.layers.iter().flatten().next().map(|(k, _)| k.device()) else {
            return Ok(self.clone());
        };
        let index = Tensor::new(rows, device)?;
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some((k, v)) => Ok(Some((
                    k.contiguous()?.index_select(&index, 0)?,
                    v.contiguous()?.index_select(&index, 0)?,
                ))),
                None => Ok(None),
            })
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            len: self.len,
        })
    }
}

/// A LLaMA decoder. Cloning is cheap: tensors are reference-counted.
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    rope: RopeTables,
    device: Device,
    /// The frozen weights as flat f32 for the LoRA training step, built on first use and
    /// shared by clones; never cached when a weight is a `Var` (pretraining updates them).
    flat: Arc<OnceLock<Arc<FlatWeights>>>,
}

/// A model's weights, borrowed (for [`FlatWeights`]).
pub(crate) struct Parts<'a> {
    pub embed: &'a Tensor,
    pub lm_head: &'a Tensor,
    pub norm: &'a Tensor,
    pub blocks: &'a [Block],
    pub rope: &'a RopeTables,
}

/// HF tensor name of a projection weight.
pub fn proj_name(layer: usize, target: Target) -> String {
    format!("model.layers.{layer}.{}.weight", target.hf_module())
}

/// The HF names and shapes of every base tensor of a config.
pub fn tensor_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for l in 0..cfg.num_hidden_layers {
        out.push((format!("model.layers.{l}.input_layernorm.weight"), vec![h]));
        out.push((
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            vec![h],
        ));
        for t in Target::ALL {
            let (o, i) = t.shape(cfg);
            out.push((proj_name(l, t), vec![o, i]));
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    out
}

/// `x @ w.T` for `x: [.., in]`, `w: [out, in]` (see [`kernels::linear`]).
fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inner = *dims.last().expect("rank >= 1");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = kernels::linear(&x.reshape((rows, inner))?, w)?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = w.dim(0)?;
    Ok(y.reshape(out_dims)?)
}

impl Llama {
    /// Builds the model from tensors with HF names. Tensors are converted to f32. If they
    /// are `Var`s, the model trains them (pretraining); plain tensors are frozen.
    pub fn from_tensors(
        cfg: LlamaConfig,
        mut tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let mut take = |name: &str, shape: Vec<usize>| -> Result<Tensor> {
            let t = tensors
                .remove(name)
                .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
            if t.dims() != shape.as_slice() {
                return Err(ModelError::Shape {
                    name: name.to_string(),
                    actual: t.dims().to_vec(),
                    expected: shape,
                });
            }
            let t = if t.dtype() == DType::F32 {
                t
            } else {
                t.to_dtype(DType::F32)?
            };
            let t = t.to_device(device)?;
            if !t.is_variable() {
                let finite = t
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .all(|v| v.is_finite());
                if !finite {
                    return Err(ModelError::NonFinite(name.to_string()));
                }
            }
            Ok(t)
        };
        let h = cfg.hidden_size;
        let embed = take("model.embed_tokens.weight", vec![cfg.vocab_size, h])?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let input_norm = take(&format!("model.layers.{l}.input_layernorm.weight"), vec![h])?;
            let post_attention_norm = take(
                &format!("model.layers.{l}.post_attention_layernorm.weight"),
                vec![h],
            )?;
            let mut proj = Vec::with_capacity(Target::COUNT);
            for t in Target::ALL {
                let (o, i) = t.shape(&cfg);
                proj.push(take(&proj_name(l, t), vec![o, i])?);
            }
            blocks.push(Block {
                input_norm,
                post_attention_norm,
                proj: proj.try_into().expect("one weight per target"),
            });
        }
        let norm = take("model.norm.weight", vec![h])?;
        let lm_head = if cfg.tie_word_embeddings {
            // HF checkpoints with tied embeddings sometimes still carry the head: ignore it.
            tensors.remove("lm_head.weight");
            embed.clone()
        } else {
            take("lm_head.weight", vec![cfg.vocab_size, h])?
        };
        if let Some(extra) = tensors.keys().find(|k| !k.ends_with("rotary_emb.inv_freq")) {
            tracing::warn!(tensor = %extra, "ignoring unexpected tensor in checkpoint");
        }
        let rope = rope::rope_tables(&cfg);
        Ok(Llama {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            rope,
            device: device.clone(),
            flat: Arc::default(),
        })
    }

    /// Random weights as HF initializes them (normal, std 0.02; norms one), from a seed.
    pub fn random_tensors(cfg: &LlamaConfig, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 0.02).expect("valid std");
        tensor_shapes(cfg)
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let data = if name.ends_with("norm.weight") {
                    vec![1.0; n]
                } else {
                    (0..n).map(|_| normal.sample(&mut rng)).collect()
                };
                (name, shape, data)
            })
            .collect()
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub(crate) fn parts(&self) -> Parts<'_> {
        Parts {
            embed: &self.embed,
            lm_head: &self.lm_head,
            norm: &self.norm,
            blocks: &self.blocks,
            rope: &self.rope,
        }
    }

    /// The weights as flat f32 for `lora_step`: built on the first call and cached, except
    /// while any weight is a `Var` (its values change under the optimizer, so a copy is taken
    /// each time).
    pub(crate) fn flat_weights(&self) -> Result<Arc<FlatWeights>> {
        if let Some(f) = self.flat.get() {
            return Ok(f.clone());
        }
        let f = Arc::new(FlatWeights::new(self)?);
        if self.has_variables() {
            return Ok(f);
        }
        Ok(self.flat.get_or_init(|| f).clone())
    }

    fn has_variables(&self) -> bool {
        let block = |b: &Block| {
            b.input_norm.is_variable()
                || b.post_attention_norm.is_variable()
                || b.proj.iter().any(Tensor::is_variable)
        };
        self.embed.is_variable()
            || self.lm_head.is_variable()
            || self.norm.is_variable()
            || self.blocks.iter().any(block)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every base tensor with its HF name (the head is omitted when tied).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (l, b) in self.blocks.iter().enumerate() {
            out.push((
                format!("model.layers.{l}.input_layernorm.weight"),
                b.input_norm.clone(),
            ));
            out.push((
                format!("model.layers.{l}.post_attention_layernorm.weight"),
                b.post_attention_norm.clone(),
            ));
            for t in Target::ALL {
                out.push((proj_name(l, t), b.proj[t as usize].clone()));
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), self.lm_head.clone()));
        }
        out
    }

    /// A copy with the adapter folded into the base weights: `W + scale · B·A`.
    pub fn merged(&self, adapter: &dyn Adapter) -> Result<Self> {
        adapter.check_fits(&self.cfg)?;
        let mut out = self.clone();
        out.flat = Arc::default();
        for (l, block) in out.blocks.iter_mut().enumerate() {
            for t in Target::ALL {
                if let Some((a, b)) = adapter.factors(l, t) {
                    let delta = (b.matmul(a)? * adapter.scale())?;
                    block.proj[t as usize] = (&block.proj[t as usize] + delta)?.detach();
                }
            }
        }
        Ok(out)
    }

    fn proj(
        &self,
        layer: usize,
        target: Target,
        x: &Tensor,
        adapter: Option<&dyn Adapter>,
    ) -> Result<Tensor> {
        let w = &self.blocks[layer].proj[target as usize];
        match adapter.and_then(|a| a.factors(layer, target).map(|f| (a.scale(), f))) {
            Some((scale, (a, b))) => {
                let dims = x.dims().to_vec();
                let inner = *dims.last().expect("rank >= 1");
                let rows: usize = dims[..dims.len() - 1].iter().product();
                let y = kernels::lora_linear(&x.reshape((rows, inner))?, w, a, b, scale)?;
                let mut out_dims = dims;
                *out_dims.last_mut().expect("rank >= 1") = w.dim(0)?;
                Ok(y.reshape(out_dims)?)
            }
            None => matmul_t(x, w),
        }
    }

    fn mlp(&self, l: usize, h: &Tensor, adapter: Option<&dyn Adapter>) -> Result<Tensor> {
        let adapted = adapter.is_some_and(|a| {
            [Target::Gate, Target::Up, Target::Down]
                .iter()
                .any(|&t| a.factors(l, t).is_some())
        });
        if adapted {
            let gate = self.proj(l, Target::Gate, h, adapter)?;
            let up = self.proj(l, Target::Up, h, adapter)?;
            return self.proj(l, Target::Down, &kernels::swiglu(&gate, &up)?, adapter);
        }
        let p = &self.blocks[l].proj;
        let (b, t, hidden) = h.dims3()?;
        let y = kernels::frozen_mlp(
            &h.reshape((b * t, hidden))?,
            &p[Target::Gate as usize],
            &p[Target::Up as usize],
            &p[Target::Down as usize],
        )?;
        Ok(y.reshape((b, t, hidden))?)
    }

    fn check_tokens(&self, tokens: &Tensor) -> Result<()> {
        let vocab = self.cfg.vocab_size;
        if let Some(&id) = tokens
            .flatten_all()?
            .to_vec1::<u32>()?
            .iter()
            .find(|&&id| id as usize >= vocab)
        {
            return Err(ModelError::TokenOutOfRange { id, vocab });
        }
        Ok(())
    }

    /// Logits `[B, T, vocab]` for token ids `[B, T]` (u32). With a cache, the tokens continue
    /// the cached positions and their keys/values are appended.
    pub fn forward(
        &self,
        tokens: &Tensor,
        adapter: Option<&dyn Adapter>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(tokens, adapter, cache)?;
        matmul_t(&hidden, &self.lm_head)
    }

    /// Final normalized hidden states `[B, T, hidden]`.
    fn hidden_states(
        &self,
        tokens: &Tensor,
        adapter: Option<&dyn Adapter>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        if let Some(a) = adapter {
            a.check_fits(&self.cfg)?;
        }
        self.check_tokens(tokens)?;
        let (b, t) = tokens.dims2()?;
        let start = cache.as_ref().map_or(0, |c| c.len);
        if start + t > self.cfg.max_position_embeddings {
            return Err(ModelError::TooLong {
                needed: start + t,
                max: self.cfg.max_position_embeddings,
            });
        }
        if let Some(c) = cache.as_deref_mut() {
            if c.layers.len() != self.blocks.len() {
                c.layers = vec![None; self.blocks.len()];
            }
        }
        let mut x = self
            .embed
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))?;
        for l in 0..self.blocks.len() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            let h = kernels::rms_norm(&x, &self.blocks[l].input_norm, self.cfg.rms_norm_eps)?;
            let a = self.attention(l, &h, start, adapter, layer_cache)?;
            x = (x + a)?;
            let h = kernels::rms_norm(
                &x,
                &self.blocks[l].post_attention_norm,
                self.cfg.rms_norm_eps,
            )?;
            x = (x + self.mlp(l, &h, adapter)?)?;
        }
        if let Some(c) = cache {
            c.len = start + t;
        }
        Ok(kernels::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?)
    }

    fn attention(
        &self,
        l: usize,
        x: &Tensor,
        start: usize,
        adapter: Option<&dyn Adapter>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let b = x.dim(0)?;
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        let rope = Some((&self.rope, start));
        let q = kernels::split_heads(&self.proj(l, Target::Q, x, adapter)?, nh, rope)?;
        let mut k = kernels::split_heads(&self.proj(l, Target::K, x, adapter)?, nkv, rope)?;
        let v = kernels::split_heads(&self.proj(l, Target::V, x, adapter)?, nkv, None)?;
        let mut v = v;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let rep = nh / nkv;
        let (k, v) = if rep == 1 {
            (k, v)
        } else {
            let s = k.dim(2)?;
            let expand = |y: Tensor| -> Result<Tensor> {
                Ok(y.unsqueeze(2)?
                    .expand((b, nkv, rep, s, hd))?
                    .reshape((b, nh, s, hd))?)
            };
            (expand(k)?, expand(v)?)
        };
        let out = kernels::merge_heads(&kernels::attention(
            &q,
            &k,
            &v,
            1.0 / (hd as f64).sqrt(),
            start,
        )?)?;
        self.proj(l, Target::O, &out, adapter)
    }
}
