//! fedpersona's privacy crate: everything an adapter delta goes through between the
//! device's training step and the aggregator's sum, and the arithmetic that says what that
//! costs in privacy. Pure computation: no model, no candle, no I/O, no async runtime.
//!
//! * [`tensors`]: adapter values as sorted, named, flat f32 arrays.
//! * [`protect`]: clipping, noise and encoding: the only constructors of what may leave a
//!   device ([`protect::Privatized`], [`protect::Quantized`]).
//! * [`mode`]: every formula of the privacy modes: q, σ, the distributed noise share, the
//!   float-noise grid, the SecAgg grid, the release's denominator, the budget.
//! * [`noise`]: OpenDP's exact samplers. [`accountant`]: RDP and PLD accounting and their
//!   inverses.
//! * [`adaptive_clip`]: the clip norm that follows a quantile of update norms.
//! * [`sampling`]: device-side Poisson sampling and the binomial cohort it gives.
//! * [`snr`]: the signal-to-noise ratio of a round's mean, planned and measured.
//! * [`codec`]: the `FPD1` update format. [`secagg`]: SecAgg+ state machines.

pub mod accountant;
pub mod adaptive_clip;
pub mod codec;
pub mod mode;
pub mod noise;
pub mod protect;
pub mod sampling;
pub mod secagg;
pub mod snr;
pub mod tensors;

pub use tensors::AdapterTensors;
