//! Adapter tensors as flat, named f32 arrays: what travels between devices and the
//! aggregator, and what is clipped, quantized and summed.

use std::collections::BTreeMap;

/// One tensor: its shape and row-major values.
#[derive(Debug, Clone, PartialEq)]
pub struct FlatTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Named tensors in a fixed (sorted) order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdapterTensors {
    tensors: BTreeMap<String, FlatTensor>,
}

impl IntoIterator for AdapterTensors {
    type Item = (String, FlatTensor);
    type IntoIter = std::collections::btree_map::IntoIter<String, FlatTensor>;

    fn into_iter(self) -> Self::IntoIter {
        self.tensors.into_iter()
    }
}

/// Errors from combining adapter tensors.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("tensor sets differ: {0}")]
    Mismatch(String),
    #[error("tensor {0}: {1}")]
    Bad(String, String),
}

impl AdapterTensors {
    pub fn insert(&mut self, name: String, shape: Vec<usize>, data: Vec<f32>) {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        self.tensors.insert(name, FlatTensor { shape, data });
    }

    pub fn get(&self, name: &str) -> Option<&FlatTensor> {
        self.tensors.get(name)
    }

    /// Takes the tensor `name` out.
    pub fn remove(&mut self, name: &str) -> Option<FlatTensor> {
        self.tensors.remove(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &FlatTensor)> {
        self.tensors.iter()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    fn check_same_layout(&self, other: &Self) -> Result<(), DeltaError> {
        if self.tensors.len() != other.tensors.len() {
            return Err(DeltaError::Mismatch(format!(
                "{} tensors vs {}",
                self.tensors.len(),
                other.tensors.len()
            )));
        }
        for ((a, ta), (b, tb)) in self.tensors.iter().zip(other.tensors.iter()) {
            if a != b || ta.shape != tb.shape {
                return Err(DeltaError::Mismatch(format!(
                    "{a} {:?} vs {b} {:?}",
                    ta.shape, tb.shape
                )));
            }
        }
        Ok(())
    }

    /// `self - base`, tensor by tensor.
    pub fn sub(&self, base: &Self) -> Result<Self, DeltaError> {
        let mut out = self.clone();
        out.add_scaled(base, -1.0)?;
        Ok(out)
    }

    /// `self += factor · other`.
    pub fn add_scaled(&mut self, other: &Self, factor: f32) -> Result<(), DeltaError> {
        self.check_same_layout(other)?;
        for (t, o) in self.tensors.values_mut().zip(other.tensors.values()) {
            t.data
                .iter_mut()
                .zip(&o.data)
                .for_each(|(x, y)| *x += factor * y);
        }
        Ok(())
    }

    pub fn scale(&mut self, factor: f32) {
        self.tensors
            .values_mut()
            .for_each(|t| t.data.iter_mut().for_each(|x| *x *= factor));
    }

    /// Applies `f` to every value.
    pub fn map_values(&mut self, f: impl Fn(f32) -> f32) {
        self.tensors
            .values_mut()
            .for_each(|t| t.data.iter_mut().for_each(|x| *x = f(*x)));
    }

    /// `self[i] = f(self[i], other[i])` over the same layout.
    pub fn zip_map(&mut self, other: &Self, f: impl Fn(f32, f32) -> f32) -> Result<(), DeltaError> {
        self.check_same_layout(other)?;
        for (t, o) in self.tensors.values_mut().zip(other.tensors.values()) {
            t.data
                .iter_mut()
                .zip(&o.data)
                .for_each(|(x, y)| *x = f(*x, *y));
        }
        Ok(())
    }

    /// Adds `values` to the tensor `name` (same length).
    pub fn add_to(&mut self, name: &str, values: &[f32]) -> Result<(), DeltaError> {
        let t = self
            .tensors
            .get_mut(name)
            .ok_or_else(|| DeltaError::Mismatch(format!("no tensor {name}")))?;
        if t.data.len() != values.len() {
            return Err(DeltaError::Mismatch(format!(
                "{name}: {} values vs {}",
                t.data.len(),
                values.len()
            )));
        }
        t.data.iter_mut().zip(values).for_each(|(x, y)| *x += y);
        Ok(())
    }

    /// The tensors whose names satisfy `keep`.
    pub fn filter(&self, keep: impl Fn(&str) -> bool) -> Self {
        AdapterTensors {
            tensors: self
                .tensors
                .iter()
                .filter(|(n, _)| keep(n))
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect(),
        }
    }

    /// Every value, tensor after tensor in name order: the layout secure aggregation sums.
    pub fn to_flat(&self) -> Vec<f32> {
        self.tensors
            .values()
            .flat_map(|t| t.data.iter().copied())
            .collect()
    }

    /// Overwrites every value from `values` in [`Self::to_flat`]'s order (same length).
    pub fn set_flat(&mut self, values: &[f32]) -> Result<(), DeltaError> {
        if values.len() != self.num_values() {
            return Err(DeltaError::Mismatch(format!(
                "{} values for an adapter of {}",
                values.len(),
                self.num_values()
            )));
        }
        let mut rest = values;
        for t in self.tensors.values_mut() {
            let (head, tail) = rest.split_at(t.data.len());
            t.data.copy_from_slice(head);
            rest = tail;
        }
        Ok(())
    }

    /// Tensors of the given names and shapes (sorted by name) filled from flat values.
    pub fn from_flat(shapes: &[(String, Vec<usize>)], values: &[f32]) -> Result<Self, DeltaError> {
        let mut out = AdapterTensors::default();
        for (name, shape) in shapes {
            let n = shape.iter().product();
            out.insert(name.clone(), shape.clone(), vec![0.0; n]);
        }
        out.set_flat(values)?;
        Ok(out)
    }

    /// Number of values over all tensors.
    pub fn num_values(&self) -> usize {
        self.tensors.values().map(|t| t.data.len()).sum()
    }

    /// Global L2 norm over every value (accumulated in f64).
    pub fn l2_norm(&self) -> f64 {
        self.tensors
            .values()
            .flat_map(|t| t.data.iter())
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_and_layout_checks() {
        let mut a = AdapterTensors::default();
        a.insert("x".into(), vec![2], vec![3.0, 4.0]);
        assert_eq!(a.l2_norm(), 5.0);
        let mut b = a.clone();
        b.scale(2.0);
        let d = b.sub(&a).unwrap();
        assert_eq!(d.get("x").unwrap().data, vec![3.0, 4.0]);
        let mut c = AdapterTensors::default();
        c.insert("y".into(), vec![2], vec![0.0, 0.0]);
        assert!(a.sub(&c).is_err());
    }
}
