//! Federated participation: the participant (`device-agent run`), its configuration and
//! credentials, the task it is given, and the gRPC client it talks through. The only way
//! anything leaves the device: a task's protected delta (clipped, noised as the privacy mode
//! asks, encoded or masked for secure aggregation), built in [`task`].

pub mod client;
pub mod config;
mod credentials;
pub mod participant;
pub mod task;

pub use config::AgentConfig;
pub use participant::{run_from_config, Agent, Joined, Report, RunSummary, Step};
