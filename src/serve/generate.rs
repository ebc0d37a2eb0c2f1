//! Text generation with decoder LMs: prompts (a conversation through the model's chat
//! template, or raw text), sampling (greedy at temperature 0, else temperature and nucleus
//! `top_p`, seeded), stop tokens and stop strings, and `n` samples of one prompt decoded
//! side by side as one batch over a KV cache.
//!
//! Text leaves as it is decoded: a sample's new text is held back only while it could still
//! be the start of a stop string or ends inside a multi-byte character.

use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::Value;

use crate::data::chat::DecoderTokenizer;
use crate::nn::decoder::{Decoder, DecoderConfig, DecoderLoadOptions};
use crate::nn::sampling::sample_token;

/// What to generate.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// OpenAI-shaped messages, formatted by the model's chat template.
    Chat(Vec<Value>),
    /// Raw text, tokenised as it is (`/v1/completions`).
    Text(String),
}

/// How to sample.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub max_tokens: usize,
    /// 0 is greedy decoding.
    pub temperature: f64,
    pub top_p: f64,
    pub n: usize,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

/// Why a sample ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Progress of one request, in order.
#[derive(Debug, Clone)]
pub enum GenEvent {
    /// More text of sample `index`.
    Text { index: usize, text: String },
    /// Sample `index` is complete after `tokens` generated tokens.
    Finished {
        index: usize,
        reason: FinishReason,
        tokens: usize,
    },
}

/// A decoder loaded for generation.
pub struct GenerativeModel {
    decoder: Decoder,
    _varmap: VarMap,
    tokenizer: DecoderTokenizer,
    stop_ids: Vec<u32>,
    max_positions: usize,
}

/// The token ids that end a reply: the config's and `generation_config.json`'s end-of-sequence
/// ids, and the chat template's end token.
fn stop_ids(dir: &Path, config: &DecoderConfig, tok: &DecoderTokenizer) -> Vec<u32> {
    let mut ids = config.eos_token_ids();
    let generation: Option<Value> = std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    match generation.as_ref().and_then(|g| g.get("eos_token_id")) {
        Some(Value::Number(n)) => ids.extend(n.as_u64().map(|n| n as u32)),
        Some(Value::Array(list)) => {
            ids.extend(list.iter().filter_map(Value::as_u64).map(|n| n as u32))
        }
        _ => {}
    }
    ids.extend(tok.eos_id());
    ids.sort_unstable();
    ids.dedup();
    ids
}

