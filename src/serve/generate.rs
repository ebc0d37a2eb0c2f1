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
    /// Fills the left of shorter prompts in a batch (never attended to).
    pad_id: u32,
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
        let mut decoder =
            Decoder::load_dir(dir, &varmap, device, &opts).map_err(|e| e.to_string())?;
        // Serving multiplies the same weights again and again: pack them once.
        decoder.pack_for_inference().map_err(|e| e.to_string())?;
        let stop_ids = stop_ids(dir, &config, &tokenizer);
        Ok(GenerativeModel {
            pad_id: tokenizer.pad_id(),
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

    /// New tokens a request may have when its prompt, padded to `padded` positions, shares
    /// the context: at most `max_tokens`.
    pub fn budget(&self, padded: usize, max_tokens: usize) -> usize {
        max_tokens.min(self.max_positions.saturating_sub(padded))
    }

    /// Generates `params.n` samples of `prompt`, calling `emit` as text arrives; stops early
    /// (without error) when `emit` returns false.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        emit: &mut dyn FnMut(GenEvent) -> bool,
    ) -> Result<(), GenerateError> {
        let mut requests = [GenRequest {
            prompt,
            params,
            emit,
        }];
        self.generate_batch(&mut requests).pop().unwrap_or(Ok(()))
    }

    /// Generates for several requests at once: every sample of every request is a row of
    /// one batch, prompts left-padded to the longest (each row decodes as it would alone;
    /// see [`Decoder::new_cache_left_padded`]), finished rows dropped from the cache as they
    /// end. Each request samples from its own seeded generator, so its text does not depend
    /// on what it was batched with. One result per request, in order.
    pub fn generate_batch(
        &self,
        requests: &mut [GenRequest<'_>],
    ) -> Vec<Result<(), GenerateError>> {
        let mut results: Vec<Result<(), GenerateError>> = requests.iter().map(|_| Ok(())).collect();
        let longest = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
        let mut rows: Vec<Row> = Vec::new();
        let mut starts = Vec::new();
        let mut ids = Vec::new();
        let mut budgets = Vec::with_capacity(requests.len());
        let mut rngs = Vec::with_capacity(requests.len());
        for (r, req) in requests.iter().enumerate() {
            let budget = self.budget(longest, req.params.max_tokens);
            budgets.push(budget);
            rngs.push(match req.params.seed {
                Some(seed) => StdRng::seed_from_u64(seed),
                None => StdRng::from_os_rng(),
            });
            if req.prompt.is_empty() {
                results[r] = Err(GenerateError::Input("the prompt is empty".into()));
                continue;
            }
            if budget == 0 {
                results[r] = Err(GenerateError::Input(format!(
                    "the prompt is {} tokens long; this model's context is {} tokens",
                    req.prompt.len(),
                    self.max_positions
                )));
                continue;
            }
            for _ in 0..req.params.n.max(1) {
                rows.push(Row {
                    request: r,
                    index: rows.iter().filter(|row| row.request == r).count(),
                    sample: Sample::default(),
                });
                starts.push(longest - req.prompt.len());
                ids.extend(std::iter::repeat_n(self.pad_id, longest - req.prompt.len()));
                ids.extend_from_slice(req.prompt);
            }
        }
        if rows.is_empty() {
            return results;
        }
        if let Err(e) = self.decode(
            requests, &mut rows, starts, ids, longest, &budgets, &mut rngs,
        ) {
            for (r, result) in results.iter_mut().enumerate() {
                if result.is_ok() && rows.iter().any(|row| row.request == r) {
                    *result = Err(GenerateError::Internal(e.clone()));
                }
            }
        }
        results
    }

    #[allow(clippy::too_many_arguments)]
    fn decode(
        &self,
        requests: &mut [GenRequest<'_>],
        rows: &mut [Row],
        starts: Vec<usize>,
        ids: Vec<u32>,
        longest: usize,
        budgets: &[usize],
        rngs: &mut [StdRng],
    ) -> Result<(), String> {
        let device = self.decoder.device();
        let text = |e: candle_core::Error| e.to_string();
        let mut cache = self.decoder.new_cache_left_padded(starts);
        let mut input = Tensor::from_vec(ids, (rows.len(), longest), device).map_err(text)?;
        // Rows still decoding, in cache order.
        let mut live: Vec<usize> = (0..rows.len()).collect();
        let mut gone = vec![false; requests.len()];
        loop {
            let logits = self
                .decoder
                .forward_cached(&input, &mut cache)
                .map_err(|e| e.to_string())?
                .to_dtype(candle_core::DType::F32)
                .and_then(|l| l.to_vec2::<f32>())
                .map_err(text)?;
            let mut keep = Vec::with_capacity(live.len());
            let mut next = Vec::with_capacity(live.len());
            for (pos, &ri) in live.iter().enumerate() {
                let row = &mut rows[ri];
                let r = row.request;
                if gone[r] {
                    continue;
                }
                let params = requests[r].params;
                let token =
                    sample_token(&logits[pos], params.temperature, params.top_p, &mut rngs[r]);
                let events = if self.stop_ids.contains(&token) {
                    row.sample
                        .finish(self, params, FinishReason::Stop, row.index)?
                } else {
                    row.sample.ids.push(token);
                    let mut events = row.sample.advance(self, params, row.index)?;
                    if !row.sample.finished && row.sample.ids.len() >= budgets[r] {
                        events.extend(row.sample.finish(
                            self,
                            params,
                            FinishReason::Length,
                            row.index,
                        )?);
                    }
                    events
                };
                for e in events {
                    if !(requests[r].emit)(e) {
                        // The client went away: its other rows stop too.
                        gone[r] = true;
                        break;
                    }
                }
                if !row.sample.finished && !gone[r] {
                    keep.push(pos);
                    next.push(token);
                }
            }
            // A request abandoned mid-step may have kept rows before it knew.
            let (keep, next): (Vec<usize>, Vec<u32>) = keep
                .into_iter()
                .zip(next)
                .filter(|(pos, _)| !gone[rows[live[*pos]].request])
                .unzip();
            if keep.is_empty() {
                return Ok(());
            }
            if keep.len() < live.len() {
                cache = cache.select(&keep).map_err(|e| e.to_string())?;
                live = keep.iter().map(|&p| live[p]).collect();
            }
            input = Tensor::from_vec(next, (live.len(), 1), device).map_err(text)?;
        }
    }
}

/// One request of a batch.
pub struct GenRequest<'a> {
    pub prompt: &'a [u32],
    pub params: &'a SamplingParams,
    /// Receives the request's events; returning false abandons the request.
    pub emit: &'a mut dyn FnMut(GenEvent) -> bool,
}

/// One sample being decoded: which request and which of its `n`.
struct Row {
    request: usize,
    index: usize,
    sample: Sample,
}

/// Why generation failed.
#[derive(Debug, Clone)]
pub enum GenerateError {
    /// The request cannot be served (prompt too long, ...).
    Input(String),
    Internal(String),
}

/// One sample's tokens and how much of its text has been sent.
#[derive(Default)]
struct Sample {
    ids: Vec<u32>,
    sent: usize,
    finished: bool,
}

impl Sample {
    fn text(&self, model: &GenerativeModel) -> Result<String, String> {
        model.tokenizer.decode(&self.ids).map_err(|e| e.to_string())
    }

    /// New text that is safe to send, or the end of the sample at a stop string.
    fn advance(
        &mut self,
        model: &GenerativeModel,
        params: &SamplingParams,
        index: usize,
    ) -> Result<Vec<GenEvent>, String> {
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

    fn finish(
        &mut self,
        model: &GenerativeModel,
        params: &SamplingParams,
        reason: FinishReason,
        index: usize,
    ) -> Result<Vec<GenEvent>, String> {
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
