//! A user-partitioned corpus and the benchmark's splits (DESIGN.md, Benchmark): each user's
//! examples in order; users with too few lines dropped; the rest shuffled by seed into
//! federation (training) users and held-out new users; per user, the first part of its lines
//! is train/support data and the rest test/query data.

use std::collections::HashMap;
use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;

use fedpersona_model::data::{self, DataError};
use fedpersona_model::train::Example;

/// One user's examples, in the order they wrote them.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    /// `play/ROLE` for a plays folder, the `user` field for JSONL.
    pub key: String,
    pub examples: Vec<Example>,
}

/// Loads the users of a plays folder (each (play, role) a user; roles of
/// [`data::PUBLIC_PLAYS`] are left out: they train the base model) or of a JSONL file whose
/// every line names its `user`. Users come out sorted by key.
pub fn load_users(path: &Path) -> Result<Vec<User>, DataError> {
    let mut order: Vec<String> = Vec::new();
    let mut by_key: HashMap<String, Vec<Example>> = HashMap::new();
    let mut push = |key: String, ex: Example| {
        by_key
            .entry(key.clone())
            .or_insert_with(|| {
                order.push(key);
                Vec::new()
            })
            .push(ex);
    };
    if path.is_dir() {
        for s in data::load_plays(path)? {
            if data::PUBLIC_PLAYS.contains(&s.play.as_str()) {
                continue;
            }
            let key = data::user_key(&s);
            push(key, Example::new(s.context, s.text));
        }
    } else if data::is_jsonl(path) {
        for (i, (user, ex)) in data::load_jsonl(path)?.into_iter().enumerate() {
            let user = user.filter(|u| !u.is_empty()).ok_or(DataError::BadLine {
                path: path.display().to_string(),
                line: i + 1,
                message: "a user-partitioned corpus needs a non-empty \"user\" on every line"
                    .into(),
            })?;
            push(user, ex);
        }
    } else {
        return Err(DataError::BadLine {
            path: path.display().to_string(),
            line: 0,
            message: "expected a folder of plays or a .jsonl file".into(),
        });
    }
    let mut users: Vec<User> = order
        .into_iter()
        .map(|key| {
            let examples = by_key.remove(&key).unwrap_or_default();
            User { key, examples }
        })
        .collect();
    users.sort_by(|a, b| a.key.cmp(&b.key));
    if users.is_empty() {
        return Err(DataError::Empty(path.display().to_string()));
    }
    Ok(users)
}

/// How users are split.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SplitConfig {
    /// Users with fewer lines are dropped.
    pub min_lines: usize,
    /// Share of the kept users held out as new users (never seen by the federation).
    pub heldout_fraction: f64,
    /// Per user, the share of its lines (the first ones) that is train/support data.
    pub train_fraction: f64,
    pub seed: u64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            min_lines: 20,
            heldout_fraction: 0.2,
            train_fraction: 0.8,
            seed: 0,
        }
    }
}

/// One user's lines split in order.
#[derive(Debug, Clone, PartialEq)]
pub struct UserSplit {
    pub key: String,
    /// The first lines: training data (federation users) or support data (held-out users).
    pub train: Vec<Example>,
    /// The last lines: test data or query data.
    pub test: Vec<Example>,
}

/// The benchmark's users.
#[derive(Debug, Clone, PartialEq)]
pub struct Splits {
    pub train_users: Vec<UserSplit>,
    pub heldout_users: Vec<UserSplit>,
    /// Users dropped for having fewer than `min_lines` lines.
    pub dropped_users: usize,
}

