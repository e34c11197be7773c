//! The PEFT on-disk layout of an adapter: `adapter_config.json` + `adapter_model.safetensors`
//! with PEFT tensor names, so an adapter loads in Python PEFT as it is.

use std::path::Path;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::{LoraAdapter, LoraConfig, LoraError, Target};
use crate::checkpoint::{self, CheckpointError};
use crate::config::LlamaConfig;

impl LoraAdapter {
    /// Saves in the PEFT layout (atomic writes).
    pub fn save(&self, dir: &Path) -> Result<(), LoraError> {
        std::fs::create_dir_all(dir).map_err(|e| CheckpointError::io(dir, e))?;
        let cfg = PeftConfig::from_config(&self.config);
        let json = serde_json::to_vec_pretty(&cfg).expect("plain struct serializes");
        checkpoint::write_atomic(&dir.join("adapter_config.json"), &json)?;
        checkpoint::save_safetensors(
            &dir.join("adapter_model.safetensors"),
            &crate::tensors::into_named(self.to_tensors()?),
        )?;
        Ok(())
    }

    /// Loads an adapter in the PEFT layout for the given model config.
    pub fn load(dir: &Path, model: &LlamaConfig, device: &Device) -> Result<Self, LoraError> {
        let cfg_path = dir.join("adapter_config.json");
        let text =
            std::fs::read_to_string(&cfg_path).map_err(|e| CheckpointError::io(&cfg_path, e))?;
        let bad = |message: String| LoraError::BadAdapterConfig {
            path: cfg_path.display().to_string(),
            message,
        };
        let peft: PeftConfig = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let config = peft.to_config().map_err(bad)?;
        let tensors = checkpoint::load_safetensors(&dir.join("adapter_model.safetensors"))?;
        let tensors = crate::tensors::from_named(tensors).map_err(|e| bad(e.to_string()))?;
        Self::from_tensors(model, config, &tensors, device)
    }
}

/// `adapter_config.json` as PEFT writes and reads it (the LoRA fields we use).
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfig {
    peft_type: String,
    #[serde(default)]
    task_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    target_modules: serde_json::Value,
    #[serde(default)]
    lora_dropout: f64,
    #[serde(default = "none_bias")]
    bias: String,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    modules_to_save: Option<serde_json::Value>,
    #[serde(default)]
    inference_mode: bool,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
}

fn none_bias() -> String {
    "none".to_string()
}

impl PeftConfig {
    fn from_config(c: &LoraConfig) -> Self {
        let mut names: Vec<&str> = c.targets.iter().map(|t| t.name()).collect();
        names.sort_unstable();
        PeftConfig {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: c.rank,
            lora_alpha: c.alpha,
            target_modules: names.into(),
            lora_dropout: 0.0,
            bias: "none".into(),
            fan_in_fan_out: false,
            use_rslora: false,
            use_dora: false,
            layers_to_transform: None,
            modules_to_save: None,
            inference_mode: true,
            base_model_name_or_path: None,
        }
    }

    fn to_config(&self) -> Result<LoraConfig, String> {
        if self.peft_type != "LORA" {
            return Err(format!("peft_type {:?} is not LORA", self.peft_type));
        }
        if self.bias != "none" || self.fan_in_fan_out || self.use_rslora || self.use_dora {
            return Err("bias, fan_in_fan_out, rslora and DoRA are not supported".into());
        }
        if self
            .layers_to_transform
            .as_ref()
            .is_some_and(|v| !v.is_null())
            || self.modules_to_save.as_ref().is_some_and(|v| !v.is_null())
        {
            return Err("layers_to_transform and modules_to_save are not supported".into());
        }
        let names: Vec<String> = match &self.target_modules {
            serde_json::Value::Array(a) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or("target_modules must be strings")
                })
                .collect::<Result<_, _>>()?,
            serde_json::Value::String(s) => vec![s.clone()],
            _ => return Err("target_modules must be a list of module names".into()),
        };
        let mut targets = names
            .iter()
            .map(|n| Target::parse(n).ok_or_else(|| format!("unsupported target module {n:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        targets.sort();
        targets.dedup();
        let config = LoraConfig {
            rank: self.r,
            alpha: self.lora_alpha,
            targets,
            freeze_a: false,
            seed: 0,
        };
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}
