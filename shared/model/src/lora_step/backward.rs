//! The backward pass from the logits' gradient to the adapter's gradients.

use super::adapter::{lora_backward, LoraData};
use super::elementwise::{dot, rms_backward, sigmoid};
use super::forward::{causal_blocks, rope};
use super::gemm::{a_b, a_bt, at_b};
use super::workspace::{Dims, LayerBuffers, Workspace};
use crate::model::{FlatWeights, Target};

/// Index of each (layer, target, A|B) gradient in [`Gradients::grads`].
pub(super) struct GradIndex {
    a: Vec<[Option<usize>; Target::COUNT]>,
    b: Vec<[Option<usize>; Target::COUNT]>,
    /// Gradients in all.
    pub(super) count: usize,
}

impl GradIndex {
    pub(super) fn new(lora: &LoraData, layers: usize) -> Self {
        let mut a = vec![[None; Target::COUNT]; layers];
        let mut b = vec![[None; Target::COUNT]; layers];
        let mut i = 0;
        for l in 0..layers {
            for &t in &lora.targets {
                if lora.train_a {
                    a[l][t as usize] = Some(i);
                    i += 1;
                }
                b[l][t as usize] = Some(i);
                i += 1;
            }
        }
        GradIndex { a, b, count: i }
    }
}

/// Splits the gradient list into the A and B gradients of one projection.
fn grad_pair<'g>(
    grads: &'g mut [Vec<f32>],
    idx: &GradIndex,
    l: usize,
    t: Target,
) -> (Option<&'g mut [f32]>, &'g mut [f32]) {
    let b = idx.b[l][t as usize].expect("every adapted projection has a B gradient");
    match idx.a[l][t as usize] {
        // A comes right before its B.
        Some(a) => {
            let (lo, hi) = grads.split_at_mut(b);
            (Some(&mut lo[a][..]), &mut hi[0][..])
        }
        None => (None, &mut grads[b][..]),
    }
}

#[inline(always)]
pub(super) fn backward(
    fw: &FlatWeights,
    lora: &LoraData,
    d: Dims,
    ws: &mut Workspace,
    idx: &GradIndex,
    grads: &mut [Vec<f32>],
) {
    let (n, h) = (d.n, d.hidden);
    let s = lora.scale;
    let layers = fw.layers.len();
    a_b(
        (n, h, d.vocab),
        &mut ws.dh,
        h,
        false,
        &ws.logits,
        d.vocab,
        fw.lm_head(),
        h,
        1.0,
    );
    rms_backward(
        &ws.stream[layers],
        &fw.norm,
        &ws.inv_final,
        &ws.dh,
        &mut ws.dx,
        false,
    );

    for l in (0..layers).rev() {
        let w = &fw.layers[l];
        let lb = &ws.layers[l];
        let lora_dims = |t: Target| (n, d.input(t), d.slot(t).1, d.rank);

        // MLP: dx is the gradient of the layer's output.
        let gu = 2 * d.inter;
        a_b(
            (n, d.inter, h),
            &mut ws.dact,
            d.inter,
            false,
            &ws.dx,
            h,
            &w.down,
            d.inter,
            1.0,
        );
        if let Some(p) = lora.pair(l, Target::Down) {
            let (ga, gb) = grad_pair(grads, idx, l, Target::Down);
            let xa = &lb.xa[Target::Down as usize];
            let dims = lora_dims(Target::Down);
            let dx = Some(&mut ws.dact[..]);
            lora_backward(p, s, dims, &lb.act, xa, &ws.dx, h, &mut ws.dxa, ga, gb, dx);
        }
        for ((row, dg), da) in lb
            .gate_up
            .chunks_exact(gu)
            .zip(ws.dgate_up.chunks_exact_mut(gu))
            .zip(ws.dact.chunks_exact(d.inter))
        {
            let (g, u) = row.split_at(d.inter);
            let (dg, du) = dg.split_at_mut(d.inter);
            // Equal-length slices and an index: the form the compiler vectorizes.
            let k = d.inter;
            let (g, u, da, du) = (&g[..k], &u[..k], &da[..k], &mut du[..k]);
            for i in 0..k {
                let sg = sigmoid(g[i]);
                du[i] = da[i] * g[i] * sg;
                dg[i] = da[i] * u[i] * sg * (1.0 + g[i] * (1.0 - sg));
            }
        }
        a_b(
            (n, h, gu),
            &mut ws.dh,
            h,
            false,
            &ws.dgate_up,
            gu,
            &w.gate_up,
            h,
            1.0,
        );
        for t in [Target::Gate, Target::Up] {
            if let Some(p) = lora.pair(l, t) {
                let (ga, gb) = grad_pair(grads, idx, l, t);
                let dy = &ws.dgate_up[d.slot(t).0..];
                let xa = &lb.xa[t as usize];
                let dx = Some(&mut ws.dh[..]);
                lora_backward(
                    p,
                    s,
                    lora_dims(t),
                    &lb.h2,
                    xa,
                    dy,
                    gu,
                    &mut ws.dxa,
                    ga,
                    gb,
                    dx,
                );
            }
        }
        rms_backward(&lb.mid, &w.post_norm, &lb.inv2, &ws.dh, &mut ws.dx, true);

        // Attention: dx is now the gradient of the stream after attention.
        a_b(
            (n, d.q, h),
            &mut ws.datt,
            d.q,
            false,
            &ws.dx,
            h,
            &w.o,
            d.q,
            1.0,
        );
        if let Some(p) = lora.pair(l, Target::O) {
            let (ga, gb) = grad_pair(grads, idx, l, Target::O);
            let xa = &lb.xa[Target::O as usize];
            let dx = Some(&mut ws.datt[..]);
            let dims = lora_dims(Target::O);
            lora_backward(p, s, dims, &lb.att, xa, &ws.dx, h, &mut ws.dxa, ga, gb, dx);
        }
        // Below the first layer nothing trains: only the adapted projections need their
        // output gradients there.
        let needs = |t: Target| l > 0 || lora.pair(l, t).is_some();
        attention_backward(
            d,
            lb,
            &ws.datt,
            &mut ws.dscores,
            &mut ws.dqkv,
            [needs(Target::Q), needs(Target::K), needs(Target::V)],
        );
        rope(&mut ws.dqkv, fw, d, -1.0);
        if l > 0 {
            a_b(
                (n, h, d.qkv),
                &mut ws.dh,
                h,
                false,
                &ws.dqkv,
                d.qkv,
                &w.qkv,
                h,
                1.0,
            );
        }
        for t in [Target::Q, Target::K, Target::V] {
            if let Some(p) = lora.pair(l, t) {
                let (ga, gb) = grad_pair(grads, idx, l, t);
                let dy = &ws.dqkv[d.slot(t).0..];
                let xa = &lb.xa[t as usize];
                let dx = (l > 0).then_some(&mut ws.dh[..]);
                let dims = lora_dims(t);
                lora_backward(p, s, dims, &lb.h1, xa, dy, d.qkv, &mut ws.dxa, ga, gb, dx);
            }
        }
        if l > 0 {
            let (x, inv) = (&ws.stream[l], &lb.inv1);
            rms_backward(x, &w.input_norm, inv, &ws.dh, &mut ws.dx, true);
        }
    }
}

