//! Each fused kernel against the plain chain of differentiable candle ops it replaces:
//! values and gradients.

use candle_core::{Var, D};

use super::*;

fn rand(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as f64 * 0.7311 + seed as f64 * 1.37).sin() * 1.5) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn close(a: &Tensor, b: &Tensor, tol: f32) {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    let d = d.to_scalar::<f32>().unwrap();
    assert!(d < tol, "max difference {d}");
}

/// Checks `fused` against `plain` on values, and on gradients of a weighted sum.
fn check(
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Tensor,
    plain: impl Fn(&[Tensor]) -> Tensor,
) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let a = fused(&ts);
    let b = plain(&ts);
    close(&a, &b, 1e-4);
    let w = rand(a.dims(), 99);
    let ga = (&a * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (&b * &w).unwrap().sum_all().unwrap().backward().unwrap();
    for v in &vars {
        close(
            ga.get(v).expect("fused gradient"),
            gb.get(v).expect("plain gradient"),
            1e-3,
        );
    }
}

#[test]
fn rms_norm_matches_plain() {
    check(
        &[rand(&[2, 3, 16], 1), rand(&[16], 2)],
        |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
        |t| {
            let inv = (t[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5)
                .unwrap()
                .sqrt()
                .unwrap()
                .recip()
                .unwrap();
            t[0].broadcast_mul(&inv)
                .unwrap()
                .broadcast_mul(&t[1])
                .unwrap()
        },
    );
}

#[test]
fn split_and_merge_heads_match_plain() {
    let (b, t, h, d, start) = (2usize, 4usize, 3usize, 8usize, 2usize);
    let n = start + t;
    let freqs: Vec<f32> = (0..n * d / 2)
        .map(|i| (i % 7) as f32 * 0.3 + (i / 7) as f32 * 0.1)
        .collect();
    // Tables in the cat(freqs, freqs) layout.
    let table = |f: fn(f32) -> f32| -> Vec<f32> {
        (0..n)
            .flat_map(|p| (0..d).map(move |i| (p, i % (d / 2))))
            .map(|(p, i)| f(freqs[p * d / 2 + i]))
            .collect()
    };
    let (cos, sin) = (table(f32::cos), table(f32::sin));
    let tables = RopeTables::new(cos.clone(), sin.clone(), d);
    let cos = Tensor::from_vec(cos, (n, d), &Device::Cpu)
        .unwrap()
        .narrow(0, start, t)
        .unwrap();
    let sin = Tensor::from_vec(sin, (n, d), &Device::Cpu)
        .unwrap()
        .narrow(0, start, t)
        .unwrap();
    let plain_split = |x: &Tensor| {
        x.reshape((b, t, h, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    check(
        &[rand(&[b, t, h * d], 4)],
        |x| split_heads(&x[0], h, Some((&tables, start))).unwrap(),
        |x| {
            let x = plain_split(&x[0]);
            let x1 = x.narrow(D::Minus1, 0, d / 2).unwrap();
            let x2 = x.narrow(D::Minus1, d / 2, d / 2).unwrap();
            let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
            (x.broadcast_mul(&cos).unwrap() + rot.broadcast_mul(&sin).unwrap()).unwrap()
        },
    );
    check(
        &[rand(&[b, t, h * d], 5)],
        |x| split_heads(&x[0], h, None).unwrap(),
        |x| plain_split(&x[0]),
    );
    check(
        &[rand(&[b, h, t, d], 6)],
        |x| merge_heads(&x[0]).unwrap(),
        |x| {
            x[0].transpose(1, 2)
                .unwrap()
                .reshape((b, t, h * d))
                .unwrap()
        },
    );
    assert!(split_heads(&rand(&[b, t, h * d], 4), h, Some((&tables, n))).is_err());
}

#[test]
fn attention_matches_plain() {
    for start in [0usize, 2] {
        let (t, s, d) = (5usize, 5 + start, 4usize);
        check(
            &[
                rand(&[2, 3, t, d], 30),
                rand(&[2, 3, s, d], 31),
                rand(&[2, 3, s, d], 32),
            ],
            |x| attention(&x[0], &x[1], &x[2], 0.5, start).unwrap(),
            |x| {
                let m: Vec<f32> = (0..t)
                    .flat_map(|i| {
                        (0..s).map(move |j| {
                            if j > start + i {
                                f32::NEG_INFINITY
                            } else {
                                0.0
                            }
                        })
                    })
                    .collect();
                let m = Tensor::from_vec(m, (t, s), &Device::Cpu).unwrap();
                let scores = (x[0].matmul(&x[1].t().unwrap()).unwrap() * 0.5).unwrap();
                let probs =
                    candle_nn::ops::softmax(&scores.broadcast_add(&m).unwrap(), D::Minus1).unwrap();
                probs.matmul(&x[2]).unwrap()
            },
        );
    }
}

#[test]
fn swiglu_matches_plain() {
    check(
        &[rand(&[3, 10], 5), rand(&[3, 10], 6)],
        |t| swiglu(&t[0], &t[1]).unwrap(),
        |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
    );
}

#[test]
fn frozen_mlp_matches_plain() {
    let (gate, up, down) = (rand(&[7, 4], 20), rand(&[7, 4], 21), rand(&[4, 7], 22));
    check(
        &[rand(&[5, 4], 23)],
        |x| frozen_mlp(&x[0], &gate, &up, &down).unwrap(),
        |x| {
            let g = x[0].matmul(&gate.t().unwrap()).unwrap();
            let u = x[0].matmul(&up.t().unwrap()).unwrap();
            (g.silu().unwrap() * u)
                .unwrap()
                .matmul(&down.t().unwrap())
                .unwrap()
        },
    );
}

#[test]
fn cross_entropy_matches_plain() {
    let targets = Tensor::new(&[3u32, 0, 7, 7, 1], &Device::Cpu).unwrap();
    check(
        &[rand(&[5, 8], 7)],
        |t| cross_entropy(&t[0], &targets).unwrap(),
        |t| {
            let ls = candle_nn::ops::log_softmax(&t[0], D::Minus1).unwrap();
            ls.gather(&targets.unsqueeze(1).unwrap(), 1)
                .unwrap()
                .squeeze(1)
                .unwrap()
                .neg()
                .unwrap()
        },
    );
    assert!(cross_entropy(
        &rand(&[5, 8], 7),
        &Tensor::new(&[8u32, 0, 0, 0, 0], &Device::Cpu).unwrap()
    )
    .is_err());
}

#[test]
fn lora_linear_matches_plain() {
    let w = rand(&[6, 5], 10);
    for frozen_a in [false, true] {
        let x = Var::from_tensor(&rand(&[7, 5], 11)).unwrap();
        let a = Var::from_tensor(&rand(&[2, 5], 12)).unwrap();
        let b = Var::from_tensor(&rand(&[6, 2], 13)).unwrap();
        let a_t = if frozen_a {
            a.as_tensor().detach()
        } else {
            a.as_tensor().clone()
        };
        let fused = lora_linear(x.as_tensor(), &w, &a_t, b.as_tensor(), 1.5).unwrap();
        let plain = (x.as_tensor().matmul(&w.t().unwrap()).unwrap()
            + (x.as_tensor()
                .matmul(&a_t.t().unwrap())
                .unwrap()
                .matmul(&b.as_tensor().t().unwrap())
                .unwrap()
                * 1.5)
                .unwrap())
        .unwrap();
        close(&fused, &plain, 1e-4);
        let wts = rand(fused.dims(), 14);
        let gf = (&fused * &wts)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gp = (&plain * &wts)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        close(
            gf.get(x.as_tensor()).unwrap(),
            gp.get(x.as_tensor()).unwrap(),
            1e-3,
        );
        close(
            gf.get(b.as_tensor()).unwrap(),
            gp.get(b.as_tensor()).unwrap(),
            1e-3,
        );
        if frozen_a {
            assert!(gf.get(a.as_tensor()).is_none());
        } else {
            close(
                gf.get(a.as_tensor()).unwrap(),
                gp.get(a.as_tensor()).unwrap(),
                1e-3,
            );
        }
    }
}

#[test]
fn frozen_linear_matches_matmul_and_skips_the_weight_gradient() {
    let x = Var::from_tensor(&rand(&[6, 5], 8)).unwrap();
    let w = rand(&[4, 5], 9);
    let a = linear(x.as_tensor(), &w).unwrap();
    let b = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
    close(&a, &b, 1e-5);
    let ga = a.sum_all().unwrap().backward().unwrap();
    let gb = b.sum_all().unwrap().backward().unwrap();
    close(
        ga.get(x.as_tensor()).unwrap(),
        gb.get(x.as_tensor()).unwrap(),
        1e-5,
    );
    // A trainable weight still gets its gradient (plain matmul path).
    let wv = Var::from_tensor(&w).unwrap();
    let c = linear(x.as_tensor(), wv.as_tensor()).unwrap();
    assert!(c
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get(wv.as_tensor())
        .is_some());
}
