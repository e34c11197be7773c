//! The forward pass to the logits, over the workspace's buffers.

use super::adapter::{lora_forward, LoraData};
use super::elementwise::{rms_forward, rotate_in_place, sigmoid, softmax_row};
use super::gemm::{a_b, a_bt};
use super::workspace::{Dims, Workspace};
use crate::model::{FlatWeights, Target};

/// Rows of a block of the causal attention products: a block of query rows `r0..r1` only
/// needs keys `0..r1`.
const CAUSAL_BLOCK: usize = 32;

/// The stream buffer a layer reads and the one it writes.
fn stream_pair(v: &mut [Vec<f32>], read: usize, write: usize) -> (&[f32], &mut [f32]) {
    if read < write {
        let (a, b) = v.split_at_mut(write);
        (&a[read], &mut b[0])
    } else {
        let (a, b) = v.split_at_mut(read);
        (&b[0], &mut a[write])
    }
}

#[inline(always)]
/// The forward pass to the logits. `training` keeps every layer's activations for the
/// backward pass; otherwise one layer's buffers and two stream buffers serve every layer.
pub(super) fn forward(
    fw: &FlatWeights,
    lora: &LoraData,
    d: Dims,
    ws: &mut Workspace,
    training: bool,
) {
    let (n, h) = (d.n, d.hidden);
    for (row, &tok) in ws.stream[0].chunks_exact_mut(h).zip(&ws.tokens) {
        let tok = tok as usize;
        row.copy_from_slice(&fw.embed[tok * h..(tok + 1) * h]);
    }
    let slot = |l: usize| {
        if training {
            (l, l, l + 1)
        } else {
            (0, l % 2, (l + 1) % 2)
        }
    };
    for (l, w) in fw.layers.iter().enumerate() {
        let (buffers, read, write) = slot(l);
        let lb = &mut ws.layers[buffers];
        let (x, next) = stream_pair(&mut ws.stream, read, write);
        let lora_dims = |t: Target| (n, d.input(t), d.slot(t).1, d.rank);

        // Attention.
        rms_forward(x, &w.input_norm, d.eps, &mut lb.inv1, &mut lb.h1);
        a_bt(
            (n, d.qkv, h),
            &mut lb.qkv,
            d.qkv,
            false,
            &lb.h1,
            h,
            &w.qkv,
            h,
            1.0,
        );
        for t in [Target::Q, Target::K, Target::V] {
            if let Some(p) = lora.pair(l, t) {
                let off = d.slot(t).0;
                let (xa, y) = (&mut lb.xa[t as usize], &mut lb.qkv[off..]);
                lora_forward(p, lora.scale, lora_dims(t), &lb.h1, xa, y, d.qkv);
            }
        }
        rope(&mut lb.qkv, fw, d, 1.0);
        attention_forward(d, &lb.qkv, &mut lb.probs, &mut lb.att);
        lb.mid.copy_from_slice(x);
        a_bt(
            (n, h, d.q),
            &mut lb.mid,
            h,
            true,
            &lb.att,
            d.q,
            &w.o,
            d.q,
            1.0,
        );
        if let Some(p) = lora.pair(l, Target::O) {
            let xa = &mut lb.xa[Target::O as usize];
            lora_forward(
                p,
                lora.scale,
                lora_dims(Target::O),
                &lb.att,
                xa,
                &mut lb.mid,
                h,
            );
        }

        // MLP.
        rms_forward(&lb.mid, &w.post_norm, d.eps, &mut lb.inv2, &mut lb.h2);
        let gu = 2 * d.inter;
        a_bt(
            (n, gu, h),
            &mut lb.gate_up,
            gu,
            false,
            &lb.h2,
            h,
            &w.gate_up,
            h,
            1.0,
        );
        for t in [Target::Gate, Target::Up] {
            if let Some(p) = lora.pair(l, t) {
                let off = d.slot(t).0;
                let (xa, y) = (&mut lb.xa[t as usize], &mut lb.gate_up[off..]);
                lora_forward(p, lora.scale, lora_dims(t), &lb.h2, xa, y, gu);
            }
        }
        for (row, out) in lb
            .gate_up
            .chunks_exact(gu)
            .zip(lb.act.chunks_exact_mut(d.inter))
        {
            let (g, u) = row.split_at(d.inter);
            for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                *o = g * sigmoid(g) * u;
            }
        }
        next.copy_from_slice(&lb.mid);
        a_bt(
            (n, h, d.inter),
            next,
            h,
            true,
            &lb.act,
            d.inter,
            &w.down,
            d.inter,
            1.0,
        );
        if let Some(p) = lora.pair(l, Target::Down) {
            let xa = &mut lb.xa[Target::Down as usize];
            lora_forward(p, lora.scale, lora_dims(Target::Down), &lb.act, xa, next, h);
        }
    }
    let last = &ws.stream[slot(fw.layers.len()).1];
    rms_forward(last, &fw.norm, d.eps, &mut ws.inv_final, &mut ws.h_final);
    a_bt(
        (n, d.vocab, h),
        &mut ws.logits,
        d.vocab,
        false,
        &ws.h_final,
        h,
        fw.lm_head(),
        h,
        1.0,
    );
}

/// Rotary embeddings on the q and k parts of every row (`sign` −1: the backward pass).
#[inline(always)]
pub(super) fn rope(qkv: &mut [f32], fw: &FlatWeights, d: Dims, sign: f32) {
    let hd = d.head_dim;
    let half = hd / 2;
    for (r, row) in qkv.chunks_exact_mut(d.qkv).enumerate() {
        let p = (r % d.t) * hd;
        let (cos, sin) = (&fw.cos[p..p + half], &fw.sin[p..p + half]);
        for head in row[..d.q + d.kv].chunks_exact_mut(hd) {
            rotate_in_place(head, cos, sin, sign);
        }
    }
}

/// The row blocks `r0..r1` of causal products over `t` positions.
pub(super) fn causal_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(CAUSAL_BLOCK)
        .map(move |r0| (r0, (r0 + CAUSAL_BLOCK).min(t)))
}

#[inline(always)]
fn attention_forward(d: Dims, qkv: &[f32], probs: &mut [f32], att: &mut [f32]) {
    let (t, hd, w) = (d.t, d.head_dim, d.qkv);
    let rep = d.heads / d.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    for bi in 0..d.b {
        let rows = bi * t * w;
        for hh in 0..d.heads {
            let kvh = hh / rep;
            let q = &qkv[rows + hh * hd..];
            let k = &qkv[rows + d.q + kvh * hd..];
            let v = &qkv[rows + d.q + d.kv + kvh * hd..];
            // One slot per head when training (kept for the backward pass), else one slot.
            let slots = probs.len() / (t * t);
            let p = &mut probs[(bi * d.heads + hh) % slots * t * t..][..t * t];
            for (r0, r1) in causal_blocks(t) {
                a_bt(
                    (r1 - r0, r1, hd),
                    &mut p[r0 * t..],
                    t,
                    false,
                    &q[r0 * w..],
                    w,
                    k,
                    w,
                    1.0,
                );
            }
            for (i, row) in p.chunks_exact_mut(t).enumerate() {
                softmax_row(row, i + 1, scale);
            }
            let o = &mut att[bi * t * d.q + hh * hd..];
            for (r0, r1) in causal_blocks(t) {
                a_b(
                    (r1 - r0, hd, r1),
                    &mut o[r0 * d.q..],
                    d.q,
                    false,
                    &p[r0 * t..],
                    t,
                    v,
                    w,
                    1.0,
                );
            }
        }
    }
}
