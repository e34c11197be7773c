//! The rotary tables of a config, with the linear and llama3 frequency scalings.

use crate::config::LlamaConfig;
use crate::kernels::RopeTables;

/// The rotary tables of a config, `[max_positions, head_dim]` in the HF `rotate_half` layout.
pub(super) fn rope_tables(cfg: &LlamaConfig) -> RopeTables {
    let d = cfg.head_dim;
    let mut inv_freq: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64))
        .collect();
    if let Some(s) = &cfg.rope_scaling {
        let factor = s.factor.unwrap_or(1.0);
        match s.rope_type.as_str() {
            "linear" => inv_freq.iter_mut().for_each(|f| *f /= factor),
            "llama3" => {
                let low = s.low_freq_factor.unwrap_or(1.0);
                let high = s.high_freq_factor.unwrap_or(4.0);
                let old = s.original_max_position_embeddings.unwrap_or(8192) as f64;
                let (low_wl, high_wl) = (old / low, old / high);
                for f in inv_freq.iter_mut() {
                    let wl = 2.0 * std::f64::consts::PI / *f;
                    if wl > low_wl {
                        *f /= factor;
                    } else if wl >= high_wl {
                        let smooth = (old / wl - low) / (high - low);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            _ => {}
        }
    }
    let n = cfg.max_position_embeddings;
    let mut cos = Vec::with_capacity(n * d);
    let mut sin = Vec::with_capacity(n * d);
    for p in 0..n {
        // HF layout: the table is cat(freqs, freqs).
        for _ in 0..2 {
            for f in &inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
    }
    RopeTables::new(cos, sin, d)
}
