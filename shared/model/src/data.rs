//! Training data: text and JSONL files of examples, and the speaker-marked Shakespeare plays
//! (each (play, role) is a user; a speech's context is the speech before it in the scene).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::train::Example;

/// Errors from reading data files.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// (The cause is in the message, not the error's source: a chain printed with `{:#}`
    /// would say it twice.)
    #[error("{path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    #[error("{path} line {line}: {message}")]
    BadLine {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{0} holds no examples")]
    Empty(String),
}

fn io(path: &Path, source: std::io::Error) -> DataError {
    DataError::Io {
        path: path.display().to_string(),
        cause: source,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonlExample {
    text: String,
    #[serde(default)]
    context: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    weight: Option<f32>,
}

/// Reads examples from a `.jsonl` file (`{"text": ..., "context": ...}` per line, context
/// optional) or a plain text file (blank-line separated paragraphs, each in the context of
/// the one before it).
pub fn load_examples(path: &Path) -> Result<Vec<Example>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    let out = if is_jsonl(path) {
        parse_jsonl(path, &text)?
            .into_iter()
            .map(|(_, e)| e)
            .collect()
    } else {
        paragraphs(&text)
    };
    if out.is_empty() {
        return Err(DataError::Empty(path.display().to_string()));
    }
    Ok(out)
}

/// Whether a path names a JSONL file (`.jsonl` or `.ndjson`).
pub fn is_jsonl(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e == "jsonl" || e == "ndjson")
}

/// Reads a JSONL file's examples with their `user` field (None where a line has none).
pub fn load_jsonl(path: &Path) -> Result<Vec<(Option<String>, Example)>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    parse_jsonl(path, &text)
}

fn parse_jsonl(path: &Path, text: &str) -> Result<Vec<(Option<String>, Example)>, DataError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| DataError::BadLine {
            path: path.display().to_string(),
            line: i + 1,
            message,
        };
        let j: JsonlExample = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let weight = j.weight.unwrap_or(1.0);
        if !(weight.is_finite() && weight >= 0.0) {
            return Err(bad(format!(
                "weight {weight} must be finite and non-negative"
            )));
        }
        if j.text.is_empty() {
            return Err(bad("text is empty".into()));
        }
        out.push((
            j.user,
            Example {
                context: j.context,
                text: j.text,
                weight,
            },
        ));
    }
    Ok(out)
}

/// Blank-line separated paragraphs, each with the previous one as context.
pub fn paragraphs(text: &str) -> Vec<Example> {
    let mut out: Vec<Example> = Vec::new();
    let mut prev: Option<String> = None;
    for para in text.replace("\r\n", "\n").split("\n\n") {
        let para = para.trim_matches('\n');
        if para.trim().is_empty() {
            continue;
        }
        out.push(Example::new(prev.take(), para));
        prev = Some(para.to_string());
    }
    out
}

/// One speech of a play.
#[derive(Debug, Clone, PartialEq)]
pub struct Speech {
    pub play: String,
    pub role: String,
    pub text: String,
    /// The previous speech in the same scene, if any.
    pub context: Option<String>,
}

/// A play file's speeches in order.
pub fn parse_play(play: &str, markdown: &str) -> Vec<Speech> {
    let mut out = Vec::new();
    let mut prev: Option<String> = None;
    let mut role: Option<String> = None;
    let mut lines: Vec<&str> = Vec::new();
    let mut in_direction = false;
    let mut flush =
        |role: &mut Option<String>, lines: &mut Vec<&str>, prev: &mut Option<String>| {
            if let Some(r) = role.take() {
                if !lines.is_empty() {
                    let text = lines.join("\n");
                    out.push(Speech {
                        play: play.to_string(),
                        role: r,
                        text: text.clone(),
                        context: prev.replace(text),
                    });
                }
            }
            lines.clear();
        };
    for raw in markdown.lines() {
        let line = raw.trim_end();
        let trimmed = line.trim_start();
        if in_direction {
            in_direction = !trimmed.ends_with('_');
            continue;
        }
        if trimmed.starts_with('#') {
            flush(&mut role, &mut lines, &mut prev);
            prev = None; // a new act or scene: no context across it
            continue;
        }
        if let Some(name) = trimmed
            .strip_prefix("**")
            .and_then(|s| s.strip_suffix("**"))
            .filter(|s| !s.is_empty())
        {
            flush(&mut role, &mut lines, &mut prev);
            role = Some(name.trim().to_string());
            continue;
        }
        if trimmed.starts_with('_') {
            in_direction = !(trimmed.len() > 1 && trimmed.ends_with('_'));
            continue;
        }
        if trimmed.is_empty() {
            flush(&mut role, &mut lines, &mut prev);
            continue;
        }
        if role.is_some() {
            lines.push(trimmed);
        }
    }
    flush(&mut role, &mut lines, &mut prev);
    out
}

