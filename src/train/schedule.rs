//! Learning-rate schedules: linear warmup, then linear decay, cosine decay or constant.

use serde::{Deserialize, Serialize};

/// How the learning rate moves after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    Linear,
    Cosine,
    Constant,
}

/// The multiplier (0..=1) applied to the base learning rate at optimizer step `step`
/// (0-based) of `total` steps, with `warmup` warmup steps. As transformers'
/// `get_{linear,cosine,constant}_schedule_with_warmup`.
pub fn lr_factor(kind: LrScheduler, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / decay_steps).clamp(0.0, 1.0);
    match kind {
        LrScheduler::Constant => 1.0,
        LrScheduler::Linear => 1.0 - progress,
        LrScheduler::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        assert!((lr_factor(LrScheduler::Linear, 0, 4, 20) - 0.25).abs() < 1e-12);
        assert!((lr_factor(LrScheduler::Linear, 3, 4, 20) - 1.0).abs() < 1e-12);
        assert!((lr_factor(LrScheduler::Linear, 4, 4, 20) - 1.0).abs() < 1e-12);
        assert!((lr_factor(LrScheduler::Linear, 12, 4, 20) - 0.5).abs() < 1e-12);
        assert!((lr_factor(LrScheduler::Cosine, 12, 4, 20) - 0.5).abs() < 1e-12);
        assert!(lr_factor(LrScheduler::Cosine, 19, 4, 20) < 0.02);
        assert_eq!(lr_factor(LrScheduler::Constant, 19, 4, 20), 1.0);
        assert_eq!(lr_factor(LrScheduler::Constant, 0, 0, 20), 1.0);
    }
}
