//! The user profiling layer's store: every interaction (time, what the user responded to,
//! the model's suggestion, what the user finally wrote, feedback, tags) in a SQLite file in
//! the agent's data folder (WAL, versioned schema, `secure_delete`). User text and
//! suggestions are sealed with AES-256-GCM (ring) under a per-device key, with the row's
//! plaintext columns as associated data: a changed byte anywhere in a row is reported as
//! tampering, never used.

use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

/// The schema this code reads and writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;
/// PBKDF2-HMAC-SHA256 iterations for a passphrase-derived key (OWASP 2023 guidance).
pub const PBKDF2_ITERATIONS: u32 = 600_000;
const KEY_LEN: usize = 32;

/// Errors of the interaction store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// (The cause is in the message, not the error's source: a chain printed with `{:#}`
    /// would say it twice.)
    #[error("interaction store: {0}")]
    Sql(rusqlite::Error),
    #[error("interaction store key {path}: {message}")]
    Key { path: String, message: String },
    #[error("interaction {id} failed its integrity check (tampered or corrupted, or another key)")]
    Tampered { id: i64 },
    #[error("the interaction store was written by a newer version (schema {found}, this reads {SCHEMA_VERSION})")]
    NewerSchema { found: i64 },
    #[error("invalid interaction: {0}")]
    Invalid(String),
    #[error("the system random source failed")]
    Random,
    #[error("interaction store {path}: {cause}")]
    Io { path: String, cause: std::io::Error },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sql(e)
    }
}

/// What the user said about a suggestion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum Feedback {
    /// No suggestion, or no reaction yet.
    None,
    Accepted,
    Edited,
    Rejected,
    /// An explicit rating, 1 to 5.
    Rating(u8),
}

impl Feedback {
    fn validate(self) -> Result<(), StoreError> {
        match self {
            Feedback::Rating(r) if !(1..=5).contains(&r) => {
                Err(StoreError::Invalid(format!("rating {r} is not in 1..=5")))
            }
            _ => Ok(()),
        }
    }

    fn columns(self) -> (&'static str, Option<i64>) {
        match self {
            Feedback::None => ("none", None),
            Feedback::Accepted => ("accepted", None),
            Feedback::Edited => ("edited", None),
            Feedback::Rejected => ("rejected", None),
            Feedback::Rating(r) => ("rating", Some(i64::from(r))),
        }
    }

    fn from_columns(kind: &str, rating: Option<i64>) -> Option<Feedback> {
        Some(match (kind, rating) {
            ("none", None) => Feedback::None,
            ("accepted", None) => Feedback::Accepted,
            ("edited", None) => Feedback::Edited,
            ("rejected", None) => Feedback::Rejected,
            ("rating", Some(r)) if (1..=5).contains(&r) => Feedback::Rating(r as u8),
            _ => return None,
        })
    }
}

/// One interaction as an app reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// What the user was responding to, or the prompt.
    pub context: Option<String>,
    /// The model's suggestion, if one was shown.
    pub suggestion: Option<String>,
    /// What the user finally wrote or chose.
    pub text: String,
    pub feedback: Feedback,
    /// The app that reported it.
    pub app: String,
    /// What kind of interaction (e.g. `reply`, `note`).
    pub kind: String,
}

/// An interaction with its row id.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stored {
    pub id: i64,
    #[serde(flatten)]
    pub interaction: Interaction,
}

/// The sealed part of a row.
#[derive(Serialize, Deserialize)]
struct Sealed {
    context: Option<String>,
    suggestion: Option<String>,
    text: String,
}

/// The device's store key (AES-256-GCM).
pub struct StoreKey {
    key: LessSafeKey,
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(..)")
    }
}

