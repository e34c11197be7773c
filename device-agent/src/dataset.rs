//! What the commands read: a text or JSONL file, or one user's speeches in a plays folder.

use std::path::PathBuf;

use anyhow::{bail, Context};
use fedpersona_model::data;
use fedpersona_model::train::Example;

/// Flags naming the data.
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// A text file (blank-line separated paragraphs), a JSONL file
    /// (`{"text": ..., "context": ...}` per line), or a folder of speaker-marked plays.
    #[arg(long)]
    pub data: PathBuf,
    /// With a plays folder: the user, as `play/ROLE` (e.g. `hamlet/HAMLET`).
    #[arg(long)]
    pub user: Option<String>,
}

impl DataArgs {
    pub fn load(&self) -> anyhow::Result<Vec<Example>> {
        if self.data.is_dir() {
            let Some(user) = &self.user else {
                bail!(
                    "{} is a plays folder: name a user with --user play/ROLE",
                    self.data.display()
                );
            };
            let speeches = data::load_plays(&self.data)?;
            let examples = data::user_examples(&speeches, user);
            if examples.is_empty() {
                let play = user.split('/').next().unwrap_or_default();
                let mut counts = std::collections::BTreeMap::<String, usize>::new();
                for s in speeches.iter().filter(|s| s.play == play) {
                    *counts.entry(data::user_key(s)).or_default() += 1;
                }
                let mut ranked: Vec<(String, usize)> = counts.into_iter().collect();
                ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                let mut roles: Vec<String> = ranked.into_iter().map(|(k, _)| k).collect();
                roles.truncate(8);
                bail!(
                    "no speeches for user {user:?} in {}{}",
                    self.data.display(),
                    if roles.is_empty() {
                        String::new()
                    } else {
                        format!(" (its most active users: {})", roles.join(", "))
                    }
                );
            }
            Ok(examples)
        } else {
            if self.user.is_some() {
                bail!(
                    "--user applies to a plays folder, and {} is a file",
                    self.data.display()
                );
            }
            data::load_examples(&self.data)
                .with_context(|| format!("reading {}", self.data.display()))
        }
    }
}
