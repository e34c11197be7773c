//! Examples (context, text, weight), their tokenization, and the windows they are cut into.

use crate::batch::Window;
use crate::tokenizer::{Tokenizer, TokenizerError};

/// What separates a context from the text that answers it, and ends the text. The shipped
/// corpus renders a scene as speeches separated by a blank line, so an example is
/// `context + SEP + text + SEP` with the loss on `text + SEP`.
pub const SEP: &str = "\n\n";

/// A training or evaluation example: the user's text, what it answered, and a weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub context: Option<String>,
    pub text: String,
    pub weight: f32,
}

impl Example {
    pub fn new(context: Option<String>, text: impl Into<String>) -> Self {
        Example {
            context,
            text: text.into(),
            weight: 1.0,
        }
    }
}

/// A tokenized example: `tokens[target_start..]` are the positions the loss covers.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedExample {
    pub tokens: Vec<u32>,
    pub target_start: usize,
    pub weight: f32,
}

/// Encodes `[bos] context SEP | text SEP` (the loss starts at `|`).
pub fn tokenize(
    tok: &Tokenizer,
    bos: Option<u32>,
    ex: &Example,
) -> Result<TokenizedExample, TokenizerError> {
    let mut tokens: Vec<u32> = bos.into_iter().collect();
    if let Some(c) = ex.context.as_deref().filter(|c| !c.is_empty()) {
        tokens.extend(tok.encode(c)?);
    }
    tokens.extend(tok.encode(SEP)?);
    let target_start = tokens.len();
    tokens.extend(tok.encode(&ex.text)?);
    tokens.extend(tok.encode(SEP)?);
    Ok(TokenizedExample {
        tokens,
        target_start,
        weight: ex.weight,
    })
}

/// Cuts an example into windows of at most `max_len` inputs so that every target position
/// is scored exactly once, each with as much preceding context as fits. A long text is split
/// into chunks of `max_len / 2` targets.
pub fn windows(ex: &TokenizedExample, max_len: usize) -> Vec<Window> {
    assert!(max_len >= 2, "max_len must be at least 2");
    let n = ex.tokens.len();
    let first = ex.target_start.max(1);
    if first >= n {
        return Vec::new();
    }
    let chunk = if n <= max_len + 1 {
        max_len
    } else {
        max_len / 2
    };
    let mut out = Vec::new();
    let mut a = first;
    while a < n {
        let b = (a + chunk).min(n);
        let w = (b - 1).saturating_sub(max_len);
        out.push(Window {
            tokens: ex.tokens[w..b].to_vec(),
            targets: (a - w)..(b - w),
            weight: ex.weight,
        });
        a = b;
    }
    out
}
