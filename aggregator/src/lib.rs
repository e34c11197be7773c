//! The aggregator: the server side of fedpersona. For now it owns producing the shipped base
//! model (`aggregator pretrain`) and privacy planning (`aggregator privacy`); federated rounds
//! build on them.

pub mod pretrain;
pub mod privacy;
