//! LoRA adapters: rank/alpha/targets, FFA-LoRA, and the [`Adapter`] the plain model's forward
//! pass takes. The PEFT on-disk layout (`adapter_config.json` + `adapter_model.safetensors`
//! with PEFT tensor names) is in `peft`.

mod peft;

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use crate::checkpoint::CheckpointError;
use crate::config::LlamaConfig;
use crate::error::ModelError;
use crate::model::Adapter;
pub use crate::model::Target;
use fedpersona_privacy::AdapterTensors;

/// Adapter hyperparameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<Target>,
    /// FFA-LoRA: A is fixed from `seed` (the same on every device), only B trains.
    pub freeze_a: bool,
    /// Seed of A's initialization.
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            targets: vec![Target::Q, Target::V],
            freeze_a: false,
            seed: 0,
        }
    }
}

impl LoraConfig {
    pub fn validate(&self) -> Result<(), LoraError> {
        if self.rank == 0 {
            return Err(LoraError::Invalid("rank must be positive".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(LoraError::Invalid("alpha must be positive".into()));
        }
        if self.targets.is_empty() {
            return Err(LoraError::Invalid(
                "at least one target module is needed".into(),
            ));
        }
        if let Some(t) = self
            .targets
            .iter()
            .enumerate()
            .find_map(|(i, t)| self.targets[..i].contains(t).then_some(t))
        {
            return Err(LoraError::Invalid(format!(
                "target {} is listed twice",
                t.name()
            )));
        }
        Ok(())
    }

    /// Whether the tensor `name` trains, and so travels in federation: every tensor, or
    /// only B under FFA-LoRA.
    pub fn trains(&self, name: &str) -> bool {
        !self.freeze_a || name.ends_with(".lora_B.weight")
    }

    /// Output scaling of the low-rank path, as PEFT: `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// Errors from creating, loading or saving adapters.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("invalid LoRA config: {0}")]
    Invalid(String),
    #[error("{path}: {message}")]
    BadAdapterConfig { path: String, message: String },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The A and B matrices of one adapted projection: `A: [rank, in]`, `B: [out, rank]`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// A LoRA adapter for one model config. Its trainable tensors are `Var`s.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    config: LoraConfig,
    num_layers: usize,
    slots: Vec<[Option<LoraPair>; Target::COUNT]>,
    vars: Vec<Var>,
}

/// PEFT tensor name of a LoRA matrix (`which` is `"A"` or `"B"`).
pub fn peft_name(layer: usize, target: Target, which: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.lora_{which}.weight",
        target.hf_module()
    )
}

impl LoraAdapter {
    /// A fresh adapter: A Kaiming-uniform (bound 1/√in, as PEFT) from the config's seed, B zero,
    /// so the adapted model starts equal to the base model.
    pub fn new(
        model: &LlamaConfig,
        config: LoraConfig,
        device: &Device,
    ) -> Result<Self, LoraError> {
        config.validate()?;
        let mut tensors = AdapterTensors::default();
        for l in 0..model.num_hidden_layers {
            for &t in &config.targets {
                let (out, inp) = t.shape(model);
                // One stream per (seed, layer, target): FFA-LoRA's frozen A is identical on
                // every device that shares the seed, whatever the other targets are.
                let stream = (l * Target::COUNT + t as usize) as u64;
                let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(config.seed);
                rng.set_stream(stream);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..config.rank * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                tensors.insert(peft_name(l, t, "A"), vec![config.rank, inp], a);
                tensors.insert(
                    peft_name(l, t, "B"),
                    vec![out, config.rank],
                    vec![0.0; out * config.rank],
                );
            }
        }
        Self::from_tensors(model, config, &tensors, device)
    }

    /// The same adapter with its tensors detached from autograd: a forward pass through it
    /// records no graph, so scoring and decoding keep no activations alive (with the `Var`s,
    /// scoring 16 windows of 256 tokens held about 380 MB more at its peak).
    pub fn frozen(&self) -> LoraAdapter {
        let slots = self
            .slots
            .iter()
            .map(|layer| {
                layer.clone().map(|p| {
                    p.map(|p| LoraPair {
                        a: p.a.detach(),
                        b: p.b.detach(),
                    })
                })
            })
            .collect();
        LoraAdapter {
            config: self.config.clone(),
            num_layers: self.num_layers,
            slots,
            vars: Vec::new(),
        }
    }

    /// An adapter holding the given PEFT-named tensors. Every expected tensor must be present
    /// with the right shape and finite values, and nothing else may be.
    pub fn from_tensors(
        model: &LlamaConfig,
        config: LoraConfig,
        tensors: &AdapterTensors,
        device: &Device,
    ) -> Result<Self, LoraError> {
        config.validate()?;
        let expected = Self::expected_shapes(model, &config);
        for name in tensors.names() {
            if !expected.contains_key(name) {
                return Err(LoraError::Invalid(format!(
                    "unexpected tensor {name} for this adapter config"
                )));
            }
        }
        let mut slots: Vec<[Option<LoraPair>; Target::COUNT]> = (0..model.num_hidden_layers)
            .map(|_| Default::default())
            .collect();
        let mut vars = Vec::new();
        for (l, slot) in slots.iter_mut().enumerate() {
            for &t in &config.targets {
                let mut load = |which: &str, trainable: bool| -> Result<Tensor, LoraError> {
                    let name = peft_name(l, t, which);
                    let want = &expected[&name];
                    let flat = tensors
                        .get(&name)
                        .ok_or_else(|| LoraError::Invalid(format!("missing tensor {name}")))?;
                    if &flat.shape != want {
                        return Err(LoraError::Invalid(format!(
                            "tensor {name} has shape {:?}, expected {want:?}",
                            flat.shape
                        )));
                    }
                    if flat.data.iter().any(|v| !v.is_finite()) {
                        return Err(LoraError::Invalid(format!("tensor {name} is not finite")));
                    }
                    let t = Tensor::from_slice(&flat.data, want.as_slice(), device)?;
                    if trainable {
                        let var = Var::from_tensor(&t)?;
                        let t = var.as_tensor().clone();
                        vars.push(var);
                        Ok(t)
                    } else {
                        Ok(t)
                    }
                };
                let a = load("A", !config.freeze_a)?;
                let b = load("B", true)?;
                slot[t as usize] = Some(LoraPair { a, b });
            }
        }
        Ok(LoraAdapter {
            config,
            num_layers: model.num_hidden_layers,
            slots,
            vars,
        })
    }

