//! A round's task from the wire, turned into what the device does: the adapter's shape,
//! the local training, and the protection the delta gets before it leaves (clipping, the
//! privacy mode's noise, an encoding or the SecAgg grid). Every check of a task is here, so
//! a malformed or under-noised task is refused before any training.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use candle_core::Device;
use fedpersona_model::train::{fit, Example, FitConfig, TrainConfig};
use fedpersona_model::{BaseModel, LoraAdapter, LoraConfig, Target};
use fedpersona_privacy::adaptive_clip::{self, RoundClip};
use fedpersona_privacy::codec::Encoding;
use fedpersona_privacy::mode;
use fedpersona_privacy::protect::{
    clip as clip_to, protect, DeviceNoise, PrivacySpec, Protected, Protection, QuantizationSpec,
};
use fedpersona_privacy::secagg;
use fedpersona_privacy::tensors::AdapterTensors;
use fedpersona_proto::v1 as pb;

pub(crate) fn deadline(task: &pb::Task) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(task.deadline_unix_ms.max(0) as u64)
}

/// What the task asks of the delta before it leaves: clipping, the privacy mode's noise, and
/// an encoding or (with secure aggregation) the integer grid.
pub fn protection_for(task: &pb::Task) -> anyhow::Result<Protection> {
    // Under adaptive clipping the noise covers the delta and its count coordinate.
    let clip_norm = match adaptive_clip_for(task)? {
        Some(c) => c.extended_norm,
        None => f64::from(task.clip_norm),
    };
    ensure!(
        clip_norm.is_finite() && clip_norm > 0.0,
        "task clip norm must be positive"
    );
    let privacy = task.privacy.unwrap_or_default();
    let z = f64::from(privacy.noise_multiplier);
    let requested = pb::PrivacyMode::try_from(privacy.mode)
        .ok()
        .filter(|m| *m != pb::PrivacyMode::Unspecified)
        .context("task asks for an unknown privacy mode")?;
    if requested != pb::PrivacyMode::None {
        ensure!(
            z.is_finite() && z > 0.0,
            "task asks for DP noise with noise multiplier {z}"
        );
    }
    let secure = task.secure_aggregation.filter(|s| s.enabled);
    if let Some(s) = secure {
        let g = s.granularity;
        ensure!(
            g.is_finite() && g > 0.0 && mode::grid_units(clip_norm, g) >= 1.0,
            "task's secure-aggregation granularity {g} does not fit its clip norm"
        );
        let units = mode::grid_units(clip_norm, g);
        let noise_stddev = match requested {
            pb::PrivacyMode::None | pb::PrivacyMode::Central => 0.0,
            pb::PrivacyMode::Local => mode::local_sigma(z, units),
            pb::PrivacyMode::Distributed => {
                ensure!(
                    privacy.min_reports >= 1,
                    "distributed noise needs min_reports"
                );
                mode::distributed_noise_share(z, units, u64::from(privacy.min_reports))
            }
            pb::PrivacyMode::Unspecified => unreachable!("filtered above"),
        };
        return Ok(Protection::Secure(QuantizationSpec {
            clip_norm,
            granularity: g,
            noise_stddev,
        }));
    }
    let encoding = match pb::Encoding::try_from(task.encoding) {
        Ok(pb::Encoding::F32) => Encoding::F32,
        Ok(pb::Encoding::Q8) => Encoding::Q8,
        _ => bail!("task asks for an unknown update encoding"),
    };
    let noise = match requested {
        pb::PrivacyMode::None | pb::PrivacyMode::Central => DeviceNoise::None,
        pb::PrivacyMode::Local => DeviceNoise::Gaussian {
            stddev: mode::local_sigma(z, clip_norm),
        },
        pb::PrivacyMode::Distributed => {
            bail!("task asks for distributed noise without secure aggregation: refused, the aggregator would see under-noised updates")
        }
        pb::PrivacyMode::Unspecified => unreachable!("filtered above"),
    };
    Ok(Protection::Plain(PrivacySpec {
        clip_norm,
        encoding,
        noise,
    }))
}

/// The round's adaptive clipping, if the task asks for it: the delta's clip norm, the count
/// coordinate's scale κ and their bound √(C² + κ²/4).
pub fn adaptive_clip_for(task: &pb::Task) -> anyhow::Result<Option<RoundClip>> {
    let kappa = f64::from(task.clip_count_scale);
    if kappa == 0.0 {
        return Ok(None);
    }
    let clip_norm = f64::from(task.clip_norm);
    ensure!(
        kappa.is_finite() && kappa > 0.0 && clip_norm.is_finite() && clip_norm > 0.0,
        "task asks for adaptive clipping with clip norm {clip_norm} and count scale {kappa}"
    );
    Ok(Some(RoundClip::of(clip_norm, kappa)))
}

