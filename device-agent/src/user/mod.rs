//! The user profiling layer: what the device knows about its user, and nothing of it leaves
//! the device. The encrypted interaction [`store`], the [`profile`] computed from it, and the
//! user's [`consent`] to federated participation. The layers above read it: adaptation
//! weighs and schedules by it, the local API fronts it, the participant asks consent.

pub mod consent;
pub mod profile;
pub mod store;
