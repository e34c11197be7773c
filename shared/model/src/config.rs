//! The model configuration: an HF-style `config.json` for LLaMA-family decoders.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Errors from reading or validating a model configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// (Causes are in the messages, not the errors' sources: a chain printed with `{:#}`
    /// would say them twice.)
    #[error("cannot read {path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    #[error("{path} is not a valid model config: {cause}")]
    Parse {
        path: String,
        cause: serde_json::Error,
    },
    #[error("invalid model config: {0}")]
    Invalid(String),
}

/// Rotary embedding scaling, as HF writes it in `rope_scaling` / `rope_parameters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default = "default_rope_type", alias = "type")]
    pub rope_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
}

fn default_rope_type() -> String {
    "default".to_string()
}

/// What the file holds: the HF `LlamaConfig` fields we use. Unknown fields are ignored,
/// as transformers does, because real checkpoints carry many unrelated keys.
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<RopeParameters>,
    rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
}

fn default_max_pos() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".to_string()
}

/// A validated LLaMA configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeParameters>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn token_ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl LlamaConfig {
    /// The reference byte-level configuration (vocab 256, hidden 256, 4 layers).
    pub fn reference() -> Self {
        LlamaConfig {
            vocab_size: 256,
            hidden_size: 256,
            intermediate_size: 688,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 4,
            head_dim: 64,
            max_position_embeddings: 1024,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Io {
            path: path.display().to_string(),
            cause,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            ConfigError::Parse { cause, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                cause,
            },
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|cause| ConfigError::Parse {
            path: "config".to_string(),
            cause,
        })?;
        Self::validate(raw)
    }

    fn validate(raw: RawConfig) -> Result<Self, ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if raw.hidden_act != "silu" {
            return bad(format!(
                "hidden_act {:?} is not supported (only \"silu\")",
                raw.hidden_act
            ));
        }
        if raw.attention_bias || raw.mlp_bias {
            return bad("attention_bias / mlp_bias are not supported".into());
        }
        for (name, v) in [
            ("vocab_size", raw.vocab_size),
            ("hidden_size", raw.hidden_size),
            ("intermediate_size", raw.intermediate_size),
            ("num_hidden_layers", raw.num_hidden_layers),
            ("num_attention_heads", raw.num_attention_heads),
            ("max_position_embeddings", raw.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return bad(format!(
                "num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if raw.hidden_size.is_multiple_of(heads) => raw.hidden_size / heads,
            None => {
                return bad(format!(
                    "hidden_size ({}) is not divisible by num_attention_heads ({heads}) and no head_dim is given",
                    raw.hidden_size
                ))
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return bad(format!("head_dim ({head_dim}) must be positive and even"));
        }
        // transformers 5 moves rope_theta (and any scaling) into `rope_parameters`.
        let params = raw.rope_parameters.or(raw.rope_scaling);
        let rope_theta = raw
            .rope_theta
            .or_else(|| params.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(10000.0);
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return bad(format!("rope_theta ({rope_theta}) must be positive"));
        }
        let rope_scaling = match params {
            Some(p) if p.rope_type == "default" => None,
            Some(p) if p.rope_type == "linear" || p.rope_type == "llama3" => {
                if !p.factor.is_some_and(|f| f.is_finite() && f > 0.0) {
                    return bad(format!(
                        "rope type {:?} needs a positive factor",
                        p.rope_type
                    ));
                }
                Some(p)
            }
            Some(p) => return bad(format!("rope type {:?} is not supported", p.rope_type)),
            None => None,
        };
        if !(raw.rms_norm_eps.is_finite() && raw.rms_norm_eps > 0.0) {
            return bad("rms_norm_eps must be positive".into());
        }
        Ok(LlamaConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings,
            bos_token_id: token_ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id),
        })
    }

    /// The `config.json` HF `LlamaForCausalLM` reads (the older top-level `rope_theta` form,
    /// which every transformers version accepts).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": "float32",
        });
        if let Some(s) = &self.rope_scaling {
            v["rope_scaling"] = serde_json::to_value(s).expect("plain struct serializes");
        }
        if let Some(b) = self.bos_token_id {
            v["bos_token_id"] = b.into();
        }
        if !self.eos_token_ids.is_empty() {
            v["eos_token_id"] = if self.eos_token_ids.len() == 1 {
                self.eos_token_ids[0].into()
            } else {
                self.eos_token_ids.clone().into()
            };
        }
        v
    }

    /// Number of parameters of the base model.
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let per_layer = h * q * 2 + h * kv * 2 + 3 * h * self.intermediate_size + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + h + per_layer * self.num_hidden_layers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_old_and_new_rope_forms() {
        let base = r#""vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2"#;
        let old = LlamaConfig::from_json(&format!("{{{base},\"rope_theta\":500.0}}")).unwrap();
        assert_eq!(old.rope_theta, 500.0);
        let new = LlamaConfig::from_json(&format!(
            "{{{base},\"rope_parameters\":{{\"rope_type\":\"default\",\"rope_theta\":700.0}}}}"
        ))
        .unwrap();
        assert_eq!(new.rope_theta, 700.0);
        assert_eq!(new.head_dim, 4);
        assert_eq!(new.num_key_value_heads, 2);
        let explicit = LlamaConfig::from_json(&format!(
            "{{{base},\"head_dim\":6,\"num_key_value_heads\":1}}"
        ))
        .unwrap();
        assert_eq!(explicit.head_dim, 6);
        let round = LlamaConfig::from_json(&explicit.to_json().to_string()).unwrap();
        assert_eq!(round, explicit);
    }

    #[test]
    fn rejects_bad_configs() {
        let e = LlamaConfig::from_json(
            r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
        let e = LlamaConfig::from_json(
            r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"hidden_act":"gelu"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("gelu"), "{e}");
        assert!(LlamaConfig::from_json("{").is_err());
    }
}
