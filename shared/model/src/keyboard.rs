//! Keyboard metrics: what a user of a predictive keyboard feels. At each position of a text the
//! keyboard shows the [`SUGGESTIONS`] most likely completions of the current word, found by a
//! small beam over the model's own decoding up to the next whitespace.
//!
//! - **Next-word top-1 / top-3**: at the start of each word (nothing of it typed yet), whether
//!   the best suggestion, or one of the three, is the word the user wrote.
//! - **Keystroke savings**: the user types a word character by character and taps a suggestion
//!   as soon as the word is among those shown; the tap writes the rest of the word and the
//!   space after it, so a tap after `j` of `L` characters saves `L − j` keystrokes (the
//!   remaining characters and the space, less the tap). Savings are the saved keystrokes over
//!   all keystrokes of the text typed without suggestions (each word and one separator).
//!
//! Words are maximal runs of non-whitespace characters of a window's target text, so
//! punctuation stays with its word, as it does on a keyboard. Byte-level tokenizers only: a
//! byte is a character the user types.

use candle_core::Tensor;

use crate::batch::Window;
use crate::error::ModelError;
use crate::lora::LoraAdapter;
use crate::model::{Adapter, KvCache, Llama};
use crate::tokenizer::Tokenizer;

/// How many completions the keyboard shows.
pub const SUGGESTIONS: usize = 3;

/// The beam and how much text is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyboardConfig {
    /// Beams kept per step (at least [`SUGGESTIONS`]).
    pub width: usize,
    /// The longest completion, in tokens.
    pub max_word_tokens: usize,
    /// Scoring stops after the word that reaches this many keystrokes (0: the whole text).
    pub max_chars: usize,
}

impl Default for KeyboardConfig {
    fn default() -> Self {
        KeyboardConfig {
            width: 4,
            max_word_tokens: 24,
            max_chars: 200,
        }
    }
}

/// Counts over the scored words (sums, so that reports of disjoint texts add).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyboardReport {
    pub words: usize,
    /// Words whose best suggestion at the word's start was the word.
    pub top1: usize,
    /// Words among the suggestions at the word's start.
    pub top3: usize,
    /// Keystrokes of the text typed without suggestions.
    pub keystrokes: usize,
    /// Keystrokes the suggestions saved.
    pub saved: usize,
}

impl KeyboardReport {
    pub fn next_word_top1(&self) -> f64 {
        ratio(self.top1, self.words)
    }
    pub fn next_word_top3(&self) -> f64 {
        ratio(self.top3, self.words)
    }
    pub fn keystroke_savings(&self) -> f64 {
        ratio(self.saved, self.keystrokes)
    }
}

