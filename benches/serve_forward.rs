//! Which transformer implementation serves BERT faster: kiln's training implementation
//! (`nn::bert`, used with gradients off) or candle-transformers' BERT (the inference fast
//! path), on the same weights, in the same process. Decides `KILN_SERVE_IMPL=auto`.
//!
//!     cargo bench --bench serve_forward [-- MODEL_DIR]
//!
//! MODEL_DIR defaults to $KILN_TEST_MINILM (all-MiniLM-L6-v2; scripts/fetch-minilm.sh).
//! Prints milliseconds per forward pass (median of repeated runs) for batches of 1, 8 and 64
//! texts of the topics validation set, and the ratio.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use kiln::data::text::EncodedText;
use kiln::serve::{EncoderModel, Implementation, Purpose};

fn median_ms(mut f: impl FnMut(), seconds: f64) -> f64 {
    f(); // warm-up
    let mut times = Vec::new();
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < seconds || times.len() < 5 {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .or_else(|| std::env::var("KILN_TEST_MINILM").ok())
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("give a model directory or set KILN_TEST_MINILM"))?;
    let texts: Vec<String> = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/topics-valid.jsonl"
    ))?
    .lines()
    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    .filter_map(|v| v["text"].as_str().map(str::to_owned))
    .collect();
    let kiln = EncoderModel::load(&dir, &Device::Cpu, Implementation::Kiln)?;
    let fast = EncoderModel::load(&dir, &Device::Cpu, Implementation::Candle)?;
    let threads = candle_core::utils::get_num_threads();
    println!("model: {}  threads: {threads}", dir.display());
    println!(
        "{:>6} {:>8} {:>12} {:>12} {:>8}",
        "batch", "tokens", "kiln ms", "candle ms", "kiln/candle"
    );
    for batch in [1usize, 8, 64] {
        let rows: Vec<EncodedText> = texts
            .iter()
            .cycle()
            .take(batch)
            .map(|t| kiln.tokenize(t, Purpose::Embed, true))
            .collect::<Result<_, _>>()?;
        let refs: Vec<&EncodedText> = rows.iter().collect();
        let tokens: usize = rows.iter().map(|r| r.ids.len()).sum();
        let k = median_ms(
            || {
                kiln.embed(&refs).expect("kiln forward");
            },
            3.0,
        );
        let c = median_ms(
            || {
                fast.embed(&refs).expect("candle forward");
            },
            3.0,
        );
        println!("{batch:>6} {tokens:>8} {k:>12.2} {c:>12.2} {:>8.2}", k / c);
    }
    Ok(())
}