impl StoreKey {
    fn from_bytes(bytes: &[u8; KEY_LEN]) -> StoreKey {
        StoreKey {
            key: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("32-byte key")),
        }
    }

    /// Loads the key file, or creates it (mode 0600) with 32 random bytes.
    pub fn load_or_create(path: &Path) -> Result<StoreKey, StoreError> {
        let err = |message: String| StoreError::Key {
            path: path.display().to_string(),
            message,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                let bytes: [u8; KEY_LEN] = bytes.as_slice().try_into().map_err(|_| {
                    err(format!("must hold {KEY_LEN} bytes, holds {}", bytes.len()))
                })?;
                Ok(Self::from_bytes(&bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; KEY_LEN];
                SystemRandom::new()
                    .fill(&mut bytes)
                    .map_err(|_| StoreError::Random)?;
                crate::fs::write_private(path, &bytes).map_err(|e| err(format!("{e:#}")))?;
                Ok(Self::from_bytes(&bytes))
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// Derives the key from a passphrase and a salt (PBKDF2-HMAC-SHA256).
    pub fn from_passphrase(passphrase: &str, salt: &[u8], iterations: u32) -> StoreKey {
        let mut bytes = [0u8; KEY_LEN];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(iterations.max(1)).expect("at least 1"),
            salt,
            passphrase.as_bytes(),
            &mut bytes,
        );
        Self::from_bytes(&bytes)
    }
}

/// The interaction store of one device.
#[derive(Debug)]
pub struct InteractionStore {
    conn: Connection,
    key: StoreKey,
    path: PathBuf,
}

/// The associated data of a row: its plaintext columns, so none can change unnoticed.
fn aad(uid: &[u8], time_ms: i64, app: &str, kind: &str, fb: &str, rating: Option<i64>) -> Vec<u8> {
    let mut out = b"fedpersona.interaction.v1\0".to_vec();
    out.extend_from_slice(uid);
    out.extend_from_slice(&time_ms.to_le_bytes());
    for s in [app, kind, fb] {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    out.extend_from_slice(&rating.unwrap_or(-1).to_le_bytes());
    out
}

/// The store's files: the database, and the write-ahead log and shared-memory index SQLite
/// keeps beside it.
fn files(path: &Path) -> [PathBuf; 3] {
    let beside = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    [path.to_path_buf(), beside("-wal"), beside("-shm")]
}

/// Creates the database file 0600 if it is missing and makes the store's existing files
/// 0600, whatever the umask: SQLite creates its log and index with the database's mode.
fn make_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |p: &Path| {
        let path = p.display().to_string();
        move |cause| StoreError::Io { path, cause }
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    for f in files(path) {
        match std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => other.map_err(io(&f))?,
        }
    }
    Ok(())
}

impl InteractionStore {
    /// Opens the store at `path` with the key in `key_file`, creating the key if it is
    /// missing, unless the store already holds interactions: those are sealed under the
    /// lost key, and a new one would silently make them unreadable, so that is refused
    /// and nothing changes.
    pub fn open_with_key_file(
        path: &Path,
        key_file: &Path,
    ) -> Result<InteractionStore, StoreError> {
        if !key_file.exists() && path.exists() {
            let conn = Connection::open(path)?;
            let tables: i64 = conn.query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'interactions'",
                [],
                |r| r.get(0),
            )?;
            let held: i64 = if tables == 0 {
                0
            } else {
                conn.query_row("SELECT count(*) FROM interactions", [], |r| r.get(0))?
            };
            drop(conn);
            if held > 0 {
                return Err(StoreError::Key {
                    path: key_file.display().to_string(),
                    message: format!(
                        "is missing, and {} holds {held} interactions sealed under it: restore the \
                         key file (from a backup), or move the store's files away to start an \
                         empty store",
                        path.display()
                    ),
                });
            }
        }
        Self::open(path, StoreKey::load_or_create(key_file)?)
    }

    /// Opens (creating or migrating) the store at `path` with `key`; its files are made 0600.
    pub fn open(path: &Path, key: StoreKey) -> Result<InteractionStore, StoreError> {
        make_private(path)?;
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema { found: version });
        }
        if version < 1 {
            conn.execute_batch(
                "BEGIN;
                 CREATE TABLE interactions (
                     id INTEGER PRIMARY KEY,
                     uid BLOB NOT NULL UNIQUE,
                     time_ms INTEGER NOT NULL,
                     app TEXT NOT NULL,
                     kind TEXT NOT NULL,
                     feedback TEXT NOT NULL,
                     rating INTEGER,
                     nonce BLOB NOT NULL,
                     sealed BLOB NOT NULL
                 );
                 CREATE INDEX interactions_time ON interactions(time_ms);
                 PRAGMA user_version = 1;
                 COMMIT;",
            )?;
        }
        Ok(InteractionStore {
            conn,
            key,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn seal(
        &self,
        uid: &[u8],
        i: &Interaction,
        fb: &str,
        rating: Option<i64>,
    ) -> Result<([u8; NONCE_LEN], Vec<u8>), StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| StoreError::Random)?;
        let mut buf = serde_json::to_vec(&Sealed {
            context: i.context.clone(),
            suggestion: i.suggestion.clone(),
            text: i.text.clone(),
        })
        .map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.key
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(uid, i.time_ms, &i.app, &i.kind, fb, rating)),
                &mut buf,
            )
            .map_err(|_| StoreError::Invalid("sealing failed".into()))?;
        Ok((nonce, buf))
    }

    /// Records an interaction; returns its id.
    pub fn log(&self, i: &Interaction) -> Result<i64, StoreError> {
        if i.text.is_empty() {
            return Err(StoreError::Invalid("the text is empty".into()));
        }
        i.feedback.validate()?;
        let mut uid = [0u8; 16];
        SystemRandom::new()
            .fill(&mut uid)
            .map_err(|_| StoreError::Random)?;
        let (fb, rating) = i.feedback.columns();
        let (nonce, sealed) = self.seal(&uid, i, fb, rating)?;
        self.conn.execute(
            "INSERT INTO interactions (uid, time_ms, app, kind, feedback, rating, nonce, sealed)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                &uid[..],
                i.time_ms,
                i.app,
                i.kind,
                fb,
                rating,
                &nonce[..],
                sealed
            ],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Sets the feedback of interaction `id` (re-sealed: the feedback is bound to the row).
    pub fn set_feedback(&self, id: i64, feedback: Feedback) -> Result<(), StoreError> {
        feedback.validate()?;
        let (mut stored, uid) = self
            .row(id)?
            .ok_or_else(|| StoreError::Invalid(format!("no interaction {id}")))?;
        stored.interaction.feedback = feedback;
        let (fb, rating) = feedback.columns();
        let (nonce, sealed) = self.seal(&uid, &stored.interaction, fb, rating)?;
        self.conn.execute(
            "UPDATE interactions SET feedback = ?2, rating = ?3, nonce = ?4, sealed = ?5 WHERE id = ?1",
            params![id, fb, rating, &nonce[..], sealed],
        )?;
        Ok(())
    }

    /// Decrypts and checks a row; returns it with its uid (the sealing's associated data).
    fn open_row(&self, r: &rusqlite::Row<'_>) -> Result<(Stored, Vec<u8>), StoreError> {
        let id: i64 = r.get(0)?;
        let uid: Vec<u8> = r.get(1)?;
        let time_ms: i64 = r.get(2)?;
        let app: String = r.get(3)?;
        let kind: String = r.get(4)?;
        let fb: String = r.get(5)?;
        let rating: Option<i64> = r.get(6)?;
        let nonce: Vec<u8> = r.get(7)?;
        let mut sealed: Vec<u8> = r.get(8)?;
        let tampered = StoreError::Tampered { id };
        let feedback = Feedback::from_columns(&fb, rating).ok_or(StoreError::Tampered { id })?;
        let nonce: [u8; NONCE_LEN] = nonce
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::Tampered { id })?;
        let plain = self
            .key
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(&uid, time_ms, &app, &kind, &fb, rating)),
                &mut sealed,
            )
            .map_err(|_| StoreError::Tampered { id })?;
        let s: Sealed = serde_json::from_slice(plain).map_err(|_| tampered)?;
        let stored = Stored {
            id,
            interaction: Interaction {
                time_ms,
                context: s.context,
                suggestion: s.suggestion,
                text: s.text,
                feedback,
                app,
                kind,
            },
        };
        Ok((stored, uid))
    }

    const COLUMNS: &'static str =
        "SELECT id, uid, time_ms, app, kind, feedback, rating, nonce, sealed FROM interactions";

    /// One interaction, decrypted and checked.
    pub fn get(&self, id: i64) -> Result<Option<Stored>, StoreError> {
        Ok(self.row(id)?.map(|(stored, _)| stored))
    }

    fn row(&self, id: i64) -> Result<Option<(Stored, Vec<u8>)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("{} WHERE id = ?1", Self::COLUMNS))?;
        let row = stmt.query_row([id], |r| Ok(self.open_row(r))).optional()?;
        row.transpose()
    }

    /// Every interaction at or after `since_ms`, oldest first, decrypted and checked; the
    /// first row that fails its check fails the call (and names the row).
    pub fn since(&self, since_ms: i64) -> Result<Vec<Stored>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "{} WHERE time_ms >= ?1 ORDER BY time_ms, id",
            Self::COLUMNS
        ))?;
        let rows = stmt.query_map([since_ms], |r| Ok(self.open_row(r)))?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??.0);
        }
        Ok(out)
    }

    /// Every interaction, oldest first (what `Export` returns).
    pub fn all(&self) -> Result<Vec<Stored>, StoreError> {
        self.since(i64::MIN)
    }

    pub fn count(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM interactions", [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
    }

    /// Erases every interaction so that nothing of them stays readable in the files: rows
    /// deleted with `secure_delete` (freed pages zeroed), the WAL checkpointed and truncated,
    /// the file vacuumed.
    pub fn forget(&self) -> Result<(), StoreError> {
        self.conn.execute("DELETE FROM interactions", [])?;
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        self.conn.execute_batch("VACUUM")?;
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANARY: &str = "canary-7f3a9c-never-on-disk";

    fn interaction(i: i64) -> Interaction {
        Interaction {
            time_ms: 1_000 + i,
            context: Some(format!("what they said {i}")),
            suggestion: Some(format!("suggested {i}")),
            text: format!("{CANARY} user wrote {i}"),
            feedback: Feedback::Edited,
            app: "mail".into(),
            kind: "reply".into(),
        }
    }

    /// Every byte the store keeps on disk (database, WAL, shared memory).
    fn disk_bytes(path: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        for suffix in ["", "-wal", "-shm"] {
            let p = PathBuf::from(format!("{}{suffix}", path.display()));
            if let Ok(b) = std::fs::read(p) {
                out.extend(b);
            }
        }
        out
    }

    fn contains(hay: &[u8], needle: &str) -> bool {
        hay.windows(needle.len()).any(|w| w == needle.as_bytes())
    }

    fn open(dir: &Path) -> InteractionStore {
        let key = StoreKey::load_or_create(&dir.join("store.key")).unwrap();
        InteractionStore::open(&dir.join("interactions.sqlite"), key).unwrap()
    }

    #[test]
    fn round_trips_and_encrypts_at_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let ids: Vec<i64> = (0..5)
            .map(|i| store.log(&interaction(i)).unwrap())
            .collect();
        store.set_feedback(ids[1], Feedback::Rating(4)).unwrap();
        let all = store.all().unwrap();
        assert_eq!(all.len(), 5);
        assert_eq!(all[0].interaction, interaction(0));
        assert_eq!(all[1].interaction.feedback, Feedback::Rating(4));
        assert_eq!(store.since(1_003).unwrap().len(), 2);
        assert!(!contains(&disk_bytes(store.path()), CANARY));
        assert!(!contains(&disk_bytes(store.path()), "suggested 3"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("store.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Reopened with the same key file: the same rows.
        drop(store);
        assert_eq!(open(dir.path()).all().unwrap(), all);
        // Bad input changes nothing.
        let s = open(dir.path());
        let mut bad = interaction(9);
        bad.feedback = Feedback::Rating(9);
        assert!(s.log(&bad).is_err());
        bad.feedback = Feedback::None;
        bad.text.clear();
        assert!(s.log(&bad).is_err());
        assert_eq!(s.count().unwrap(), 5);
    }

    #[test]
    fn tampering_is_detected_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for i in 0..3 {
            store.log(&interaction(i)).unwrap();
        }
        let raw = Connection::open(store.path()).unwrap();
        // A flipped ciphertext byte.
        raw.execute(
            "UPDATE interactions SET sealed = CAST(substr(sealed, 1, 5) || x'ff' || substr(sealed, 7) AS BLOB) WHERE id = 2",
            [],
        )
        .unwrap();
        let e = store.all().unwrap_err();
        assert!(matches!(e, StoreError::Tampered { id: 2 }), "{e}");
        assert!(store.get(1).unwrap().is_some());
        // A changed plaintext column (feedback) is caught too.
        raw.execute(
            "UPDATE interactions SET feedback = 'accepted' WHERE id = 3",
            [],
        )
        .unwrap();
        assert!(matches!(
            store.get(3).unwrap_err(),
            StoreError::Tampered { id: 3 }
        ));
        // Another key opens nothing.
        std::fs::remove_file(dir.path().join("store.key")).unwrap();
        let other = open(dir.path());
        assert!(matches!(
            other.get(1).unwrap_err(),
            StoreError::Tampered { id: 1 }
        ));
    }

    #[test]
    fn the_store_files_are_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("interactions.sqlite");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let store = open(dir.path());
        store.log(&interaction(1)).unwrap();
        let [db, wal, shm] = files(&path);
        for f in [&db, &wal, &shm] {
            assert_eq!(mode(f), 0o600, "{}", f.display());
        }
        drop(store);
        // Files an older version left readable are tightened when the store opens.
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = open(dir.path());
        assert_eq!(mode(&db), 0o600);
        assert_eq!(store.all().unwrap().len(), 1);
    }

    #[test]
    fn a_store_whose_key_is_gone_is_refused_not_rekeyed() {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = (
            dir.path().join("interactions.sqlite"),
            dir.path().join("store.key"),
        );
        // An empty store (as `forget` leaves it) can take a new key: nothing is sealed.
        drop(InteractionStore::open_with_key_file(&path, &key).unwrap());
        std::fs::remove_file(&key).unwrap();
        let store = InteractionStore::open_with_key_file(&path, &key).unwrap();
        store.log(&interaction(1)).unwrap();
        store.log(&interaction(2)).unwrap();
        drop(store);
        let saved = std::fs::read(&key).unwrap();
        std::fs::remove_file(&key).unwrap();
        let before = std::fs::read(&path).unwrap();
        let err = InteractionStore::open_with_key_file(&path, &key).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("store.key") && msg.contains("missing") && msg.contains("2 interactions"),
            "{msg}"
        );
        assert!(!key.exists(), "no new key was made");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "the store is unchanged"
        );
        // With the key restored, every row reads.
        std::fs::write(&key, saved).unwrap();
        let store = InteractionStore::open_with_key_file(&path, &key).unwrap();
        assert_eq!(store.all().unwrap().len(), 2);
    }

    #[test]
    fn forget_leaves_nothing_readable() {
        let dir = tempfile::tempdir().unwrap();
        let key = StoreKey::from_passphrase("correct horse", b"salt-0123456789", 1_000);
        let path = dir.path().join("i.sqlite");
        let store = InteractionStore::open(&path, key).unwrap();
        for i in 0..50 {
            store.log(&interaction(i)).unwrap();
        }
        let sealed_sample: Vec<u8> = Connection::open(&path)
            .unwrap()
            .query_row("SELECT sealed FROM interactions WHERE id = 7", [], |r| {
                r.get(0)
            })
            .unwrap();
        store.forget().unwrap();
        assert_eq!(store.count().unwrap(), 0);
        let bytes = disk_bytes(&path);
        assert!(!bytes
            .windows(sealed_sample.len())
            .any(|w| w == sealed_sample));
        // A wrong passphrase cannot read what a right one wrote.
        store.log(&interaction(1)).unwrap();
        drop(store);
        let wrong = StoreKey::from_passphrase("wrong horse", b"salt-0123456789", 1_000);
        let s = InteractionStore::open(&path, wrong).unwrap();
        assert!(s.all().is_err());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.sqlite");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 7)
            .unwrap();
        let key = StoreKey::from_passphrase("p", b"s", 1);
        let e = InteractionStore::open(&path, key).unwrap_err();
        assert!(matches!(e, StoreError::NewerSchema { found: 7 }), "{e}");
    }
}
