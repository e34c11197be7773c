//! Tokenizers: the byte-level default and HF `tokenizer.json` through the `tokenizers` crate.

use std::path::Path;

/// Errors from loading or using a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {path}: {message}")]
    Load { path: String, message: String },
    #[error("tokenizer failed: {0}")]
    Encode(String),
    #[error("a byte-level tokenizer needs a vocabulary of at least 256 ids, the model has {0}")]
    VocabTooSmall(usize),
}

/// Maps text to token ids and back.
#[derive(Debug)]
pub enum Tokenizer {
    /// Token id = byte value (0–255); ids from 256 up are special tokens, if the vocabulary has them.
    Bytes { vocab_size: usize },
    /// A Hugging Face `tokenizer.json`.
    Hf(Box<tokenizers::Tokenizer>),
}

/// End of text for byte-level models with at least 258 ids (256 = BOS, 257 = EOS).
pub const BYTE_BOS: u32 = 256;
pub const BYTE_EOS: u32 = 257;

impl Tokenizer {
    pub fn bytes(vocab_size: usize) -> Result<Self, TokenizerError> {
        if vocab_size < 256 {
            return Err(TokenizerError::VocabTooSmall(vocab_size));
        }
        Ok(Tokenizer::Bytes { vocab_size })
    }

    /// The tokenizer for a model folder: its `tokenizer.json` if present, else bytes.
    pub fn for_model_dir(dir: &Path, vocab_size: usize) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        if path.exists() {
            Self::from_file(&path)
        } else {
            Self::bytes(vocab_size)
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        tokenizers::Tokenizer::from_file(path)
            .map(|t| Tokenizer::Hf(Box::new(t)))
            .map_err(|e| TokenizerError::Load {
                path: path.display().to_string(),
                message: e.to_string(),
            })
    }

    pub fn is_bytes(&self) -> bool {
        matches!(self, Tokenizer::Bytes { .. })
    }

    /// Encodes text without adding special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Tokenizer::Bytes { .. } => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Hf(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizerError::Encode(e.to_string())),
        }
    }

    /// Decodes ids to text; special tokens are skipped and invalid UTF-8 is replaced.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        match self {
            Tokenizer::Bytes { .. } => {
                Ok(String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned())
            }
            Tokenizer::Hf(t) => t
                .decode(ids, true)
                .map_err(|e| TokenizerError::Encode(e.to_string())),
        }
    }

    /// The raw bytes of byte-level ids (special ids dropped); for streaming output that may
    /// split a UTF-8 character across tokens.
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect()
    }

    /// Token ids that end generation.
    pub fn eos_ids(&self) -> Vec<u32> {
        match self {
            Tokenizer::Bytes { vocab_size } if *vocab_size > BYTE_EOS as usize => vec![BYTE_EOS],
            Tokenizer::Bytes { .. } => Vec::new(),
            Tokenizer::Hf(t) => [
                "</s>",
                "<|endoftext|>",
                "<|end_of_text|>",
                "<|eot_id|>",
                "<|im_end|>",
            ]
            .iter()
            .filter_map(|s| t.token_to_id(s))
            .collect(),
        }
    }

    /// Number of UTF-8 bytes the given ids stand for (for bits per byte).
    pub fn byte_len(&self, ids: &[u32]) -> Result<usize, TokenizerError> {
        match self {
            Tokenizer::Bytes { .. } => Ok(ids.iter().filter(|&&i| i < 256).count()),
            Tokenizer::Hf(_) => Ok(self.decode(ids)?.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip() {
        let t = Tokenizer::bytes(256).unwrap();
        let ids = t.encode("Ay, thou poor ghost — ☃").unwrap();
        assert_eq!(ids[0], b'A' as u32);
        assert_eq!(t.decode(&ids).unwrap(), "Ay, thou poor ghost — ☃");
        assert!(t.eos_ids().is_empty());
        assert_eq!(Tokenizer::bytes(258).unwrap().eos_ids(), vec![BYTE_EOS]);
        assert!(Tokenizer::bytes(100).is_err());
    }

    /// A word-level `tokenizer.json` written by hand in the HF format loads and round-trips.
    #[test]
    fn hf_tokenizer_json_loads_and_round_trips() {
        let json = r##"{
          "version": "1.0",
          "truncation": null,
          "padding": null,
          "added_tokens": [
            {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 5, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
          ],
          "normalizer": null,
          "pre_tokenizer": {"type": "Whitespace"},
          "post_processor": null,
          "decoder": {"type": "WordPiece", "prefix": "@@", "cleanup": false},
          "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "to": 1, "be": 2, "or": 3, "not": 4, "</s>": 5}, "unk_token": "<unk>"}
        }"##;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), json).unwrap();
        let t = Tokenizer::for_model_dir(dir.path(), 6).unwrap();
        assert!(!t.is_bytes());
        let ids = t.encode("to be or not to be").unwrap();
        assert_eq!(ids, vec![1, 2, 3, 4, 1, 2]);
        assert_eq!(t.decode(&ids).unwrap(), "to be or not to be");
        assert_eq!(t.eos_ids(), vec![5]);
        std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
        let e = Tokenizer::for_model_dir(dir.path(), 6).unwrap_err();
        assert!(e.to_string().contains("tokenizer.json"), "{e}");
    }
}