impl GenerativeModel {
    pub fn load(dir: &Path, device: &Device) -> Result<GenerativeModel, String> {
        let config =
            DecoderConfig::from_file(&dir.join("config.json")).map_err(|e| e.to_string())?;
        let tokenizer = DecoderTokenizer::load(dir).map_err(|e| e.to_string())?;
        let varmap = VarMap::new();
        // Inference only: nothing needs to be a trainable variable.
        let opts = DecoderLoadOptions {
            freeze_embeddings: true,
            freeze_layers: config.num_hidden_layers,
            ..DecoderLoadOptions::default()
        };
        let decoder = Decoder::load_dir(dir, &varmap, device, &opts).map_err(|e| e.to_string())?;
        let stop_ids = stop_ids(dir, &config, &tokenizer);
        Ok(GenerativeModel {
            max_positions: config.max_position_embeddings,
            decoder,
            _varmap: varmap,
            tokenizer,
            stop_ids,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The prompt's token ids.
    pub fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>, String> {
        match prompt {
            Prompt::Chat(messages) => self
                .tokenizer
                .encode_prompt(messages)
                .map_err(|e| e.to_string()),
            Prompt::Text(text) => self.tokenizer.encode_text(text).map_err(|e| e.to_string()),
        }
    }

    /// Generates `params.n` samples of `prompt`, calling `emit` as text arrives; stops early
    /// (without error) when `emit` returns false, and calls `step` before every forward pass
    /// (the caller's slot and deadline checks: an error there ends the request).
    pub fn generate<E>(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        emit: &mut dyn FnMut(GenEvent) -> bool,
        step: &mut dyn FnMut() -> Result<(), E>,
    ) -> Result<(), GenerateError<E>> {
        let n = params.n.max(1);
        if prompt.is_empty() {
            return Err(GenerateError::Input("the prompt is empty".into()));
        }
        let room = self.max_positions.saturating_sub(prompt.len());
        if room == 0 {
            return Err(GenerateError::Input(format!(
                "the prompt is {} tokens long; this model's context is {} tokens",
                prompt.len(),
                self.max_positions
            )));
        }
        let max_tokens = params.max_tokens.min(room);
        let device = self.decoder.device();
        let mut rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let mut samples: Vec<Sample> = (0..n).map(|_| Sample::default()).collect();
        let mut cache = self.decoder.new_cache();
        let rows: Vec<u32> = prompt
            .iter()
            .copied()
            .cycle()
            .take(n * prompt.len())
            .collect();
        let mut input = Tensor::from_vec(rows, (n, prompt.len()), device).map_err(internal)?;
        loop {
            step().map_err(GenerateError::Step)?;
            let logits = self
                .decoder
                .forward_cached(&input, &mut cache)
                .map_err(|e| GenerateError::Internal(e.to_string()))?
                .to_dtype(candle_core::DType::F32)
                .and_then(|l| l.to_vec2::<f32>())
                .map_err(internal)?;
            let mut next = Vec::with_capacity(n);
            for (index, (sample, row)) in samples.iter_mut().zip(&logits).enumerate() {
                if sample.finished {
                    next.push(self.stop_ids.first().copied().unwrap_or(0));
                    continue;
                }
                let token = sample_token(row, params.temperature, params.top_p, &mut rng);
                next.push(token);
                let event = if self.stop_ids.contains(&token) {
                    sample.finish(self, params, FinishReason::Stop, index)?
                } else {
                    sample.ids.push(token);
                    let mut events = sample.advance(self, params, index)?;
                    if !sample.finished && sample.ids.len() >= max_tokens {
                        events.extend(sample.finish(self, params, FinishReason::Length, index)?);
                    }
                    events
                };
                for e in event {
                    if !emit(e) {
                        return Ok(());
                    }
                }
            }
            if samples.iter().all(|s| s.finished) {
                return Ok(());
            }
            input = Tensor::from_vec(next, (n, 1), device).map_err(internal)?;
        }
    }
}

/// Why generation failed.
#[derive(Debug)]
pub enum GenerateError<E> {
    /// The request cannot be served (prompt too long, ...).
    Input(String),
    /// The caller's step hook refused (deadline, shutdown).
    Step(E),
    Internal(String),
}

fn internal<E>(e: candle_core::Error) -> GenerateError<E> {
    GenerateError::Internal(e.to_string())
}

/// One sample's tokens and how much of its text has been sent.
#[derive(Default)]
struct Sample {
    ids: Vec<u32>,
    sent: usize,
    finished: bool,
}

impl Sample {
    fn text<E>(&self, model: &GenerativeModel) -> Result<String, GenerateError<E>> {
        model
            .tokenizer
            .decode(&self.ids)
            .map_err(|e| GenerateError::Internal(e.to_string()))
    }

    /// New text that is safe to send, or the end of the sample at a stop string.
    fn advance<E>(
        &mut self,
        model: &GenerativeModel,
        params: &SamplingParams,
        index: usize,
    ) -> Result<Vec<GenEvent>, GenerateError<E>> {
        let text = self.text(model)?;
        if let Some(at) = params
            .stop
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            let mut events = self.send_upto(&text, at, index);
            events.extend(self.finished_event(FinishReason::Stop, index));
            return Ok(events);
        }
        let safe = safe_end(&text, &params.stop);
        Ok(self.send_upto(&text, safe, index))
    }

    fn finish<E>(
        &mut self,
        model: &GenerativeModel,
        params: &SamplingParams,
        reason: FinishReason,
        index: usize,
    ) -> Result<Vec<GenEvent>, GenerateError<E>> {
        let text = self.text(model)?;
        let end = params
            .stop
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
            .unwrap_or(text.len());
        let mut events = self.send_upto(&text, end, index);
        events.extend(self.finished_event(reason, index));
        Ok(events)
    }

    fn send_upto(&mut self, text: &str, end: usize, index: usize) -> Vec<GenEvent> {
        if end <= self.sent || !text.is_char_boundary(end) || !text.is_char_boundary(self.sent) {
            return Vec::new();
        }
        let chunk = text[self.sent..end].to_owned();
        self.sent = end;
        vec![GenEvent::Text { index, text: chunk }]
    }

    fn finished_event(&mut self, reason: FinishReason, index: usize) -> Vec<GenEvent> {
        self.finished = true;
        vec![GenEvent::Finished {
            index,
            reason,
            tokens: self.ids.len(),
        }]
    }
}

/// How much of `text` can be sent: all but a tail that may begin a stop string, or an
/// unfinished character (decoded as U+FFFD).
fn safe_end(text: &str, stops: &[String]) -> usize {
    let mut end = text.len();
    if text.ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
    let hold = stops
        .iter()
        .filter_map(|stop| {
            stop.char_indices()
                .map(|(i, _)| i)
                .filter(|&i| i > 0)
                .rev()
                .find(|&i| text[..end].ends_with(&stop[..i]))
        })
        .max()
        .unwrap_or(0);
    end -= hold;
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_that_may_start_a_stop_string_is_held_back() {
        let stops = vec!["\n\nUser".to_owned()];
        assert_eq!(safe_end("Paris", &stops), 5);
        assert_eq!(safe_end("Paris\n", &stops), 5);
        assert_eq!(safe_end("Paris\n\nUs", &stops), 5);
        assert_eq!(safe_end("Paris\nx", &stops), 7);
        assert_eq!(safe_end("ab\u{FFFD}", &[]), 2);
    }
}
