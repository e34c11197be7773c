//! The journal's schema and its migrations: a fresh journal gets every table, an older one the
//! tables added since, and a newer one is refused.

use rusqlite::Connection;

use super::StoreError;

const SCHEMA_VERSION: i64 = 3;

const SCHEMA: &str = "
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    public_key BLOB NOT NULL UNIQUE,
    enrolled_at_ms INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE rounds (
    id INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('open', 'committed', 'abandoned')),
    base_version INTEGER NOT NULL,
    opened_at_ms INTEGER NOT NULL,
    closed_at_ms INTEGER,
    reports INTEGER NOT NULL DEFAULT 0,
    reason TEXT
);
CREATE TABLE versions (
    version INTEGER PRIMARY KEY,
    round INTEGER REFERENCES rounds(id),
    sha256 BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE uploads (
    nonce BLOB PRIMARY KEY,
    round INTEGER NOT NULL,
    device TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    UNIQUE (round, device)
);
";

/// Version 2: the privacy ledger. A round is charged in the transaction that opens it, so a
/// crash can never lose a charge, and the round id as key means it is never counted twice.
const MIGRATION_2: &str = "
CREATE TABLE privacy_ledger (
    round INTEGER PRIMARY KEY REFERENCES rounds(id),
    mode TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    sampling_rate REAL NOT NULL,
    charged_at_ms INTEGER NOT NULL
);
";

/// Version 3: each version's digest over every file of its folder (the adapter, its config
/// and the server optimizer's state), so no file of a committed version changes unnoticed.
/// Versions committed before it have none.
const MIGRATION_3: &str = "
ALTER TABLE versions ADD COLUMN state_sha256 BLOB;
";

/// Brings the journal's schema to [`SCHEMA_VERSION`].
pub(super) fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    match version {
        0 => {
            conn.execute_batch(&format!(
                "BEGIN; {SCHEMA} {MIGRATION_2} {MIGRATION_3} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            ))?;
        }
        1 => {
            conn.execute_batch(&format!(
                "BEGIN; {MIGRATION_2} {MIGRATION_3} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            ))?;
        }
        2 => {
            conn.execute_batch(&format!(
                "BEGIN; {MIGRATION_3} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            ))?;
        }
        SCHEMA_VERSION => {}
        v if v > SCHEMA_VERSION => return Err(StoreError::NewerSchema(v)),
        v => {
            return Err(StoreError::Inconsistent(format!(
                "unknown schema version {v}"
            )))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn a_version_1_journal_gets_the_ledger_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("v1.sqlite");
        Connection::open(&old)
            .unwrap()
            .execute_batch(&format!("{SCHEMA} PRAGMA user_version = 1;"))
            .unwrap();
        let s = Store::open(&old).unwrap();
        assert!(s.ledger().unwrap().is_empty());
        drop(s);
        let version: i64 = Connection::open(&old)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);

        let newer = dir.path().join("v4.sqlite");
        Connection::open(&newer)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        assert!(matches!(
            Store::open(&newer),
            Err(StoreError::NewerSchema(4))
        ));
    }
}
