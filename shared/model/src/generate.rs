//! Decoding with the KV cache: greedy (temperature 0) and top-p sampling.

use candle_core::Tensor;
use rand::{Rng, SeedableRng};

use crate::lora::LoraAdapter;
use crate::model::{Adapter, KvCache, Llama, ModelError};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Picks a token from logits.
#[derive(Debug)]
pub struct Sampler {
    sampling: Sampling,
    rng: rand_chacha::ChaCha20Rng,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Self {
        Sampler {
            sampling,
            rng: rand_chacha::ChaCha20Rng::seed_from_u64(sampling.seed),
        }
    }

    pub fn pick(&mut self, logits: &[f32]) -> u32 {
        let greedy = || {
            logits
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 {
                        (i, v)
                    } else {
                        best
                    }
                })
                .0 as u32
        };
        if self.sampling.temperature <= 0.0 {
            return greedy();
        }
        let t = self.sampling.temperature as f32;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(usize, f32)> = logits
            .iter()
            .map(|&l| ((l - max) / t).exp())
            .enumerate()
            .collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut kept = 0;
        let mut cum = 0.0;
        for p in &probs {
            kept += 1;
            cum += p.1;
            if cum >= self.sampling.top_p as f32 {
                break;
            }
        }
        probs.truncate(kept);
        let mut r = self.rng.random::<f32>() * cum;
        for (i, p) in &probs {
            r -= p;
            if r <= 0.0 {
                return *i as u32;
            }
        }
        probs.last().map_or_else(greedy, |p| p.0 as u32)
    }
}

/// Generates up to `max_tokens` after `prompt`. `on_token` sees each new token and returns
/// `false` to stop. Stops early at the model's position limit. Returns the new tokens.
pub fn generate(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    prompt: &[u32],
    max_tokens: usize,
    sampling: Sampling,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>, ModelError> {
    // No autograd graph: the KV cache would otherwise keep every step's graph alive.
    let frozen = adapter.map(LoraAdapter::frozen);
    let adapter = frozen.as_ref().map(|a| a as &dyn Adapter);
    let max_pos = model.config().max_position_embeddings;
    // Keep the end of an over-long prompt, leaving room for at least one new token.
    let prompt = &prompt[prompt.len().saturating_sub(max_pos.saturating_sub(1))..];
    let mut sampler = Sampler::new(sampling);
    let mut cache = KvCache::new();
    let mut out = Vec::new();
    if max_tokens == 0 {
        return Ok(out);
    }
    let mut input = if prompt.is_empty() {
        return Err(ModelError::Candle(candle_core::Error::Msg(
            "empty prompt".into(),
        )));
    } else {
        Tensor::new(prompt, model.device())?.unsqueeze(0)?
    };
    while out.len() < max_tokens && cache.len() + input.dim(1)? <= max_pos {
        let logits = model.forward(&input, adapter, Some(&mut cache))?;
        let last = logits.squeeze(0)?.get(logits.dim(1)? - 1)?;
        let next = sampler.pick(&last.to_vec1::<f32>()?);
        out.push(next);
        if !on_token(next) {
            break;
        }
        input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_top_p() {
        let logits = [0.1f32, 2.0, 1.9, -1.0];
        assert_eq!(Sampler::new(Sampling::default()).pick(&logits), 1);
        // A tiny nucleus keeps only the most likely token.
        let mut s = Sampler::new(Sampling {
            temperature: 1.0,
            top_p: 0.01,
            seed: 3,
        });
        assert!((0..50).all(|_| s.pick(&logits) == 1));
        // The full distribution samples the two likely tokens, reproducibly by seed.
        let draw = |seed| {
            let mut s = Sampler::new(Sampling {
                temperature: 1.0,
                top_p: 1.0,
                seed,
            });
            (0..200).map(|_| s.pick(&logits)).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert!(a.contains(&1) && a.contains(&2));
        // top_p 0.9 excludes the unlikely tail (token 3 has probability ~2%).
        let mut s = Sampler::new(Sampling {
            temperature: 1.0,
            top_p: 0.9,
            seed: 1,
        });
        assert!((0..300).all(|_| s.pick(&logits) != 3));
    }
}
