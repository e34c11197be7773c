//! What the commands read: a text or JSONL file, or one user's speeches in a plays folder.

use std::path::PathBuf;

use anyhow::{bail, Context};
use fedpersona_shared::data;
use fedpersona_shared::train::Example;

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
                let mut roles: Vec<String> = speeches
                    .iter()
                    .filter(|s| s.play == play)
                    .map(data::user_key)
                    .collect();
                roles.sort();
                roles.dedup();
                roles.truncate(8);
                bail!(
                    "no speeches for user {user:?} in {}{}",
                    self.data.display(),
                    if roles.is_empty() {
                        String::new()
                    } else {
                        format!(" (users of that play include: {})", roles.join(", "))
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
