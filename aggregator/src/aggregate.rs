//! Streaming aggregation: a running weighted sum of validated updates, memory O(adapter size)
//! however many devices report. Partial sums merge (sum and weight), so leaf aggregators can
//! forward them to a root.

use fedpersona_privacy::tensors::AdapterTensors;

/// The layout every update of a round must have: tensor names and shapes (the adapter's
/// trainable tensors), and the L2 bound.
#[derive(Debug, Clone)]
pub struct UpdateSpec {
    shapes: Vec<(String, Vec<usize>)>,
    clip_norm: f64,
}

/// Why an update was refused (before it touched any state).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UpdateRejection {
    #[error("update has tensor {0}, which the adapter does not train")]
    UnexpectedTensor(String),
    #[error("update lacks tensor {0}")]
    MissingTensor(String),
    #[error("tensor {name} has shape {got:?}, expected {want:?}")]
    WrongShape {
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("tensor {0} has NaN or infinite values")]
    NonFinite(String),
    #[error("update norm {norm} exceeds the clip norm {bound}")]
    NormTooLarge { norm: f64, bound: f64 },
}

impl UpdateSpec {
    pub fn new(shapes: Vec<(String, Vec<usize>)>, clip_norm: f64) -> Self {
        let mut shapes = shapes;
        shapes.sort();
        UpdateSpec { shapes, clip_norm }
    }

