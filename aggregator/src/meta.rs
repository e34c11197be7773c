//! Meta-learning of the shared adapter initialization θ: each committed round applies a
//! server step to the mean client delta Δ̄ (Reptile / FedAvg, FedAvgM, FedAdam).

use fedpersona_privacy::tensors::{AdapterTensors, DeltaError};

use crate::config::ServerOptimizer;

/// θ and the server optimizer's state.
#[derive(Debug, Clone, PartialEq)]
pub struct MetaState {
    /// All adapter tensors (PEFT names), including a frozen A under FFA-LoRA.
    pub theta: AdapterTensors,
    /// First moment (FedAvgM's momentum or FedAdam's m), over the trained tensors.
    pub m: Option<AdapterTensors>,
    /// FedAdam's second moment.
    pub v: Option<AdapterTensors>,
    /// Server steps taken.
    pub step: u64,
    /// Adaptive clipping: the clip norm of the next round.
    pub clip_norm: Option<f64>,
}

impl MetaState {
    pub fn new(theta: AdapterTensors) -> Self {
        MetaState {
            theta,
            m: None,
            v: None,
            step: 0,
            clip_norm: None,
        }
    }

    /// One server step with the round's mean delta (over the trained tensors, a subset of θ).
    /// Nothing changes if the delta does not fit θ.
    pub fn apply(&mut self, opt: ServerOptimizer, mean: &AdapterTensors) -> Result<(), DeltaError> {
        for (name, t) in mean.iter() {
            match self.theta.get(name) {
                Some(th) if th.shape == t.shape => {}
                Some(th) => {
                    return Err(DeltaError::Mismatch(format!(
                        "{name}: delta shape {:?}, θ shape {:?}",
                        t.shape, th.shape
                    )))
                }
                None => return Err(DeltaError::Mismatch(format!("{name} is not in θ"))),
            }
        }
        let zeros = || {
            let mut z = mean.clone();
            z.scale(0.0);
            z
        };
        let step: AdapterTensors = match opt {
            ServerOptimizer::Sgd { lr } => {
                let mut s = mean.clone();
                s.scale(lr as f32);
                s
            }
            ServerOptimizer::Momentum { lr, momentum } => {
                let m = self.m.get_or_insert_with(zeros);
                m.scale(momentum as f32);
                m.add_scaled(mean, 1.0)?;
                let mut s = m.clone();
                s.scale(lr as f32);
                s
            }
            ServerOptimizer::Adam {
                lr,
                beta1,
                beta2,
                tau,
            } => {
                let m = self.m.get_or_insert_with(zeros);
                m.scale(beta1 as f32);
                m.add_scaled(mean, (1.0 - beta1) as f32)?;
                let v = self.v.get_or_insert_with(zeros);
                let mut sq = mean.clone();
                sq.map_values(|x| x * x);
                v.scale(beta2 as f32);
                v.add_scaled(&sq, (1.0 - beta2) as f32)?;
                let mut s = m.clone();
                s.zip_map(v, |m, v| {
                    (lr * f64::from(m) / (f64::from(v).sqrt() + tau)) as f32
                })?;
                s
            }
        };
        for (name, t) in step.iter() {
            self.theta.add_to(name, &t.data)?;
        }
        self.step += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(v: f32) -> AdapterTensors {
        let mut t = AdapterTensors::default();
        t.insert("b".into(), vec![1], vec![v]);
        t
    }

    fn theta() -> AdapterTensors {
        let mut t = one(1.0);
        t.insert("a".into(), vec![1], vec![5.0]);
        t
    }

    #[test]
    fn fedavg_and_reptile_steps() {
        let mut s = MetaState::new(theta());
        s.apply(ServerOptimizer::Sgd { lr: 1.0 }, &one(0.5))
            .unwrap();
        assert_eq!(s.theta.get("b").unwrap().data, vec![1.5]);
        assert_eq!(
            s.theta.get("a").unwrap().data,
            vec![5.0],
            "untrained tensors stay"
        );
        s.apply(ServerOptimizer::Sgd { lr: 0.5 }, &one(1.0))
            .unwrap();
        assert_eq!(s.theta.get("b").unwrap().data, vec![2.0]);
        assert_eq!(s.step, 2);
    }

    #[test]
    fn fedavgm_accumulates_momentum() {
        let mut s = MetaState::new(theta());
        let opt = ServerOptimizer::Momentum {
            lr: 1.0,
            momentum: 0.5,
        };
        s.apply(opt, &one(1.0)).unwrap(); // m = 1, θ = 2
        s.apply(opt, &one(1.0)).unwrap(); // m = 1.5, θ = 3.5
        assert_eq!(s.theta.get("b").unwrap().data, vec![3.5]);
    }

    #[test]
    fn fedadam_matches_hand_computation() {
        // Reddi et al. 2021, Algorithm 2 (FedAdam), v₀ = 0:
        // m1 = 0.1·0.2 = 0.02; v1 = 0.01·0.04 = 0.0004; θ = 1 + 0.1·0.02/(0.02 + 0.001)
        let mut s = MetaState::new(theta());
        let opt = ServerOptimizer::Adam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        };
        s.apply(opt, &one(0.2)).unwrap();
        let want = 1.0 + 0.1 * 0.02 / (0.0004f64.sqrt() + 1e-3);
        assert!((f64::from(s.theta.get("b").unwrap().data[0]) - want).abs() < 1e-6);
    }

    #[test]
    fn a_delta_that_does_not_fit_changes_nothing() {
        let mut s = MetaState::new(theta());
        let mut bad = AdapterTensors::default();
        bad.insert("zzz".into(), vec![1], vec![1.0]);
        assert!(s.apply(ServerOptimizer::Sgd { lr: 1.0 }, &bad).is_err());
        assert_eq!(s, MetaState::new(theta()));
    }
}
