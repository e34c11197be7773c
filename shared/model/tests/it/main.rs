//! Integration tests of the shared library against independent references (HF transformers,
//! PEFT) and its own invariants.

mod model;
mod train;