    /// Total values in an update.
    pub fn num_values(&self) -> usize {
        self.shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    pub fn shapes(&self) -> &[(String, Vec<usize>)] {
        &self.shapes
    }

    /// The L2 bound uploads are held to when a round sets none of its own.
    pub fn clip_norm(&self) -> f64 {
        self.clip_norm
    }

    /// Checks names, shapes, finiteness and the norm bound.
    pub fn check(&self, update: &AdapterTensors) -> Result<(), UpdateRejection> {
        self.check_within(update, self.clip_norm)
    }

    /// Checks names, shapes, finiteness and the L2 bound `clip_norm`.
    pub fn check_within(
        &self,
        update: &AdapterTensors,
        clip_norm: f64,
    ) -> Result<(), UpdateRejection> {
        if let Some(extra) = update.names().find(|n| {
            self.shapes
                .binary_search_by(|(s, _)| s.as_str().cmp(n))
                .is_err()
        }) {
            return Err(UpdateRejection::UnexpectedTensor(extra.clone()));
        }
        for (name, want) in &self.shapes {
            let t = update
                .get(name)
                .ok_or_else(|| UpdateRejection::MissingTensor(name.clone()))?;
            if &t.shape != want {
                return Err(UpdateRejection::WrongShape {
                    name: name.clone(),
                    got: t.shape.clone(),
                    want: want.clone(),
                });
            }
            if t.data.iter().any(|v| !v.is_finite()) {
                return Err(UpdateRejection::NonFinite(name.clone()));
            }
        }
        let norm = update.l2_norm();
        // The device makes the decoded norm fit exactly; allow only f32 rounding of the bound.
        let bound = clip_norm * (1.0 + 1e-6);
        if norm > bound {
            return Err(UpdateRejection::NormTooLarge {
                norm,
                bound: clip_norm,
            });
        }
        Ok(())
    }
}

/// Σ wᵢ·Δᵢ and Σ wᵢ over the reports of a round, in f64.
#[derive(Debug, Clone)]
pub struct RunningSum {
    spec: UpdateSpec,
    sums: Vec<Vec<f64>>,
    weight: f64,
    count: u64,
}

impl RunningSum {
    pub fn new(spec: UpdateSpec) -> Self {
        let sums = spec
            .shapes
            .iter()
            .map(|(_, s)| vec![0.0; s.iter().product()])
            .collect();
        RunningSum {
            spec,
            sums,
            weight: 0.0,
            count: 0,
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn weight(&self) -> f64 {
        self.weight
    }

    /// Adds a checked update (see [`UpdateSpec::check`]) with weight `w > 0`.
    pub fn add(&mut self, update: &AdapterTensors, w: f64) -> Result<(), UpdateRejection> {
        self.spec.check(update)?;
        for ((name, _), sum) in self.spec.shapes.iter().zip(&mut self.sums) {
            let t = update.get(name).expect("checked above");
            for (s, &x) in sum.iter_mut().zip(&t.data) {
                *s += w * f64::from(x);
            }
        }
        self.weight += w;
        self.count += 1;
        Ok(())
    }

    /// Adds another partial sum over the same layout.
    pub fn merge(&mut self, other: &RunningSum) -> Result<(), UpdateRejection> {
        if other.spec.shapes != self.spec.shapes {
            return Err(UpdateRejection::UnexpectedTensor(
                "partial sums of different layouts".into(),
            ));
        }
        for (a, b) in self.sums.iter_mut().zip(&other.sums) {
            a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        }
        self.weight += other.weight;
        self.count += other.count;
        Ok(())
    }

    /// Adds the sum of `count` unweighted updates that arrived already summed (secure
    /// aggregation), as flat values in the layout's order.
    pub fn add_sum(&mut self, flat: &[f64], count: u64) -> Result<(), UpdateRejection> {
        if flat.len() != self.spec.num_values() {
            return Err(UpdateRejection::WrongShape {
                name: "secure aggregate".into(),
                got: vec![flat.len()],
                want: vec![self.spec.num_values()],
            });
        }
        if flat.iter().any(|v| !v.is_finite()) {
            return Err(UpdateRejection::NonFinite("secure aggregate".into()));
        }
        let mut rest = flat;
        for sum in &mut self.sums {
            let (head, tail) = rest.split_at(sum.len());
            sum.iter_mut().zip(head).for_each(|(s, x)| *s += x);
            rest = tail;
        }
        self.weight += count as f64;
        self.count += count;
        Ok(())
    }

    /// The differentially private release of the round: N(0, stddev²) added to every value
    /// of the sum ([`fedpersona_privacy::noise::add_gaussian`] on the grid 2^k), divided by a
    /// fixed `denominator` (the expected cohort, so the count itself is not revealed).
    pub fn noised_mean(
        &self,
        stddev: f64,
        k: i32,
        denominator: f64,
    ) -> Result<AdapterTensors, fedpersona_privacy::noise::NoiseError> {
        let mut flat: Vec<f64> = self.sums.iter().flatten().copied().collect();
        fedpersona_privacy::noise::add_gaussian(&mut flat, stddev, k)?;
        let values: Vec<f32> = flat.iter().map(|s| (s / denominator) as f32).collect();
        Ok(AdapterTensors::from_flat(&self.spec.shapes, &values).expect("the layout's size"))
    }

    /// The weighted mean Σ wᵢΔᵢ / Σ wᵢ (None when nothing was added).
    pub fn mean(&self) -> Option<AdapterTensors> {
        if self.count == 0 || self.weight <= 0.0 {
            return None;
        }
        let mut out = AdapterTensors::default();
        for ((name, shape), sum) in self.spec.shapes.iter().zip(&self.sums) {
            out.insert(
                name.clone(),
                shape.clone(),
                sum.iter().map(|s| (s / self.weight) as f32).collect(),
            );
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec() -> UpdateSpec {
        UpdateSpec::new(vec![("a".into(), vec![2, 3]), ("b".into(), vec![4])], 100.0)
    }

    fn update(v: &[f32]) -> AdapterTensors {
        let mut t = AdapterTensors::default();
        t.insert("a".into(), vec![2, 3], v[..6].to_vec());
        t.insert("b".into(), vec![4], v[6..10].to_vec());
        t
    }

    proptest! {
        #[test]
        fn streaming_mean_equals_naive_mean(
            ups in proptest::collection::vec((proptest::collection::vec(-5f32..5.0, 10), 0.1f64..10.0), 1..20),
            split in 0usize..20,
        ) {
            let mut all = RunningSum::new(spec());
            let mut left = RunningSum::new(spec());
            let mut right = RunningSum::new(spec());
            for (i, (v, w)) in ups.iter().enumerate() {
                all.add(&update(v), *w).unwrap();
                if i < split { left.add(&update(v), *w).unwrap() } else { right.add(&update(v), *w).unwrap() }
            }
            left.merge(&right).unwrap();
            let wsum: f64 = ups.iter().map(|(_, w)| w).sum();
            let mean = all.mean().unwrap();
            let merged = left.mean().unwrap();
            for j in 0..10 {
                let naive: f64 = ups.iter().map(|(v, w)| w * f64::from(v[j])).sum::<f64>() / wsum;
                let (name, k) = if j < 6 { ("a", j) } else { ("b", j - 6) };
                let got = mean.get(name).unwrap().data[k];
                prop_assert!((f64::from(got) - naive).abs() < 1e-5);
                prop_assert!((merged.get(name).unwrap().data[k] - got).abs() < 1e-5);
            }
            prop_assert_eq!(all.count(), ups.len() as u64);
        }
    }

    #[test]
    fn bad_updates_are_rejected_without_changing_the_sum() {
        let mut s = RunningSum::new(spec());
        s.add(&update(&[1.0; 10]), 1.0).unwrap();
        let before = s.mean().unwrap();

        let mut nan = update(&[1.0; 10]);
        nan.insert("b".into(), vec![4], vec![1.0, f32::NAN, 0.0, 0.0]);
        assert_eq!(
            s.add(&nan, 1.0),
            Err(UpdateRejection::NonFinite("b".into()))
        );

        let mut wrong = AdapterTensors::default();
        wrong.insert("a".into(), vec![3, 2], vec![0.0; 6]);
        wrong.insert("b".into(), vec![4], vec![0.0; 4]);
        assert!(matches!(
            s.add(&wrong, 1.0),
            Err(UpdateRejection::WrongShape { .. })
        ));

        let mut extra = update(&[0.0; 10]);
        extra.insert("c".into(), vec![1], vec![0.0]);
        assert!(matches!(
            s.add(&extra, 1.0),
            Err(UpdateRejection::UnexpectedTensor(_))
        ));

        let mut missing = AdapterTensors::default();
        missing.insert("a".into(), vec![2, 3], vec![0.0; 6]);
        assert!(matches!(
            s.add(&missing, 1.0),
            Err(UpdateRejection::MissingTensor(_))
        ));

        assert!(matches!(
            s.add(&update(&[100.0; 10]), 1.0),
            Err(UpdateRejection::NormTooLarge { .. })
        ));

        assert_eq!(s.count(), 1);
        assert_eq!(s.mean().unwrap(), before);
    }
}
