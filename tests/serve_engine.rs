//! The serving engine's two transformer implementations give the same outputs: kiln's
//! training implementation (`nn::bert`) and candle-transformers' BERT (the inference fast
//! path), on the same weights, for embeddings and for classification.

mod serve_support;
mod train_support;

use std::path::PathBuf;

use candle_core::Device;
use kiln::data::text::EncodedText;
use kiln::nn::tiny::TinyLayout;
use kiln::serve::{EncoderModel, Implementation, Purpose};
use serve_support::{max_diff, write_pooling};

fn rows(model: &EncoderModel, texts: &[&str]) -> Vec<EncodedText> {
    texts
        .iter()
        .map(|t| model.tokenize(t, Purpose::Embed, true).unwrap())
        .collect()
}

const TEXTS: [&str; 4] = [
    "the movie was really good",
    "awful",
    "this film is quite boring and the actors are poor but the story is fine",
    "love a story",
];

fn both(dir: &std::path::Path) -> (EncoderModel, EncoderModel) {
    let kiln = EncoderModel::load(dir, &Device::Cpu, Implementation::Kiln).unwrap();
    let fast = EncoderModel::load(dir, &Device::Cpu, Implementation::Candle).unwrap();
    assert_eq!(kiln.implementation, Implementation::Kiln);
    assert_eq!(fast.implementation, Implementation::Candle);
    (kiln, fast)
}

#[test]
fn candle_transformers_bert_embeds_like_kilns_encoder() {
    let tmp = tempfile::tempdir().unwrap();
    for (layout, modes) in [
        (TinyLayout::Unprefixed, vec!["mean"]),
        (TinyLayout::Prefixed, vec!["cls", "max"]),
    ] {
        let dir = train_support::tiny_model(&tmp.path().join(format!("{layout:?}")), layout);
        write_pooling(&dir, 32, &modes, true);
        let (kiln, fast) = both(&dir);
        let inputs = rows(&kiln, &TEXTS);
        let refs: Vec<&EncodedText> = inputs.iter().collect();
        let a = kiln.embed(&refs).unwrap();
        let b = fast.embed(&refs).unwrap();
        let diff = max_diff(&a, &b);
        assert!(diff < 1e-5, "{layout:?}: implementations differ by {diff}");
        // Batched with padding equals one at a time.
        for (i, r) in refs.iter().enumerate() {
            let single = fast.embed(&[r]).unwrap();
            let diff = max_diff(&single, &b[i..=i]);
            assert!(diff < 1e-5, "padding changes row {i} by {diff}");
        }
    }
}

#[test]
fn candle_transformers_bert_classifies_like_kilns_classifier() {
    let tmp = tempfile::tempdir().unwrap();
    let base = train_support::tiny_model(&tmp.path().join("base"), TinyLayout::Unprefixed);
    let train = tmp.path().join("train.jsonl");
    train_support::sentiment_jsonl(&train, 48, 5);
    let job = train_support::job(
        &base,
        &train,
        None,
        &tmp.path().join("run"),
        serde_json::json!({"n_epochs": 1, "batch_size": 8}),
        1,
    );
    let run = train_support::run(&job);
    let exported = run.summary().model_dir.clone();
    let (kiln, fast) = both(&exported);
    assert!(kiln.is_classifier() && fast.is_classifier());
    assert_eq!(kiln.labels, ["negative", "positive"]);
    let inputs = rows(&kiln, &TEXTS);
    let refs: Vec<&EncodedText> = inputs.iter().collect();
    let a: Vec<Vec<f32>> = kiln
        .classify(&refs)
        .unwrap()
        .into_iter()
        .map(|c| c.scores)
        .collect();
    let b: Vec<Vec<f32>> = fast
        .classify(&refs)
        .unwrap()
        .into_iter()
        .map(|c| c.scores)
        .collect();
    assert!(max_diff(&a, &b) < 1e-5, "{a:?} vs {b:?}");
    // And both equal the training code's own classifier on the exported weights.
    let trained =
        kiln::nn::classifier::SequenceClassifier::load_exported(&exported, &Device::Cpu).unwrap();
    let batch = kiln::data::text::pad_batch(&refs, kiln.tokenizer.pad_id());
    let shape = (batch.batch, batch.seq_len);
    let t = |v: &Vec<u32>| candle_core::Tensor::from_slice(v, shape, &Device::Cpu).unwrap();
    let logits = trained
        .forward(
            &t(&batch.input_ids),
            Some(&t(&batch.token_type_ids)),
            &t(&batch.attention_mask),
            false,
        )
        .unwrap();
    let probs = candle_nn::ops::softmax(&logits, 1)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert!(max_diff(&a, &probs) < 1e-5);
}

