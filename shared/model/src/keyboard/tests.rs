//! The keyboard's accounting against a scripted keyboard, its beam against exhaustive search,
//! and its scores moving with what an adapter learned.

use candle_core::Device;

use super::*;
use crate::config::LlamaConfig;
use crate::lora::LoraConfig;
use crate::model::Target;
use crate::train::{self, Example, FitConfig, TrainConfig};

/// A random byte-level model (258 ids: the bytes, BOS and EOS).
fn byte_model() -> Llama {
    let cfg = LlamaConfig::from_json(
        r#"{"vocab_size":258,"hidden_size":32,"intermediate_size":64,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"head_dim":8,
            "max_position_embeddings":128,"tie_word_embeddings":true}"#,
    )
    .unwrap();
    let tensors = Llama::random_tensors(&cfg, 11)
        .into_iter()
        .map(|(n, s, d)| (n, Tensor::from_vec(d, s, &Device::Cpu).unwrap()))
        .collect();
    Llama::from_tensors(cfg, tensors, &Device::Cpu).unwrap()
}

fn bytes(s: &str) -> Vec<u32> {
    s.bytes().map(u32::from).collect()
}

/// `context\n\n` then `text\n\n` as the targets, after BOS.
fn window(context: &str, text: &str) -> Window {
    let tok = Tokenizer::bytes(258).unwrap();
    let ex = train::tokenize(
        &tok,
        Some(crate::tokenizer::BYTE_BOS),
        &Example::new(Some(context.into()), text),
    )
    .unwrap();
    let mut w = train::windows(&ex, 128);
    assert_eq!(w.len(), 1);
    w.remove(0)
}

#[test]
fn words_are_runs_of_typed_characters_in_the_targets() {
    let t = bytes("ab cd,  e\n\nfg");
    let spans = words(&t, 0..t.len());
    // The first word starts at position 0, with nothing before it to predict it from.
    assert_eq!(spans, [(3, 3), (8, 1), (11, 2)]);
    let seen: Vec<&[u32]> = spans.iter().map(|&(s, l)| &t[s..s + l]).collect();
    assert_eq!(seen, [&bytes("cd,")[..], &bytes("e")[..], &bytes("fg")[..]]);
    // Outside the targets nothing counts; a special token separates.
    assert_eq!(words(&t, 3..6), [(3, 3)]);
    let mut special = bytes("ab");
    special.push(crate::tokenizer::BYTE_EOS);
    special.extend(bytes("c"));
    assert_eq!(words(&special, 1..4), [(1, 1), (3, 1)]);
}

#[test]
fn keystrokes_are_saved_from_the_first_tap_on_the_typed_word() {
    let t = bytes("xx hello to you");
    let spans = words(&t, 3..t.len());
    assert_eq!(spans.len(), 3);
    // The keyboard shows the right word only once two of its characters are typed, and ranks
    // it second at the start of "to".
    let mut report = KeyboardReport::default();
    tally(&mut report, &t, &spans, 0, |at, word_start| {
        let (s, l) = *spans
            .iter()
            .find(|&&(s, l)| (s..s + l).contains(&at))
            .unwrap();
        let typed = at - s;
        assert_eq!(word_start, typed == 0);
        let rest = t[at..s + l].to_vec();
        Ok(match (&t[s..s + l], typed) {
            (w, 0) if w == bytes("to") => vec![bytes("oo"), rest],
            (_, 0 | 1) => vec![bytes("zz")],
            _ => vec![bytes("q"), bytes("r"), rest],
        })
    })
    .unwrap();
    assert_eq!(
        report,
        KeyboardReport {
            words: 3,
            top1: 0,
            top3: 1,
            keystrokes: 6 + 3 + 4,
            // hello after 2 typed: 3; to at once: 2; you after 2: 1.
            saved: 3 + 2 + 1,
        }
    );
    assert!((report.keystroke_savings() - 6.0 / 13.0).abs() < 1e-12);
    assert!((report.next_word_top3() - 1.0 / 3.0).abs() < 1e-12);

    // A fourth suggestion is never shown, and a budget stops after the word that reaches it.
    let mut capped = KeyboardReport::default();
    tally(&mut capped, &t, &spans, 5, |at, _| {
        let (s, l) = *spans
            .iter()
            .find(|&&(s, l)| (s..s + l).contains(&at))
            .unwrap();
        Ok(vec![vec![1], vec![2], vec![3], t[at..s + l].to_vec()])
    })
    .unwrap();
    assert_eq!((capped.words, capped.saved, capped.keystrokes), (1, 0, 6));
}

