//! `device-agent eval`: loss, bits per byte and next-token accuracy of a model (with an
//! optional adapter) on a data file.

use anyhow::bail;
use fedpersona_model::data::split_ordered;
use fedpersona_model::train::{evaluate, EvalReport};

use crate::adapt::to_windows;
use crate::dataset::DataArgs;
use crate::train::resolve_seq_len;
use crate::ModelArgs;

/// Which part of the data is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    /// Every example.
    All,
    /// The first 80% (what `train` learns from).
    Train,
    /// The last 20% (what `train` holds out).
    Test,
}

/// Flags of `device-agent eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long, value_enum, default_value_t = Split::All)]
    pub split: Split,
    /// Tokens per evaluation window.
    /// (default: 256, or the model's limit if smaller)
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &EvalArgs) -> anyhow::Result<EvalReport> {
    let base = args.model.load_base()?;
    let adapter = args.model.load_adapter(&base)?;
    let seq_len = resolve_seq_len(args.seq_len, &base)?;
    let examples = args.data.load()?;
    let examples = match args.split {
        Split::All => examples,
        Split::Train => split_ordered(examples, 0.8).0,
        Split::Test => split_ordered(examples, 0.8).1,
    };
    let windows = to_windows(&base, &examples, seq_len)?;
    if windows.is_empty() {
        bail!("nothing to evaluate in the selected split");
    }
    Ok(evaluate(
        &base.model,
        adapter.as_ref(),
        &base.tokenizer,
        &windows,
        16,
    )?)
}
