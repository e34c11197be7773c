//! The aggregator: the server side of fedpersona. For now it owns producing the shipped base
//! model (`aggregator pretrain`); federated rounds build on it.

pub mod pretrain;
