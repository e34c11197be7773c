//! Adapter tensors ([`AdapterTensors`], flat f32 values owned by the privacy crate) to and
//! from candle tensors and safetensors files.

use candle_core::{DType, Device, Tensor};
use fedpersona_privacy::tensors::{AdapterTensors, DeltaError};

/// From candle tensors (any float dtype), checking that each is finite.
pub fn from_named(named: Vec<(String, Tensor)>) -> Result<AdapterTensors, DeltaError> {
    let mut out = AdapterTensors::default();
    for (name, t) in named {
        let data = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| DeltaError::Bad(name.clone(), e.to_string()))?;
        if data.iter().any(|v| !v.is_finite()) {
            return Err(DeltaError::Bad(
                name,
                "contains NaN or infinite values".into(),
            ));
        }
        out.insert(name, t.dims().to_vec(), data);
    }
    Ok(out)
}

/// Parses a safetensors file's bytes (any float dtype; values must be finite).
pub fn from_safetensors(bytes: &[u8]) -> Result<AdapterTensors, DeltaError> {
    let map = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
        .map_err(|e| DeltaError::Bad("safetensors".into(), e.to_string()))?;
    from_named(map.into_iter().collect())
}

/// As candle tensors on the CPU, for saving.
pub fn into_named(tensors: AdapterTensors) -> Vec<(String, Tensor)> {
    tensors
        .into_iter()
        .map(|(n, t)| {
            let tensor = Tensor::from_vec(t.data, t.shape, &Device::Cpu)
                .expect("shape and data length agree");
            (n, tensor)
        })
        .collect()
}
