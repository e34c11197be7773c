//! The local API: apps on the device talk to their user's agent through a gRPC service
//! (`fedpersona.local.v1.LocalAgent`) on a Unix domain socket of mode 0600, so only the
//! user's own processes can reach it and nothing is exposed on the network. It fronts the
//! encrypted interaction store, the profile, generation with the personal adapter, export,
//! forgetting and consent. `device-agent local serve` runs it; the other `device-agent
//! local` commands are its command-line client. Generated types stay in
//! [`cli`] and [`service`].
//!
//! [`state`] is what the API works on (the store, the personal adapter, forgetting, the
//! adaptation schedule), [`service`] is the gRPC service over it, [`error`] the one mapping
//! of its failures to gRPC status, and [`cli`] the command-line client.

pub mod cli;
pub mod error;
pub mod service;
pub mod state;

pub use cli::{connect, run, LocalCommand};
pub use error::LocalError;
pub use service::{bind, serve, Bound};
pub use state::{AdaptedState, Event, Forgotten, LocalState, Schedule};

/// Milliseconds since the epoch, now.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