    /// Names and shapes of the tensors that train (see [`LoraConfig::trains`]).
    pub fn trained_shapes(model: &LlamaConfig, config: &LoraConfig) -> Vec<(String, Vec<usize>)> {
        Self::expected_shapes(model, config)
            .into_iter()
            .filter(|(n, _)| config.trains(n))
            .collect()
    }

    fn expected_shapes(model: &LlamaConfig, config: &LoraConfig) -> BTreeMap<String, Vec<usize>> {
        let mut m = BTreeMap::new();
        for l in 0..model.num_hidden_layers {
            for &t in &config.targets {
                let (out, inp) = t.shape(model);
                m.insert(peft_name(l, t, "A"), vec![config.rank, inp]);
                m.insert(peft_name(l, t, "B"), vec![out, config.rank]);
            }
        }
        m
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    pub fn scale(&self) -> f64 {
        self.config.scale()
    }

    pub fn pair(&self, layer: usize, target: Target) -> Option<&LoraPair> {
        self.slots.get(layer)?[target as usize].as_ref()
    }

    /// The tensors an optimizer may update (B only under FFA-LoRA).
    pub fn trainable_vars(&self) -> &[Var] {
        &self.vars
    }

    /// All adapter tensors as flat f32 arrays under their PEFT names.
    pub fn to_tensors(&self) -> Result<AdapterTensors, LoraError> {
        let mut out = AdapterTensors::default();
        for (l, slot) in self.slots.iter().enumerate() {
            for t in Target::ALL {
                if let Some(p) = &slot[t as usize] {
                    for (which, x) in [("A", &p.a), ("B", &p.b)] {
                        out.insert(
                            peft_name(l, t, which),
                            x.dims().to_vec(),
                            x.flatten_all()?.to_vec1::<f32>()?,
                        );
                    }
                }
            }
        }
        Ok(out)
    }

    /// Overwrites the adapter's values in place (e.g. with a downloaded global adapter), so
    /// an optimizer holding its vars keeps working. Validates everything before changing
    /// anything. Under FFA-LoRA a frozen A is replaced too.
    pub fn set_tensors(&mut self, tensors: &AdapterTensors) -> Result<(), LoraError> {
        let mut updates = Vec::new();
        for (l, slot) in self.slots.iter().enumerate() {
            for t in Target::ALL {
                if let Some(p) = &slot[t as usize] {
                    for (which, x) in [("A", &p.a), ("B", &p.b)] {
                        let name = peft_name(l, t, which);
                        let flat = tensors
                            .get(&name)
                            .ok_or_else(|| LoraError::Invalid(format!("missing tensor {name}")))?;
                        if flat.shape != x.dims() {
                            return Err(LoraError::Invalid(format!(
                                "tensor {name} has shape {:?}, expected {:?}",
                                flat.shape,
                                x.dims()
                            )));
                        }
                        if flat.data.iter().any(|v| !v.is_finite()) {
                            return Err(LoraError::Invalid(format!("tensor {name} is not finite")));
                        }
                        updates.push((
                            l,
                            t,
                            which,
                            Tensor::from_slice(&flat.data, x.dims(), x.device())?,
                        ));
                    }
                }
            }
        }
        if let Some(extra) = tensors.names().find(|n| {
            !updates
                .iter()
                .any(|(l, t, w, _)| peft_name(*l, *t, w) == **n)
        }) {
            return Err(LoraError::Invalid(format!("unexpected tensor {extra}")));
        }
        for (l, t, which, value) in updates {
            let pair = self.slots[l][t as usize].as_mut().expect("checked above");
            let current = if which == "A" {
                &mut pair.a
            } else {
                &mut pair.b
            };
            match self
                .vars
                .iter()
                .find(|v| v.as_tensor().id() == current.id())
            {
                Some(var) => var.set(&value)?,
                None => *current = value,
            }
        }
        Ok(())
    }
}

impl Adapter for LoraAdapter {
    fn check_fits(&self, model: &LlamaConfig) -> Result<(), ModelError> {
        if self.num_layers != model.num_hidden_layers {
            return Err(ModelError::AdapterMismatch(format!(
                "adapter has {} layers, model {}",
                self.num_layers, model.num_hidden_layers
            )));
        }
        for (l, slot) in self.slots.iter().enumerate() {
            for t in Target::ALL {
                if let Some(p) = &slot[t as usize] {
                    let (out, inp) = t.shape(model);
                    if p.a.dims() != [self.config.rank, inp]
                        || p.b.dims() != [out, self.config.rank]
                    {
                        return Err(ModelError::AdapterMismatch(format!(
                            "layer {l} {} has A {:?} and B {:?}",
                            t.name(),
                            p.a.dims(),
                            p.b.dims()
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    fn factors(&self, layer: usize, target: Target) -> Option<(&Tensor, &Tensor)> {
        self.pair(layer, target).map(|p| (&p.a, &p.b))
    }

    fn scale(&self) -> f64 {
        self.config.scale()
    }
}