/// With one token per word and a beam as wide as the vocabulary, the beam is exhaustive: its
/// suggestions are the three tokens t with the largest p(t) · max over separators p(sep | t).
#[test]
fn a_full_width_beam_finds_the_most_likely_words() {
    let model = byte_model();
    let prompt = bytes("to be or not ");
    let mut cache = KvCache::new();
    let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&input, None, Some(&mut cache)).unwrap();
    let last = logits.squeeze(0).unwrap().get(prompt.len() - 1).unwrap();
    let next = last.to_vec1::<f32>().unwrap();
    let cfg = KeyboardConfig {
        width: 258,
        max_word_tokens: 1,
        max_chars: 0,
    };
    let shown = suggest(&model, None, &cache, &next, true, &cfg).unwrap();

    let first = log_softmax(&next);
    let mut exact: Vec<(u32, f32)> = (0..258u32)
        .filter(|&t| !is_separator(t))
        .map(|t| {
            let mut c = cache.clone();
            let x = Tensor::new(&[[t]], &Device::Cpu).unwrap();
            let l = model.forward(&x, None, Some(&mut c)).unwrap();
            let lp = log_softmax(&l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            let end = (0..258u32)
                .filter(|&s| is_separator(s))
                .map(|s| lp[s as usize])
                .fold(f32::NEG_INFINITY, f32::max);
            (t, first[t as usize] + end)
        })
        .collect();
    exact.sort_by(|a, b| b.1.total_cmp(&a.1));
    let want: Vec<Vec<u32>> = exact[..SUGGESTIONS].iter().map(|e| vec![e.0]).collect();
    assert_eq!(shown, want);
}

/// Suggestions from the whole window's cache cut back to a prefix are those from the prefix
/// run on its own.
#[test]
fn a_truncated_cache_suggests_as_the_prefix_alone() {
    let model = byte_model();
    let w = window("Who is there?", "Nay, answer me: stand");
    // Wide enough that the random model's beams meet separators.
    let cfg = KeyboardConfig {
        width: 64,
        max_word_tokens: 3,
        max_chars: 0,
    };
    let mut full = KvCache::new();
    let input = Tensor::new(w.tokens.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model
        .forward(&input, None, Some(&mut full))
        .unwrap()
        .squeeze(0)
        .unwrap();
    for at in [w.targets.start, w.targets.start + 3, w.tokens.len() - 2] {
        let next = logits.get(at - 1).unwrap().to_vec1::<f32>().unwrap();
        let cut = suggest(
            &model,
            None,
            &full.truncated(at).unwrap(),
            &next,
            false,
            &cfg,
        )
        .unwrap();
        let mut alone = KvCache::new();
        let x = Tensor::new(&w.tokens[..at], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let l = model.forward(&x, None, Some(&mut alone)).unwrap();
        let next = l
            .squeeze(0)
            .unwrap()
            .get(at - 1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let own = suggest(&model, None, &alone, &next, false, &cfg).unwrap();
        assert_eq!(cut, own, "at {at}");
        assert_eq!(cut.len(), SUGGESTIONS);
    }
    assert!(full.truncated(w.tokens.len() + 1).is_err());
}

/// An adapter fitted to a user's phrase predicts its words: next-word accuracy and keystroke
/// savings on that phrase rise well above the base model's (the HF fixture, a byte model).
#[test]
fn an_adapter_that_learned_the_phrase_predicts_its_words() {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-tiny-llama");
    let base = crate::BaseModel::load(&fixture, &Device::Cpu).unwrap();
    let (model, tok) = (&base.model, &base.tokenizer);
    let ex = train::tokenize(
        tok,
        base.bos(),
        &Example::new(Some("Speak.".into()), "the cat sat on the mat"),
    )
    .unwrap();
    let w = train::windows(&ex, 64);
    let cfg = KeyboardConfig::default();
    let before = score_keyboard(model, None, tok, &w, &cfg).unwrap();
    assert_eq!((before.words, before.keystrokes), (6, 23));

    let lora = LoraConfig {
        rank: 8,
        alpha: 16.0,
        targets: Target::ALL.to_vec(),
        ..LoraConfig::default()
    };
    let adapter = LoraAdapter::new(model.config(), lora, &Device::Cpu).unwrap();
    let fit = FitConfig {
        steps: 80,
        batch_size: 1,
        optimizer: TrainConfig {
            lr: 2e-2,
            ..TrainConfig::default()
        },
        workers: 1,
        seed: 1,
    };
    train::fit(model, &adapter, &w, &fit, |_, _| {}).unwrap();
    let after = score_keyboard(model, Some(&adapter), tok, &w, &cfg).unwrap();
    assert!(
        after.top1 >= 5 && after.saved > before.saved + 8,
        "before {before:?}, after {after:?}"
    );
    assert!(after.keystroke_savings() > 0.5, "{after:?}");
}

#[test]
fn refuses_what_it_cannot_score() {
    let model = byte_model();
    let tok = Tokenizer::bytes(258).unwrap();
    let narrow = KeyboardConfig {
        width: 2,
        ..KeyboardConfig::default()
    };
    let err = score_keyboard(&model, None, &tok, &[window("a", "b c")], &narrow).unwrap_err();
    assert!(err.to_string().contains("width"), "{err}");
}

#[test]
fn top_k_keeps_the_largest_in_order() {
    let v = [0.5f32, 3.0, -1.0, 3.0, 2.0];
    assert_eq!(top_k(&v, 3), [(1, 3.0), (3, 3.0), (4, 2.0)]);
    assert_eq!(top_k(&v, 9).len(), 5);
    let lp = log_softmax(&v);
    let total: f32 = lp.iter().map(|l| l.exp()).sum();
    assert!((total - 1.0).abs() < 1e-6);
}