#[test]
fn roberta_models_run_on_kilns_implementation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("roberta");
    let config = kiln::nn::bert::BertConfig {
        model_type: "roberta".into(),
        pad_token_id: 1,
        max_position_embeddings: 66,
        ..train_support::tiny_config()
    };
    kiln::nn::tiny::write_tiny_bert_with(&dir, &config, 3, TinyLayout::Prefixed).unwrap();
    kiln::nn::tiny::write_tiny_tokenizer(&dir, &["good", "bad", "movie"]).unwrap();
    let auto = EncoderModel::load(&dir, &Device::Cpu, Implementation::Auto).unwrap();
    assert_eq!(auto.implementation, Implementation::Kiln);
    // Positions start after the padding index: 64 usable.
    assert_eq!(auto.classify_max_tokens, 64);
    let err = EncoderModel::load(&dir, &Device::Cpu, Implementation::Candle)
        .err()
        .expect("candle-transformers' BERT cannot run RoBERTa positions");
    assert!(err.to_string().contains("roberta"), "{err}");
}

#[test]
fn the_real_minilm_gives_the_same_embeddings_on_both_implementations() {
    let Ok(dir) = std::env::var("KILN_TEST_MINILM") else {
        eprintln!("KILN_TEST_MINILM is not set: skipped");
        return;
    };
    let (kiln, fast) = both(&PathBuf::from(dir));
    assert_eq!(kiln.embedding_dim(), 384);
    assert_eq!(kiln.embed_max_tokens, 256);
    let inputs = rows(&kiln, &TEXTS);
    let refs: Vec<&EncodedText> = inputs.iter().collect();
    let diff = max_diff(&kiln.embed(&refs).unwrap(), &fast.embed(&refs).unwrap());
    assert!(diff < 1e-5, "MiniLM: implementations differ by {diff}");
}

/// RoBERTa numbers positions after the padding index; kiln's encoder (which serves it) must
/// give what transformers' RobertaModel gives on the same weights (sentence-transformers mean
/// pooling over it, tests/python/reference_outputs.py).
#[test]
fn roberta_embeddings_match_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("roberta");
    let config = kiln::nn::bert::BertConfig {
        model_type: "roberta".into(),
        pad_token_id: 1,
        max_position_embeddings: 66,
        type_vocab_size: 1,
        ..train_support::tiny_config()
    };
    kiln::nn::tiny::write_tiny_bert_with(&dir, &config, 9, TinyLayout::Prefixed).unwrap();
    let words: Vec<&str> = train_support::POSITIVE
        .iter()
        .chain(&train_support::NEGATIVE)
        .chain(&train_support::FILLER)
        .copied()
        .collect();
    kiln::nn::tiny::write_tiny_tokenizer(&dir, &words).unwrap();
    // Real RoBERTa checkpoints say which tokenizer class reads tokenizer.json; without it
    // transformers would pick RobertaTokenizer, whose <s>/</s> template this vocabulary lacks.
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}"#,
    )
    .unwrap();
    let model = EncoderModel::load(&dir, &Device::Cpu, Implementation::Auto).unwrap();
    assert_eq!(model.implementation, Implementation::Kiln);
    let inputs = rows(&model, &TEXTS);
    let refs: Vec<&EncodedText> = inputs.iter().collect();
    let ours = model.embed(&refs).unwrap();
    let hf = serve_support::reference(&dir, "embed", &TEXTS);
    let diff = max_diff(&ours, &serve_support::matrix(&hf["embeddings"]));
    assert!(
        diff < 1e-4,
        "kiln's RoBERTa differs from transformers by {diff}"
    );
}
