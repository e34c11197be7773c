//! The model's frozen weights as flat f32 for the LoRA training step (`crate::lora_step`),
//! built once per model and cached in [`Llama`].

use candle_core::{DType, Tensor};

use super::{Llama, Result, Target};

/// A tensor's values as a flat row-major f32 vector.
pub(crate) fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// A model's frozen weights as row-major f32, projections fused where one product serves
/// several: q, k, v as one `[q + 2·kv, hidden]` matrix, gate and up as one `[2·inter, hidden]`.
/// Built once per model and shared by every training step on it.
pub(crate) struct FlatWeights {
    pub(crate) embed: Vec<f32>,
    /// `None` when tied to the embedding.
    pub(crate) lm_head: Option<Vec<f32>>,
    pub(crate) norm: Vec<f32>,
    pub(crate) layers: Vec<FlatLayer>,
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
}

pub(crate) struct FlatLayer {
    pub(crate) input_norm: Vec<f32>,
    pub(crate) post_norm: Vec<f32>,
    pub(crate) qkv: Vec<f32>,
    pub(crate) o: Vec<f32>,
    pub(crate) gate_up: Vec<f32>,
    pub(crate) down: Vec<f32>,
}

impl std::fmt::Debug for FlatWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FlatWeights({} layers)", self.layers.len())
    }
}

impl FlatWeights {
    pub(crate) fn lm_head(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed)
    }

    pub(crate) fn new(model: &Llama) -> Result<Self> {
        let parts = model.parts();
        let mut layers = Vec::with_capacity(parts.blocks.len());
        for b in parts.blocks {
            let cat = |ts: &[Target]| -> Result<Vec<f32>> {
                let mut v = Vec::new();
                for &t in ts {
                    v.extend(flat(&b.proj[t as usize])?);
                }
                Ok(v)
            };
            layers.push(FlatLayer {
                input_norm: flat(&b.input_norm)?,
                post_norm: flat(&b.post_attention_norm)?,
                qkv: cat(&[Target::Q, Target::K, Target::V])?,
                o: cat(&[Target::O])?,
                gate_up: cat(&[Target::Gate, Target::Up])?,
                down: cat(&[Target::Down])?,
            });
        }
        let tied = parts.lm_head.id() == parts.embed.id();
        Ok(FlatWeights {
            embed: flat(parts.embed)?,
            lm_head: if tied {
                None
            } else {
                Some(flat(parts.lm_head)?)
            },
            norm: flat(parts.norm)?,
            layers,
            cos: parts.rope.cos.to_vec(),
            sin: parts.rope.sin.to_vec(),
        })
    }
}