/// The gradients of q, k and v (those `need`ed) from the attention output's gradient.
#[inline(always)]
fn attention_backward(
    d: Dims,
    lb: &LayerBuffers,
    datt: &[f32],
    ds: &mut [f32],
    dqkv: &mut [f32],
    [need_q, need_k, need_v]: [bool; 3],
) {
    let (t, hd, w) = (d.t, d.head_dim, d.qkv);
    let rep = d.heads / d.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    for bi in 0..d.b {
        let rows = bi * t * w;
        for hh in 0..d.heads {
            let kvh = hh / rep;
            // The first head of a group overwrites its k and v gradients; the others add.
            let acc = hh % rep != 0;
            let q = &lb.qkv[rows + hh * hd..];
            let k = &lb.qkv[rows + d.q + kvh * hd..];
            let v = &lb.qkv[rows + d.q + d.kv + kvh * hd..];
            let p = &lb.probs[(bi * d.heads + hh) * t * t..][..t * t];
            let dout = &datt[bi * t * d.q + hh * hd..];
            if need_v {
                // dV = Pᵀ·dO: key rows c0..c1 see query rows c0..t.
                let dv = &mut dqkv[rows + d.q + d.kv + kvh * hd..];
                for (c0, c1) in causal_blocks(t) {
                    let (dst, pa) = (&mut dv[c0 * w..], &p[c0 * t + c0..]);
                    at_b(
                        (c1 - c0, hd, t - c0),
                        dst,
                        w,
                        acc,
                        pa,
                        t,
                        &dout[c0 * d.q..],
                        d.q,
                        1.0,
                    );
                }
            }
            if !(need_q || need_k) {
                continue;
            }
            // dP = dO·Vᵀ, then dS = scale · P ∘ (dP − rowsum(P ∘ dP)).
            for (r0, r1) in causal_blocks(t) {
                a_bt(
                    (r1 - r0, r1, hd),
                    &mut ds[r0 * t..],
                    t,
                    false,
                    &dout[r0 * d.q..],
                    d.q,
                    v,
                    w,
                    1.0,
                );
            }
            for (i, (dr, pr)) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)).enumerate() {
                let (seen, rest) = dr.split_at_mut(i + 1);
                let dot = dot(seen, &pr[..i + 1]);
                for (g, &pv) in seen.iter_mut().zip(pr) {
                    *g = scale * pv * (*g - dot);
                }
                rest.fill(0.0);
            }
            if need_q {
                let dq = &mut dqkv[rows + hh * hd..];
                for (r0, r1) in causal_blocks(t) {
                    a_b(
                        (r1 - r0, hd, r1),
                        &mut dq[r0 * w..],
                        w,
                        false,
                        &ds[r0 * t..],
                        t,
                        k,
                        w,
                        1.0,
                    );
                }
            }
            if need_k {
                let dk = &mut dqkv[rows + d.q + kvh * hd..];
                for (c0, c1) in causal_blocks(t) {
                    let (dst, sa) = (&mut dk[c0 * w..], &ds[c0 * t + c0..]);
                    at_b(
                        (c1 - c0, hd, t - c0),
                        dst,
                        w,
                        acc,
                        sa,
                        t,
                        &q[c0 * w..],
                        w,
                        1.0,
                    );
                }
            }
        }
    }
}
