//! Validation of `[update.adaptive_clipping]`: the target quantile, the step, the count's
//! noise and the range the clip norm moves in (`fedpersona_privacy::adaptive_clip`).

use anyhow::{ensure, Context};
use fedpersona_privacy::adaptive_clip;

use super::file::ConfigFile;
use super::{AdaptiveClipping, PrivacyMode, PrivacyPolicy, RoundPolicy};

/// σ_b per expected device when the file names none (Andrew et al.'s m/20).
const COUNT_STDDEV_PER_DEVICE: f64 = 0.05;
/// The smallest clip norm, relative to the largest, when the file names none.
const MIN_CLIP_RATIO: f64 = 1e-3;

/// The adaptive clipping the file asks for, or None.
pub(super) fn adaptive_clipping(
    f: &ConfigFile,
    rounds: &RoundPolicy,
    privacy: &PrivacyPolicy,
) -> anyhow::Result<Option<AdaptiveClipping>> {
    let Some(a) = &f.update.adaptive_clipping else {
        return Ok(None);
    };
    ensure!(
        privacy.mode != PrivacyMode::Local,
        "update.adaptive_clipping needs privacy.mode none, central or distributed: under \
         local noise each device's count bit would carry the full noise on its own"
    );
    ensure!(
        a.target_quantile > 0.0 && a.target_quantile < 1.0,
        "update.adaptive_clipping.target_quantile must be in (0, 1)"
    );
    ensure!(
        a.learning_rate > 0.0 && a.learning_rate <= 10.0,
        "update.adaptive_clipping.learning_rate must be in (0, 10]"
    );
    let cohort = f64::from(rounds.target_reports.get());
    let count_stddev = a.count_stddev.unwrap_or(COUNT_STDDEV_PER_DEVICE * cohort);
    ensure!(
        count_stddev.is_finite() && count_stddev > 0.0,
        "update.adaptive_clipping.count_stddev must be positive"
    );
    let z = privacy.noise_multiplier;
    let ratio = adaptive_clip::clip_ratio(z, count_stddev).with_context(|| {
        format!(
            "update.adaptive_clipping.count_stddev ({count_stddev}) is too small for \
             privacy.noise_multiplier {z}: the split of the noise between the update and the \
             count of unclipped devices needs count_stddev above z/2 (raise it, or the cohort)"
        )
    })?;
    let max = f.update.clip_norm * ratio;
    let min = a.min_clip_norm.unwrap_or(max * MIN_CLIP_RATIO);
    ensure!(
        min.is_finite() && min > 0.0 && min <= max,
        "update.adaptive_clipping.min_clip_norm ({min}) must be positive and at most {max} \
         (update.clip_norm less the count coordinate's share)"
    );
    let initial = a.initial_clip_norm.unwrap_or(max);
    ensure!(
        initial.is_finite() && (min..=max).contains(&initial),
        "update.adaptive_clipping.initial_clip_norm ({initial}) must be between \
         min_clip_norm ({min}) and {max} (update.clip_norm less the count coordinate's share)"
    );
    Ok(Some(AdaptiveClipping {
        target_quantile: a.target_quantile,
        learning_rate: a.learning_rate,
        count_stddev,
        initial,
        min,
        max,
    }))
}
