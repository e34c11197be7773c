//! What the participant keeps between runs: its key, and its enrolment and progress.

use anyhow::Context;
use fedpersona_proto::auth;
use serde::{Deserialize, Serialize};

use crate::fs::{write_private, StateDir};

/// What the agent keeps between runs (besides its key).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct AgentState {
    pub device_id: Option<String>,
    pub last_round: u64,
    pub rounds_reported: u64,
    /// The last round this device drew for under Poisson sampling, and what it drew: kept
    /// before the device acts on it, so a restart never draws a round twice.
    #[serde(default)]
    pub draw: Option<Draw>,
}

/// One round's participation draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Draw {
    pub round: u64,
    pub joined: bool,
}

/// The device's key: created once, mode 0600.
pub(crate) fn load_or_create_key(dir: &StateDir) -> anyhow::Result<Vec<u8>> {
    let path = dir.device_key();
    if path.exists() {
        let key = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        auth::public_key(&key).with_context(|| format!("{} is not a valid key", path.display()))?;
        return Ok(key);
    }
    let key = auth::generate_key()?;
    write_private(&path, &key)?;
    Ok(key)
}

pub(crate) fn load_state(dir: &StateDir) -> anyhow::Result<AgentState> {
    let path = dir.agent_state();
    match std::fs::read(&path) {
        Ok(b) => {
            serde_json::from_slice(&b).with_context(|| format!("{} is corrupt", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AgentState::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

pub(crate) fn save_state(dir: &StateDir, s: &AgentState) -> anyhow::Result<()> {
    let path = dir.agent_state();
    write_private(&path, &serde_json::to_vec_pretty(s).expect("plain struct"))
}