/// What local training produced: the protected delta, the examples it saw, the mean training
/// loss, and the delta's norm before clipping (which stays on the device).
#[derive(Debug)]
pub struct LocalUpdate {
    pub update: Protected,
    pub examples: u32,
    pub loss: f32,
    pub norm_before_clip: f64,
}

/// The aggregator's assignment, with every neighbour's key advert checked against its
/// enrolled Ed25519 key (a peer whose signature fails is refused, not used).
pub(crate) fn assignment_from(
    round: u64,
    a: &pb::SecAggAssignment,
) -> anyhow::Result<secagg::Assignment> {
    let key = |b: &[u8], what: &str| -> anyhow::Result<[u8; 32]> {
        b.try_into()
            .map_err(|_| anyhow::anyhow!("secure aggregation: {what} must be 32 bytes"))
    };
    let neighbours = a
        .peers
        .iter()
        .map(|p| {
            let (c_pk, s_pk) = (key(&p.c_pk, "c_pk")?, key(&p.s_pk, "s_pk")?);
            let msg = secagg::advert_signing_bytes(round, &c_pk, &s_pk);
            ensure!(
                fedpersona_proto::auth::verify(&p.device_public_key, &msg, &p.signature),
                "secure aggregation: the key advert of neighbour {} is not signed by its device key",
                p.index
            );
            Ok(secagg::KeyAdvert {
                index: p.index,
                c_pk,
                s_pk,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(secagg::Assignment {
        index: a.index,
        params: secagg::Params::new(a.clients, a.neighbours, a.threshold)?,
        vector_len: a.vector_len,
        own: secagg::KeyAdvert {
            index: a.index,
            c_pk: key(&a.own_c_pk, "own c_pk")?,
            s_pk: key(&a.own_s_pk, "own s_pk")?,
        },
        neighbours,
    })
}

pub(crate) fn lora_config(task: &pb::Task) -> anyhow::Result<LoraConfig> {
    let spec = task.lora.as_ref().context("task without adapter spec")?;
    let targets = spec
        .targets
        .iter()
        .map(|t| Target::parse(t).with_context(|| format!("task names unknown target {t:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cfg = LoraConfig {
        rank: spec.rank as usize,
        alpha: f64::from(spec.alpha),
        targets,
        freeze_a: spec.freeze_a,
        seed: spec.seed,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The local training a task asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Training {
    pub steps: usize,
    pub batch_size: usize,
    /// Tokens per window (checked against the base model in [`local_update`]).
    pub seq_len: usize,
    pub optimizer: TrainConfig,
}

impl TryFrom<Option<&pb::LocalTraining>> for Training {
    type Error = anyhow::Error;

    fn try_from(t: Option<&pb::LocalTraining>) -> anyhow::Result<Training> {
        let t = t.context("task without training settings")?;
        ensure!(
            t.steps >= 1 && t.batch_size >= 1,
            "task asks for no training"
        );
        ensure!(
            t.learning_rate.is_finite() && t.learning_rate > 0.0,
            "task learning rate is not positive"
        );
        ensure!(
            t.weight_decay.is_finite() && t.weight_decay >= 0.0,
            "task weight decay is not a non-negative number"
        );
        ensure!(
            t.grad_clip.is_finite(),
            "task gradient clip is not a number"
        );
        Ok(Training {
            steps: t.steps as usize,
            batch_size: t.batch_size as usize,
            seq_len: t.seq_len as usize,
            optimizer: TrainConfig {
                lr: f64::from(t.learning_rate),
                weight_decay: f64::from(t.weight_decay),
                max_grad_norm: (t.grad_clip > 0.0).then_some(f64::from(t.grad_clip)),
                ..TrainConfig::default()
            },
        })
    }
}

/// Adapts θ on the user's examples with the task's settings; returns the privatized
/// Δ = φ − θ over the trained tensors (with adaptive clipping's count coordinate when the
/// round has one), the number of examples and the mean training loss.
#[allow(clippy::too_many_arguments)]
pub fn local_update(
    base: &BaseModel,
    examples: &[Example],
    theta: &AdapterTensors,
    lora: LoraConfig,
    training: &Training,
    protection: &Protection,
    clip: Option<RoundClip>,
    threads: usize,
    seed: u64,
) -> anyhow::Result<LocalUpdate> {
    let model_cfg = base.model.config();
    let seq_len = training.seq_len;
    ensure!(
        (2..=model_cfg.max_position_embeddings).contains(&seq_len),
        "task sequence length {seq_len} does not fit the base model"
    );
    let adapter = LoraAdapter::from_tensors(model_cfg, lora.clone(), theta, &Device::Cpu)
        .context("the global adapter does not fit this base model")?;
    let windows = crate::adapt::to_windows(base, examples, seq_len)?;
    ensure!(!windows.is_empty(), "no local data to train on");
    let cfg = FitConfig {
        steps: training.steps,
        batch_size: training.batch_size,
        optimizer: training.optimizer,
        workers: if threads == 0 { 1 } else { threads },
        seed,
    };
    let mut loss_sum = 0.0;
    fit(&base.model, &adapter, &windows, &cfg, |_, s| {
        loss_sum += s.loss
    })?;
    let trained = |n: &str| lora.trains(n);
    let phi = adapter.to_tensors()?.filter(trained);
    let mut delta = phi.sub(&theta.filter(trained))?;
    let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(seed);
    let (update, norm_before_clip) = match clip {
        Some(c) => {
            let norm = clip_to(&mut delta, c.clip_norm);
            let extended = adaptive_clip::with_count(delta, norm, &c);
            (protect(extended, protection, &mut rng)?, norm)
        }
        None => {
            let update = protect(delta, protection, &mut rng)?;
            let norm = update.norm_before_clip();
            (update, norm)
        }
    };
    Ok(LocalUpdate {
        update,
        examples: examples.len().min(u32::MAX as usize) as u32,
        loss: (loss_sum / training.steps as f64) as f32,
        norm_before_clip,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(requested: pb::PrivacyMode, z: f32, min_reports: u32, grid: Option<f64>) -> pb::Task {
        pb::Task {
            clip_norm: 1.0,
            privacy: Some(pb::Privacy {
                mode: requested as i32,
                noise_multiplier: z,
                min_reports,
            }),
            secure_aggregation: grid.map(|granularity| pb::SecureAggregation {
                enabled: true,
                granularity,
                phase_timeout_ms: 1000,
            }),
            encoding: pb::Encoding::Q8 as i32,
            ..Default::default()
        }
    }

    fn secure_stddev(requested: pb::PrivacyMode, z: f32, grid: f64) -> f64 {
        match protection_for(&task(requested, z, 95, Some(grid))).unwrap() {
            Protection::Secure(s) => s.noise_stddev,
            p => panic!("expected secure aggregation, got {p:?}"),
        }
    }

    /// The noise each mode asks of the device, against hand-computed values.
    #[test]
    fn each_mode_asks_for_its_noise() {
        // 100 devices, z = 1, m = 95: B = 9,560,370 grid units per clip norm (see `mode`).
        let g = mode::secagg_grid(1.0, 100, 1.0, 95).granularity;
        // Distributed: z·B/√m = 9,560,370/√95 = 980,873.2657924346.
        let share = secure_stddev(pb::PrivacyMode::Distributed, 1.0, g);
        assert!((share - 980_873.265_792_434_6).abs() < 1e-6, "{share}");
        // Local under secure aggregation: the whole z·B on each device.
        let local = secure_stddev(pb::PrivacyMode::Local, 2.0, g);
        assert!((local - 19_120_740.0).abs() < 1e-6, "{local}");
        assert_eq!(secure_stddev(pb::PrivacyMode::Central, 1.0, g), 0.0);
        // Plain uploads: σ = z·C locally, nothing for central noise.
        let plain = |requested, z| match protection_for(&task(requested, z, 0, None)).unwrap() {
            Protection::Plain(s) => s.noise,
            p => panic!("expected a plain upload, got {p:?}"),
        };
        assert_eq!(
            plain(pb::PrivacyMode::Local, 0.5),
            DeviceNoise::Gaussian { stddev: 0.5 }
        );
        assert_eq!(plain(pb::PrivacyMode::Central, 0.5), DeviceNoise::None);
        assert_eq!(plain(pb::PrivacyMode::None, 0.0), DeviceNoise::None);
    }

    /// Tasks that would leave the device under-noised are refused.
    #[test]
    fn under_noised_tasks_are_refused() {
        let g = 1e-6;
        for (t, why) in [
            (
                task(pb::PrivacyMode::Distributed, 1.0, 5, None),
                "without secure aggregation",
            ),
            (
                task(pb::PrivacyMode::Distributed, 1.0, 0, Some(g)),
                "needs min_reports",
            ),
            (
                task(pb::PrivacyMode::Local, 0.0, 0, None),
                "noise multiplier",
            ),
            (
                task(pb::PrivacyMode::Local, 1.0, 0, Some(2.0)),
                "does not fit",
            ),
            (
                task(pb::PrivacyMode::Unspecified, 1.0, 0, None),
                "unknown privacy mode",
            ),
        ] {
            let err = format!("{:#}", protection_for(&t).unwrap_err());
            assert!(err.contains(why), "{err}");
        }
    }
}
