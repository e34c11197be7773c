//! The aggregator's durable journal in SQLite: enrolled devices, rounds, committed adapter
//! versions and every accepted upload's nonce.
//!
//! A round's partial sum lives only in memory. It becomes durable in one step: the new global
//! adapter is written (atomically) first, then [`Store::commit_round`] records the round and
//! the version in one transaction. A crash before that transaction leaves the round `open`;
//! [`Store::recover`] marks it `abandoned` at start-up and its uploads are never counted, while
//! their nonces stay on record so a replay is still refused. Behind this small interface
//! SQLite is the embedded default; a shared database would replace it for several replicas.
//!
//! The schema and its migrations live in `schema`, the read-outs for `aggregator status` in
//! `status`.

mod schema;
mod status;

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

pub use status::{RoundRow, Summary};

/// Errors from the journal.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// (The cause is in the message, not the error's source: a chain printed with `{:#}`
    /// would say it twice.)
    #[error("database: {0}")]
    Db(rusqlite::Error),
    #[error("database schema version {0} is newer than this aggregator understands")]
    NewerSchema(i64),
    #[error("journal is inconsistent: {0}")]
    Inconsistent(String),
}

/// Why an upload could not be recorded.
#[derive(Debug, PartialEq, Eq)]
pub enum UploadConflict {
    /// The nonce was used before.
    Replay,
    /// The device already reported in this round.
    AlreadyReported,
}

/// Round states in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundState {
    Open,
    Committed,
    Abandoned,
}

impl RoundState {
    fn as_str(self) -> &'static str {
        match self {
            RoundState::Open => "open",
            RoundState::Committed => "committed",
            RoundState::Abandoned => "abandoned",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "open" => RoundState::Open,
            "committed" => RoundState::Committed,
            "abandoned" => RoundState::Abandoned,
            _ => return None,
        })
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Db(e)
    }
}

/// A committed global adapter version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRecord {
    pub version: u64,
    /// The round that produced it (None for the initial adapter).
    pub round: Option<u64>,
    pub sha256: Vec<u8>,
    /// The digest of every file of the version's folder (None: committed before there was
    /// one).
    pub state_sha256: Option<Vec<u8>>,
}

/// What start-up recovery found.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// The latest committed version, if any adapter was ever committed.
    pub latest: Option<VersionRecord>,
    /// The id the next round gets.
    pub next_round: u64,
    /// Rounds that were open at the crash, now abandoned.
    pub abandoned: Vec<u64>,
    pub rounds_committed: u64,
}

/// One round's entry in the privacy ledger: what the accountant composes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Charge {
    pub noise_multiplier: f64,
    pub sampling_rate: f64,
}

/// The newest row of `versions`.
fn latest_in(conn: &Connection) -> Result<Option<VersionRecord>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT version, round, sha256, state_sha256 FROM versions
             ORDER BY version DESC LIMIT 1",
            [],
            |r| {
                Ok(VersionRecord {
                    version: r.get::<_, i64>(0)? as u64,
                    round: r.get::<_, Option<i64>>(1)?.map(|v| v as u64),
                    sha256: r.get(2)?,
                    state_sha256: r.get(3)?,
                })
            },
        )
        .optional()?)
}

