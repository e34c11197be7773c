//! The aggregator: the server side of fedpersona. It runs federated rounds over gRPC
//! (`serve`), keeps the meta-learned shared adapter initialization, the privacy ledger and its budget,
//! and privacy planning (`privacy`).

pub mod aggregate;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod config;
pub mod connections;
pub mod error;
pub mod meta;
pub mod metrics;
pub mod privacy;
pub mod round;
pub mod secure;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
pub mod versions;
