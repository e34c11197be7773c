//! fedpersona's composition root: it wires many device agents to an in-process aggregator
//! over loopback gRPC (`simulate`), measures how well each method personalizes held-out users
//! of a user-partitioned corpus (`corpus`), and trains the shipped base model on the public
//! plays (`pretrain`). It depends on both sides; neither side depends on it or on the other.

pub mod args;
pub mod corpus;
pub mod evaluation;
pub mod federation;
pub mod feedback;
pub mod methods;
pub mod plot;
pub mod pretrain;
pub mod pretrain_cli;
pub mod progress;
pub mod report;
pub mod scale;
pub mod settings;
pub mod simulate;
pub mod stats;
pub mod sweep;