/// The plays whose text trains the shipped base model. Their roles are never federation
/// users. Chosen to span every genre; fixed so that `pretrain` and the benchmark agree.
pub const PUBLIC_PLAYS: &[&str] = &[
    "a-midsummer-night-s-dream",
    "the-comedy-of-errors",
    "twelfth-night",
    "henry-iv-part-2",
    "henry-vi-part-1",
    "henry-vi-part-3",
    "richard-ii",
    "the-taming-of-the-shrew",
    "troilus-and-cressida",
    "coriolanus",
    "titus-andronicus",
    "cymbeline",
];

/// The play files of a corpus folder (any depth), sorted by name.
pub fn play_files(root: &Path) -> Result<Vec<(String, PathBuf)>, DataError> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
            let path = entry.map_err(|e| io(&dir, e))?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "md")
                && path.file_name().is_some_and(|n| n != "README.md")
            {
                let stem = path
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                out.push((stem, path));
            }
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(DataError::Empty(root.display().to_string()));
    }
    Ok(out)
}

/// Every speech of the corpus, play by play.
pub fn load_plays(root: &Path) -> Result<Vec<Speech>, DataError> {
    let mut out = Vec::new();
    for (name, path) in play_files(root)? {
        let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        out.extend(parse_play(&name, &text));
    }
    Ok(out)
}

/// The corpus shipped in the repository (`data/shakespeare`), found relative to the
/// executable's build tree or the working directory; `FEDPERSONA_DATA` overrides.
pub fn default_corpus_dir() -> PathBuf {
    if let Ok(p) = std::env::var("FEDPERSONA_DATA") {
        return PathBuf::from(p);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/shakespeare");
    if repo.exists() {
        return repo;
    }
    PathBuf::from("data/shakespeare")
}

/// A user's key in a plays corpus: `play/ROLE` (the play's file stem).
pub fn user_key(s: &Speech) -> String {
    format!("{}/{}", s.play, s.role)
}

/// The speeches of one user (`play/ROLE`, role matched exactly, play by file stem) as
/// examples in order.
pub fn user_examples(speeches: &[Speech], user: &str) -> Vec<Example> {
    speeches
        .iter()
        .filter(|s| user_key(s) == user)
        .map(|s| Example::new(s.context.clone(), s.text.clone()))
        .collect()
}

/// Splits a user's examples in order: the first `fraction` is support/train data, the rest
/// query/test data (McMahan et al. 2017's per-user split).
pub fn split_ordered(examples: Vec<Example>, fraction: f64) -> (Vec<Example>, Vec<Example>) {
    let n = examples.len();
    let cut = ((n as f64 * fraction).round() as usize).min(n);
    let mut train = examples;
    let test = train.split_off(cut);
    (train, test)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAY: &str = "# Macbeth\n\n## ACT I\n\n## SCENE I. A desert place.\n\n_Thunder and lightning. Enter three Witches_\n\n**First Witch**  \nWhen shall we three meet again  \nIn thunder, lightning, or in rain?\n\n**Second Witch**  \nWhen the hurlyburly's done,  \n\n_Enter DUNCAN, with Attendants,\nmeeting a bleeding Sergeant_\n\n**DUNCAN**  \nWhat bloody man is that?\n\n### SCENE II. A camp.\n\n**MALCOLM**  \nThis is the sergeant\n";

    #[test]
    fn parses_speeches_and_contexts() {
        let s = parse_play("macbeth", PLAY);
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].role, "First Witch");
        assert_eq!(
            s[0].text,
            "When shall we three meet again\nIn thunder, lightning, or in rain?"
        );
        assert_eq!(s[0].context, None);
        assert_eq!(s[1].context.as_deref(), Some(s[0].text.as_str()));
        assert_eq!(s[2].role, "DUNCAN");
        assert_eq!(s[2].context.as_deref(), Some("When the hurlyburly's done,"));
        assert_eq!(s[3].context, None, "no context across scenes");
    }

    #[test]
    fn jsonl_and_text_files() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("d.jsonl");
        std::fs::write(
            &j,
            "{\"text\":\"hi\",\"context\":\"hello\"}\n\n{\"text\":\"yo\"}\n",
        )
        .unwrap();
        let ex = load_examples(&j).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].context.as_deref(), Some("hello"));
        std::fs::write(&j, "{\"text\":\"hi\"}\n{\"txt\":1}\n").unwrap();
        let e = load_examples(&j).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        let t = dir.path().join("d.txt");
        std::fs::write(&t, "one\ntwo\n\n\nthree\n").unwrap();
        let ex = load_examples(&t).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[1].context.as_deref(), Some("one\ntwo"));
        std::fs::write(&t, "\n\n").unwrap();
        assert!(load_examples(&t).is_err());
    }
}