/// Splits users by seed: the same seed and corpus always give the same split.
pub fn split_users(users: Vec<User>, cfg: &SplitConfig) -> Result<Splits, DataError> {
    let invalid = |message: String| DataError::BadLine {
        path: "split".into(),
        line: 0,
        message,
    };
    if !(cfg.heldout_fraction > 0.0 && cfg.heldout_fraction < 1.0) {
        return Err(invalid("the held-out fraction must be in (0, 1)".into()));
    }
    if !(cfg.train_fraction > 0.0 && cfg.train_fraction < 1.0) {
        return Err(invalid(
            "the per-user train fraction must be in (0, 1)".into(),
        ));
    }
    let min_lines = cfg.min_lines.max(2);
    let total = users.len();
    let mut kept: Vec<User> = users
        .into_iter()
        .filter(|u| u.examples.len() >= min_lines)
        .collect();
    let dropped_users = total - kept.len();
    if kept.len() < 2 {
        return Err(invalid(format!(
            "{} users have at least {min_lines} lines; the benchmark needs 2 or more",
            kept.len()
        )));
    }
    kept.sort_by(|a, b| a.key.cmp(&b.key));
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(cfg.seed);
    kept.shuffle(&mut rng);
    let heldout =
        ((kept.len() as f64 * cfg.heldout_fraction).round() as usize).clamp(1, kept.len() - 1);
    let split = |u: User| {
        let (train, test) = data::split_ordered(u.examples, cfg.train_fraction);
        UserSplit {
            key: u.key,
            train,
            test,
        }
    };
    let train_users = kept.split_off(heldout).into_iter().map(split).collect();
    let heldout_users = kept.into_iter().map(split).collect();
    Ok(Splits {
        train_users,
        heldout_users,
        dropped_users,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(key: &str, n: usize) -> User {
        User {
            key: key.into(),
            examples: (0..n)
                .map(|i| Example::new(None, format!("{key} line {i}")))
                .collect(),
        }
    }

    #[test]
    fn splits_are_seeded_disjoint_and_ordered() {
        let users: Vec<User> = (0..50).map(|i| user(&format!("u{i:02}"), 10 + i)).collect();
        let cfg = SplitConfig {
            min_lines: 15,
            heldout_fraction: 0.2,
            train_fraction: 0.8,
            seed: 7,
        };
        let a = split_users(users.clone(), &cfg).unwrap();
        let b = split_users(users.iter().rev().cloned().collect(), &cfg).unwrap();
        assert_eq!(a, b, "the split does not depend on input order");
        assert_eq!(a.dropped_users, 5);
        assert_eq!(a.heldout_users.len(), 9);
        assert_eq!(a.train_users.len(), 36);
        let c = split_users(users, &SplitConfig { seed: 8, ..cfg }).unwrap();
        assert_ne!(
            a.heldout_users, c.heldout_users,
            "another seed, another split"
        );
        for u in a.train_users.iter().chain(&a.heldout_users) {
            assert!(a.heldout_users.iter().filter(|h| h.key == u.key).count() <= 1);
            let n = u.train.len() + u.test.len();
            assert_eq!(u.train.len(), (n as f64 * 0.8).round() as usize);
            // First lines train, last lines test.
            assert!(u.train[0].text.ends_with(" line 0"));
            assert!(u
                .test
                .last()
                .unwrap()
                .text
                .ends_with(&format!(" line {}", n - 1)));
        }
        assert!(a
            .train_users
            .iter()
            .all(|t| a.heldout_users.iter().all(|h| h.key != t.key)));
    }

    #[test]
    fn bad_splits_are_refused() {
        let users = vec![user("a", 30), user("b", 3)];
        let e = split_users(users.clone(), &SplitConfig::default()).unwrap_err();
        assert!(
            e.to_string().contains("1 users have at least 20 lines"),
            "{e}"
        );
        let cfg = SplitConfig {
            heldout_fraction: 1.0,
            ..SplitConfig::default()
        };
        assert!(split_users(users, &cfg).is_err());
    }

    #[test]
    fn jsonl_users_and_plays_users() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("c.jsonl");
        std::fs::write(
            &j,
            "{\"user\":\"b\",\"text\":\"one\"}\n{\"user\":\"a\",\"text\":\"two\",\"context\":\"q\"}\n{\"user\":\"b\",\"text\":\"three\"}\n",
        )
        .unwrap();
        let users = load_users(&j).unwrap();
        assert_eq!(users.len(), 2);
        assert_eq!(users[0].key, "a");
        assert_eq!(users[0].examples[0].context.as_deref(), Some("q"));
        assert_eq!(
            users[1]
                .examples
                .iter()
                .map(|e| e.text.as_str())
                .collect::<Vec<_>>(),
            ["one", "three"]
        );
        std::fs::write(
            &j,
            "{\"user\":\"b\",\"text\":\"one\"}\n{\"text\":\"two\"}\n",
        )
        .unwrap();
        let e = load_users(&j).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("\"user\""), "{e}");

        let plays = dir.path().join("plays");
        std::fs::create_dir(&plays).unwrap();
        let md = "# X\n\n## SCENE I\n\n**A**  \nHello there.\n\n**B**  \nHi.\n\n**A**  \nBye.\n";
        std::fs::write(plays.join("x.md"), md).unwrap();
        std::fs::write(plays.join(format!("{}.md", data::PUBLIC_PLAYS[0])), md).unwrap();
        let users = load_users(&plays).unwrap();
        let keys: Vec<&str> = users.iter().map(|u| u.key.as_str()).collect();
        assert_eq!(keys, ["x/A", "x/B"], "public plays are not users");
        assert_eq!(users[0].examples[1].context.as_deref(), Some("Hi."));
    }
}
