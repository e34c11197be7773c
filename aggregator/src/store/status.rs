//! What `aggregator status` reads from the journal: a round's row and the totals.

use rusqlite::{params, OptionalExtension};

use super::{RoundState, Store, StoreError};

/// One journal row of a round, for `aggregator status`.
#[derive(Debug, Clone)]
pub struct RoundRow {
    pub id: u64,
    pub state: RoundState,
    pub base_version: u64,
    pub reports: u64,
    pub opened_at_ms: i64,
    pub closed_at_ms: Option<i64>,
    pub reason: Option<String>,
}

/// Totals for `aggregator status`.
#[derive(Debug, Clone)]
pub struct Summary {
    pub devices: u64,
    pub revoked: u64,
    pub rounds_committed: u64,
    pub rounds_abandoned: u64,
    pub uploads: u64,
    pub latest_version: Option<u64>,
    pub last_round: Option<RoundRow>,
}

impl Store {
    pub fn round(&self, id: u64) -> Result<Option<RoundRow>, StoreError> {
        self.conn()
            .query_row(
                "SELECT id, state, base_version, reports, opened_at_ms, closed_at_ms, reason FROM rounds WHERE id = ?1",
                params![id as i64],
                round_row,
            )
            .optional()?
            .transpose()
    }

    pub fn summary(&self) -> Result<Summary, StoreError> {
        let conn = self.conn();
        let count = |sql: &str| -> Result<u64, rusqlite::Error> {
            conn.query_row(sql, [], |r| r.get::<_, i64>(0))
                .map(|v| v as u64)
        };
        let last_round = conn
            .query_row(
                "SELECT id, state, base_version, reports, opened_at_ms, closed_at_ms, reason FROM rounds ORDER BY id DESC LIMIT 1",
                [],
                round_row,
            )
            .optional()?
            .transpose()?;
        Ok(Summary {
            devices: count("SELECT COUNT(*) FROM devices")?,
            revoked: count("SELECT COUNT(*) FROM devices WHERE revoked = 1")?,
            rounds_committed: count("SELECT COUNT(*) FROM rounds WHERE state = 'committed'")?,
            rounds_abandoned: count("SELECT COUNT(*) FROM rounds WHERE state = 'abandoned'")?,
            uploads: count("SELECT COUNT(*) FROM uploads")?,
            latest_version: conn
                .query_row("SELECT MAX(version) FROM versions", [], |r| {
                    r.get::<_, Option<i64>>(0)
                })?
                .map(|v| v as u64),
            last_round,
        })
    }
}

fn round_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<RoundRow, StoreError>> {
    let state: String = r.get(1)?;
    let Some(state) = RoundState::parse(&state) else {
        return Ok(Err(StoreError::Inconsistent(format!(
            "round has unknown state {state:?}"
        ))));
    };
    Ok(Ok(RoundRow {
        id: r.get::<_, i64>(0)? as u64,
        state,
        base_version: r.get::<_, i64>(2)? as u64,
        reports: r.get::<_, i64>(3)? as u64,
        opened_at_ms: r.get(4)?,
        closed_at_ms: r.get(5)?,
        reason: r.get(6)?,
    }))
}
