//! The objectives at the logits: a part's loss with its gradient left in place of the
//! logits, and each position's score.

use super::elementwise::{exp, max, sum, sum_exp};
use super::workspace::{Dims, Workspace};
use super::{Objective, TokenScore};

/// The part's loss over its target tokens, leaving its gradient with respect to the logits
/// in `ws.logits`.
#[inline(always)]
pub(super) fn token_loss(d: Dims, ws: &mut Workspace, (objective, scale): (Objective, f64)) -> f64 {
    let mut loss = 0f64;
    for ((row, &target), &w) in ws
        .logits
        .chunks_exact_mut(d.vocab)
        .zip(&ws.targets)
        .zip(&ws.weights)
    {
        if w == 0.0 {
            row.fill(0.0);
            continue;
        }
        let c = (f64::from(w) * scale) as f32;
        let m = max(row);
        let z_target = row[target as usize];
        row.iter_mut().for_each(|v| *v = exp(*v - m));
        let total = sum(row);
        let t = target as usize;
        match objective {
            Objective::Likelihood => {
                // ∂/∂z = c · (softmax − onehot).
                loss += f64::from(c) * (f64::from(total.ln()) + f64::from(m - z_target));
                let k = c / total;
                row.iter_mut().for_each(|v| *v *= k);
                row[t] -= c;
            }
            Objective::Unlikelihood => {
                // With q = 1 + 1e-5 − p: ∂(−log q)/∂z = −(c·p/q) · (softmax − onehot).
                let p = row[t] / total;
                let q = 1.0 + 1e-5 - p;
                loss -= f64::from(c) * f64::from(q.ln());
                let k = c * p / q;
                let f = -k / total;
                row.iter_mut().for_each(|v| *v *= f);
                row[t] += k;
            }
        }
    }
    loss
}

/// Each position's target NLL and whether the target is the argmax (the first maximum, as
/// candle's `argmax`).
#[inline(always)]
pub(super) fn score_rows(d: Dims, ws: &Workspace) -> Vec<TokenScore> {
    ws.logits
        .chunks_exact(d.vocab)
        .zip(&ws.targets)
        .map(|(row, &target)| {
            let m = max(row);
            let first_max = row.iter().position(|&v| v == m).unwrap_or(0);
            let total: f32 = sum_exp(row, m);
            TokenScore {
                nll: total.ln() + m - row[target as usize],
                correct: first_max == target as usize,
            }
        })
        .collect()
}
