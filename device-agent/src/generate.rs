//! `device-agent generate`: continues a prompt with the base model and an optional adapter,
//! streaming only the continuation to stdout.

use std::io::Write;

use anyhow::{bail, Context};
use fedpersona_model::generate::{generate, Sampling};
use fedpersona_model::tokenizer::Tokenizer;

use crate::ModelArgs;

/// Flags of `device-agent generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling mass (with a temperature above 0).
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the continuation contains this text (e.g. a blank line: $'\n\n').
    #[arg(long)]
    pub stop: Option<String>,
}

/// Decodes tokens as they come into new pieces of text; multi-byte characters split across
/// byte tokens are held until complete.
#[derive(Debug)]
pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    text: String,
    emitted: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        TextStream {
            tok,
            ids: Vec::new(),
            text: String::new(),
            emitted: 0,
        }
    }

    /// Adds a token; returns the text that became complete with it (maybe empty).
    pub fn push(&mut self, id: u32) -> &str {
        self.ids.push(id);
        self.text = match self.tok {
            Tokenizer::Bytes { .. } => {
                let bytes = self.tok.decode_bytes(&self.ids);
                match std::str::from_utf8(&bytes) {
                    Ok(s) => s.to_string(),
                    Err(e) if e.error_len().is_none() => {
                        String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned()
                    }
                    Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
                }
            }
            Tokenizer::Hf(_) => self.tok.decode(&self.ids).unwrap_or_default(),
        };
        let start = self.emitted;
        if self.text.len() > start && self.text.is_char_boundary(start) {
            self.emitted = self.text.len();
            &self.text[start..]
        } else {
            ""
        }
    }

    /// Everything decoded so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}

pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        bail!("--temperature must be zero or positive");
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    let base = args.model.load_base()?;
    let adapter = args.model.load_adapter(&base)?;
    let cfg = base.model.config();
    let mut prompt: Vec<u32> = base.bos().into_iter().collect();
    prompt.extend(base.tokenizer.encode(&args.prompt)?);
    if prompt.is_empty() {
        bail!("--prompt is empty");
    }
    let eos: Vec<u32> = if cfg.eos_token_ids.is_empty() {
        base.tokenizer.eos_ids()
    } else {
        cfg.eos_token_ids.clone()
    };
    let mut stream = TextStream::new(&base.tokenizer);
    let mut out = std::io::stdout().lock();
    let sampling = Sampling {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    let mut io_error = None;
    generate(
        &base.model,
        adapter.as_ref(),
        &prompt,
        args.max_tokens,
        sampling,
        |id| {
            if eos.contains(&id) {
                return false;
            }
            let piece = stream.push(id);
            if let Err(e) = out.write_all(piece.as_bytes()).and_then(|()| out.flush()) {
                io_error = Some(e);
                return false;
            }
            !args
                .stop
                .as_deref()
                .is_some_and(|s| stream.text().contains(s))
        },
    )?;
    if let Some(e) = io_error {
        return Err(e).context("writing to stdout");
    }
    Ok(())
}