impl std::ops::AddAssign for KeyboardReport {
    fn add_assign(&mut self, o: KeyboardReport) {
        self.words += o.words;
        self.top1 += o.top1;
        self.top3 += o.top3;
        self.keystrokes += o.keystrokes;
        self.saved += o.saved;
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Scores the target text of `windows`, in order, as a keyboard user would meet it, with the
/// base model and `adapter` (None: the base alone).
pub fn score_keyboard(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    tok: &Tokenizer,
    windows: &[Window],
    cfg: &KeyboardConfig,
) -> Result<KeyboardReport, ModelError> {
    if !tok.is_bytes() {
        return Err(ModelError::Unsupported(
            "keyboard metrics need a byte-level tokenizer (a token per typed character)".into(),
        ));
    }
    if cfg.width < SUGGESTIONS || cfg.max_word_tokens == 0 {
        return Err(ModelError::Unsupported(format!(
            "a keyboard beam needs a width of at least {SUGGESTIONS} and room for a token"
        )));
    }
    let frozen = adapter.map(LoraAdapter::frozen);
    let adapter = frozen.as_ref().map(|a| a as &dyn Adapter);
    let mut report = KeyboardReport::default();
    for w in windows {
        if cfg.max_chars > 0 && report.keystrokes >= cfg.max_chars {
            break;
        }
        let words = words(&w.tokens, w.targets.clone());
        if words.is_empty() {
            continue;
        }
        let mut cache = KvCache::new();
        let input = Tensor::new(w.tokens.as_slice(), model.device())?.unsqueeze(0)?;
        let logits = model
            .forward(&input, adapter, Some(&mut cache))?
            .squeeze(0)?;
        tally(
            &mut report,
            &w.tokens,
            &words,
            cfg.max_chars,
            |at, word_start| {
                let next = logits.get(at - 1)?.to_vec1::<f32>()?;
                suggest(
                    model,
                    adapter,
                    &cache.truncated(at)?,
                    &next,
                    word_start,
                    cfg,
                )
            },
        )?;
    }
    Ok(report)
}

/// Adds `words` of `tokens` to `report` as a user types them, given what the keyboard shows
/// with `tokens[..at]` typed (`shown(at, word_start)`, best first), until `max_chars`.
fn tally(
    report: &mut KeyboardReport,
    tokens: &[u32],
    words: &[(usize, usize)],
    max_chars: usize,
    mut shown: impl FnMut(usize, bool) -> Result<Vec<Vec<u32>>, ModelError>,
) -> Result<(), ModelError> {
    for &(start, len) in words {
        if max_chars > 0 && report.keystrokes >= max_chars {
            break;
        }
        let word = &tokens[start..start + len];
        report.words += 1;
        report.keystrokes += len + 1;
        for typed in 0..len {
            let rank = shown(start + typed, typed == 0)?
                .iter()
                .take(SUGGESTIONS)
                .position(|s| s.as_slice() == &word[typed..]);
            if typed == 0 {
                report.top1 += usize::from(rank == Some(0));
                report.top3 += usize::from(rank.is_some());
            }
            if rank.is_some() {
                report.saved += len - typed;
                break;
            }
        }
    }
    Ok(())
}

/// The words of `tokens[targets]`: (start, length) of each maximal run of typed characters.
/// A word needs a position before it (its first character is predicted from there).
fn words(tokens: &[u32], targets: std::ops::Range<usize>) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = None;
    for p in targets.clone() {
        match (is_separator(tokens[p]), start) {
            (false, None) => start = Some(p),
            (true, Some(s)) => {
                out.push((s, p - s));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, targets.end - s));
    }
    out.retain(|&(s, _)| s >= 1);
    out
}

/// Whether a byte-level token ends a word: whitespace, or a special token.
fn is_separator(token: u32) -> bool {
    u8::try_from(token).map_or(true, |b| b.is_ascii_whitespace())
}

/// The [`SUGGESTIONS`] most likely completions of the current word (the tokens after what is
/// typed, up to a separator), best first: a beam of `cfg.width` over the model's decoding from
/// the prefix in `cache`, whose next-token logits are `next`. At a word's start an immediate
/// separator is no word and is not shown.
fn suggest(
    model: &Llama,
    adapter: Option<&dyn Adapter>,
    cache: &KvCache,
    next: &[f32],
    word_start: bool,
    cfg: &KeyboardConfig,
) -> Result<Vec<Vec<u32>>, ModelError> {
    let max_pos = model.config().max_position_embeddings;
    let mut cache = cache.clone();
    // Live beams (tokens so far, log-probability) and each one's next-token log-probabilities.
    let mut live: Vec<(Vec<u32>, f32)> = vec![(Vec::new(), 0.0)];
    let mut next_lp = vec![log_softmax(next)];
    let mut done: Vec<(Vec<u32>, f32)> = Vec::new();
    for step in 0..=cfg.max_word_tokens {
        // Every beam's best continuations, best first.
        let mut cands: Vec<(usize, u32, f32)> = Vec::new();
        for (i, (_, lp)) in live.iter().enumerate() {
            for (t, l) in top_k(&next_lp[i], cfg.width) {
                cands.push((i, t, lp + l));
            }
        }
        cands.sort_by(|a, b| b.2.total_cmp(&a.2));
        let can_grow = step < cfg.max_word_tokens && cache.len() < max_pos;
        let mut grown: Vec<(usize, u32, f32)> = Vec::new();
        for (i, t, score) in cands {
            if is_separator(t) {
                let word = &live[i].0;
                let no_word = word.is_empty() && word_start;
                if !no_word && !done.iter().any(|(w, _)| w == word) {
                    done.push((word.clone(), score));
                }
            } else if can_grow && grown.len() < cfg.width {
                grown.push((i, t, score));
            }
        }
        done.sort_by(|a, b| b.1.total_cmp(&a.1));
        done.truncate(SUGGESTIONS);
        // Scores only fall as a beam grows: once the shown completions beat every live beam,
        // nothing can displace them.
        let settled = done.len() == SUGGESTIONS
            && grown.first().is_none_or(|g| g.2 <= done[SUGGESTIONS - 1].1);
        if grown.is_empty() || settled {
            break;
        }
        let parents: Vec<u32> = grown.iter().map(|g| g.0 as u32).collect();
        cache = cache.select_rows(&parents)?;
        let tokens: Vec<u32> = grown.iter().map(|g| g.1).collect();
        let input = Tensor::new(tokens.as_slice(), model.device())?.unsqueeze(1)?;
        let logits = model
            .forward(&input, adapter, Some(&mut cache))?
            .squeeze(1)?;
        let rows = logits.to_vec2::<f32>()?;
        live = grown
            .iter()
            .map(|&(i, t, score)| {
                let mut w = live[i].0.clone();
                w.push(t);
                (w, score)
            })
            .collect();
        next_lp = rows.iter().map(|r| log_softmax(r)).collect();
    }
    Ok(done.into_iter().map(|(w, _)| w).collect())
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    logits.iter().map(|&l| l - lse).collect()
}

/// The `k` largest entries as (index, value), largest first.
fn top_k(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &v) in values.iter().enumerate() {
        if best.len() == k && best.last().is_some_and(|b| v <= b.1) {
            continue;
        }
        let at = best.partition_point(|b| b.1 >= v);
        best.insert(at, (i as u32, v));
        best.truncate(k);
    }
    best
}

#[cfg(test)]
mod tests;