/// The journal. Calls are short; one connection behind a mutex.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating and migrating) the journal at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// Opens an existing journal read-only (for `aggregator status` beside a running server).
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn init(conn: Connection) -> Result<Store, StoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL + NORMAL: a committed transaction survives a process crash (kill -9); only an
        // OS crash may lose the last few, which recovery handles like any unfinished round.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        schema::migrate(&conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions),
        // so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// SQLite's own check of every page and index (`PRAGMA integrity_check`): None when the
    /// journal is sound, else what it found (its first lines).
    pub fn integrity_problems(&self) -> Result<Option<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("PRAGMA integrity_check(8)")?;
        let found: Vec<String> = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<_, _>>()?;
        Ok((found != ["ok"]).then(|| found.join("; ")))
    }

    /// The newest committed adapter version, if any.
    pub fn latest(&self) -> Result<Option<VersionRecord>, StoreError> {
        latest_in(&self.conn())
    }

    /// Rounds the journal opened without charging them to the privacy ledger.
    pub fn rounds_without_charge(&self) -> Result<u64, StoreError> {
        let n: i64 = self.conn().query_row(
            "SELECT count(*) FROM rounds WHERE id NOT IN (SELECT round FROM privacy_ledger)",
            [],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// Marks rounds left open by a crash as abandoned and reports where to resume.
    pub fn recover(&self, now_ms: i64) -> Result<Recovered, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let abandoned: Vec<u64> = {
            let mut stmt = tx.prepare("SELECT id FROM rounds WHERE state = 'open' ORDER BY id")?;
            let rows = stmt.query_map([], |r| r.get::<_, i64>(0))?;
            rows.map(|r| r.map(|v| v as u64))
                .collect::<Result<_, _>>()?
        };
        tx.execute(
            "UPDATE rounds SET state = 'abandoned', closed_at_ms = ?1,
                 reason = 'aggregator stopped before the round committed'
             WHERE state = 'open'",
            params![now_ms],
        )?;
        let latest = latest_in(&tx)?;
        let max_round: Option<i64> =
            tx.query_row("SELECT MAX(id) FROM rounds", [], |r| r.get(0))?;
        let rounds_committed: i64 = tx.query_row(
            "SELECT COUNT(*) FROM rounds WHERE state = 'committed'",
            [],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok(Recovered {
            latest,
            next_round: max_round.map_or(1, |m| m as u64 + 1),
            abandoned,
            rounds_committed: rounds_committed as u64,
        })
    }

    /// Records the initial global adapter (version 0).
    pub fn record_initial_version(
        &self,
        sha256: &[u8],
        state_sha256: &[u8],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO versions (version, round, sha256, state_sha256, created_at_ms)
             VALUES (0, NULL, ?1, ?2, ?3)",
            params![sha256, state_sha256, now_ms],
        )?;
        Ok(())
    }

    /// Enrolls a device. Returns false if the public key is already enrolled.
    pub fn enroll(&self, id: &str, public_key: &[u8], now_ms: i64) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "INSERT OR IGNORE INTO devices (id, public_key, enrolled_at_ms) VALUES (?1, ?2, ?3)",
            params![id, public_key, now_ms],
        )?;
        Ok(n == 1)
    }

    /// The id and revocation flag of the device enrolled with this public key.
    pub fn device_by_key(&self, public_key: &[u8]) -> Result<Option<(String, bool)>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, revoked FROM devices WHERE public_key = ?1",
                params![public_key],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? != 0)),
            )
            .optional()?)
    }

    /// The device's public key and whether it is revoked.
    pub fn device(&self, id: &str) -> Result<Option<(Vec<u8>, bool)>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT public_key, revoked FROM devices WHERE id = ?1",
                params![id],
                |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)? != 0)),
            )
            .optional()?)
    }

    /// Revokes a device; false if it is unknown.
    pub fn revoke(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("UPDATE devices SET revoked = 1 WHERE id = ?1", params![id])?
            == 1)
    }

    /// Opens a round and, in the same transaction, charges it to the privacy ledger.
    pub fn open_round(
        &self,
        id: u64,
        base_version: u64,
        charge: Option<(&str, Charge)>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO rounds (id, state, base_version, opened_at_ms) VALUES (?1, 'open', ?2, ?3)",
            params![id as i64, base_version as i64, now_ms],
        )?;
        if let Some((mode, c)) = charge {
            tx.execute(
                "INSERT INTO privacy_ledger (round, mode, noise_multiplier, sampling_rate, charged_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id as i64, mode, c.noise_multiplier, c.sampling_rate, now_ms],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every charge in the privacy ledger, in round order.
    pub fn ledger(&self) -> Result<Vec<Charge>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT noise_multiplier, sampling_rate FROM privacy_ledger ORDER BY round")?;
        let rows = stmt.query_map([], |r| {
            Ok(Charge {
                noise_multiplier: r.get(0)?,
                sampling_rate: r.get(1)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether an upload nonce was ever used.
    pub fn nonce_seen(&self, nonce: &[u8]) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM uploads WHERE nonce = ?1",
                params![nonce],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Records an accepted upload; refuses a reused nonce or a second report of a device.
    pub fn record_upload(
        &self,
        nonce: &[u8],
        round: u64,
        device: &str,
        bytes: u64,
        now_ms: i64,
    ) -> Result<Result<(), UploadConflict>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let seen = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> Result<bool, rusqlite::Error> {
            Ok(tx.query_row(sql, p, |_| Ok(())).optional()?.is_some())
        };
        if seen("SELECT 1 FROM uploads WHERE nonce = ?1", &[&nonce])? {
            return Ok(Err(UploadConflict::Replay));
        }
        if seen(
            "SELECT 1 FROM uploads WHERE round = ?1 AND device = ?2",
            &[&(round as i64), &device],
        )? {
            return Ok(Err(UploadConflict::AlreadyReported));
        }
        tx.execute(
            "INSERT INTO uploads (nonce, round, device, received_at_ms, bytes) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![nonce, round as i64, device, now_ms, bytes as i64],
        )?;
        tx.execute(
            "UPDATE rounds SET reports = reports + 1 WHERE id = ?1",
            params![round as i64],
        )?;
        tx.commit()?;
        Ok(Ok(()))
    }

    /// Commits a round and the version it produced, in one transaction.
    pub fn commit_round(
        &self,
        round: u64,
        version: u64,
        sha256: &[u8],
        state_sha256: &[u8],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let n = tx.execute(
            "UPDATE rounds SET state = 'committed', closed_at_ms = ?2 WHERE id = ?1 AND state = 'open'",
            params![round as i64, now_ms],
        )?;
        if n != 1 {
            return Err(StoreError::Inconsistent(format!(
                "round {round} is not open"
            )));
        }
        tx.execute(
            "INSERT INTO versions (version, round, sha256, state_sha256, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![version as i64, round as i64, sha256, state_sha256, now_ms],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn abandon_round(&self, round: u64, reason: &str, now_ms: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE rounds SET state = 'abandoned', closed_at_ms = ?2, reason = ?3 WHERE id = ?1 AND state = 'open'",
            params![round as i64, now_ms, reason],
        )?;
        Ok(())
    }

    /// Versions newer than the `keep` latest, oldest first (their files may be deleted).
    pub fn versions_to_prune(&self, keep: usize) -> Result<Vec<u64>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT version FROM versions ORDER BY version DESC LIMIT -1 OFFSET ?1")?;
        let rows = stmt.query_map(params![keep as i64], |r| r.get::<_, i64>(0))?;
        let mut v: Vec<u64> = rows
            .map(|r| r.map(|v| v as u64))
            .collect::<Result<_, _>>()?;
        v.reverse();
        Ok(v)
    }
}

impl std::fmt::Display for RoundState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_survives_reopen_and_abandons_open_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.sqlite");
        {
            let s = Store::open(&path).unwrap();
            s.record_initial_version(&[0; 32], &[9; 32], 1).unwrap();
            assert!(s.enroll("d1", &[1; 32], 1).unwrap());
            assert!(!s.enroll("d2", &[1; 32], 1).unwrap(), "same key twice");
            s.open_round(1, 0, None, 2).unwrap();
            assert_eq!(s.record_upload(b"n1", 1, "d1", 10, 3).unwrap(), Ok(()));
            assert_eq!(
                s.record_upload(b"n1", 1, "d1", 10, 3).unwrap(),
                Err(UploadConflict::Replay)
            );
            assert_eq!(
                s.record_upload(b"n2", 1, "d1", 10, 3).unwrap(),
                Err(UploadConflict::AlreadyReported)
            );
            s.commit_round(1, 1, &[1; 32], &[9; 32], 4).unwrap();
            let charge = Charge {
                noise_multiplier: 1.0,
                sampling_rate: 0.01,
            };
            s.open_round(2, 1, Some(("central", charge)), 5).unwrap();
            assert!(
                s.open_round(2, 1, Some(("central", charge)), 5).is_err(),
                "a round is opened and charged once"
            );
            assert_eq!(s.record_upload(b"n3", 2, "d1", 10, 6).unwrap(), Ok(()));
        }
        let s = Store::open(&path).unwrap();
        let r = s.recover(7).unwrap();
        assert_eq!(r.abandoned, vec![2]);
        assert_eq!(r.next_round, 3);
        assert_eq!(r.rounds_committed, 1);
        assert_eq!(r.latest.unwrap().version, 1);
        assert!(
            s.nonce_seen(b"n3").unwrap(),
            "nonces of abandoned rounds stay on record"
        );
        let row = s.round(2).unwrap().unwrap();
        assert_eq!(row.state, RoundState::Abandoned);
        assert!(
            s.commit_round(2, 2, &[2; 32], &[9; 32], 8).is_err(),
            "abandoned rounds cannot commit"
        );
        assert_eq!(s.summary().unwrap().latest_version, Some(1));
        assert_eq!(
            s.ledger().unwrap(),
            vec![Charge {
                noise_multiplier: 1.0,
                sampling_rate: 0.01
            }],
            "the charge of the abandoned round stays"
        );
    }
}
