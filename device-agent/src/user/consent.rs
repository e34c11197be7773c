//! The user's consent to federated participation, kept in the agent's folder
//! (`consent.json`, mode 0600, written atomically). Off means the agent neither checks in
//! nor uploads anything; on-device personalization works either way. Running `device-agent
//! run` is the opt-in, so a folder without the file counts as consent given; the local API's
//! `SetConsent` writes the file, and the agent reads it before every round and again before
//! every upload, so a change takes effect without a restart.

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::fs::StateDir;

/// The recorded choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    pub federated: bool,
    /// When the user last changed it (ms since the epoch; 0: never).
    pub changed_ms: i64,
}

impl Default for Consent {
    fn default() -> Self {
        Consent {
            federated: true,
            changed_ms: 0,
        }
    }
}

impl Consent {
    /// The consent recorded in `dir` (given, if nothing is recorded). A file that cannot be
    /// read or parsed is an error: the agent then does not take part.
    pub fn load(dir: &StateDir) -> anyhow::Result<Consent> {
        let path = dir.consent();
        match std::fs::read(&path) {
            Ok(b) => {
                serde_json::from_slice(&b).with_context(|| format!("{} is corrupt", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Consent::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Records the user's choice.
    pub fn set(dir: &StateDir, federated: bool, now_ms: i64) -> anyhow::Result<Consent> {
        dir.create()?;
        let c = Consent {
            federated,
            changed_ms: now_ms,
        };
        crate::fs::write_private(
            &dir.consent(),
            &serde_json::to_vec_pretty(&c).expect("plain struct"),
        )?;
        Ok(c)
    }

    /// Whether the agent may take part now: only with consent recorded as given (or never
    /// recorded); an unreadable record counts as refusal.
    pub fn allows_federation(dir: &StateDir) -> bool {
        match Consent::load(dir) {
            Ok(c) => c.federated,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "consent unreadable: not taking part");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_to_given_and_persists_a_refusal() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = &StateDir::new(tmp.path());
        assert!(Consent::allows_federation(dir));
        Consent::set(dir, false, 42).unwrap();
        assert_eq!(
            Consent::load(dir).unwrap(),
            Consent {
                federated: false,
                changed_ms: 42
            }
        );
        assert!(!Consent::allows_federation(dir));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.consent())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.consent(), b"{not json").unwrap();
        assert!(!Consent::allows_federation(dir), "unreadable = refused");
        Consent::set(dir, true, 43).unwrap();
        assert!(Consent::allows_federation(dir));
    }
}
