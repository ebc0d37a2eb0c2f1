//! Choosing the next token from a decoder's logits: greedy at temperature 0, else a seeded
//! draw from the tempered distribution cut to the nucleus `top_p`. Shared by serving and by
//! reinforcement fine-tuning's sampling.

use rand::Rng;
use rand::rngs::StdRng;

/// Greedy at temperature 0; else a draw from the tempered distribution cut to `top_p`.
pub fn sample_token(logits: &[f32], temperature: f64, top_p: f64, rng: &mut StdRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &l)| {
                if l > best.1 { (i, l) } else { best }
            })
            .0 as u32
    };
    if temperature <= 1e-5 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((f64::from(l) - f64::from(max)) / temperature).exp()))
        .collect();
    if top_p < 1.0 {
        probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let total: f64 = probs.iter().map(|p| p.1).sum();
        let mut cumulative = 0.0;
        let mut keep = probs.len();
        for (k, p) in probs.iter().enumerate() {
            cumulative += p.1 / total;
            if cumulative >= top_p {
                keep = k + 1;
                break;
            }
        }
        probs.truncate(keep.max(1));
    }
    let total: f64 = probs.iter().map(|p| p.1).sum();
    if !(total.is_finite() && total > 0.0) {
        return argmax();
    }
    let mut draw = rng.random::<f64>() * total;
    for (i, p) in &probs {
        draw -= p;
        if draw <= 0.0 {
            return *i as u32;
        }
    }
    probs.last().map_or_else(argmax, |p| p.0 as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn greedy_takes_the_largest_logit_and_top_p_cuts_the_tail() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(sample_token(&[0.1, 3.0, -1.0], 0.0, 1.0, &mut rng), 1);
        // With top_p tiny only the most likely token survives, whatever the temperature.
        for _ in 0..50 {
            assert_eq!(sample_token(&[0.1, 3.0, 2.9], 5.0, 0.01, &mut rng), 1);
        }
        // At a high temperature every token is drawn sometimes.
        let mut seen = [false; 3];
        for _ in 0..300 {
            seen[sample_token(&[0.1, 3.0, 2.9], 50.0, 1.0, &mut rng) as usize] = true;
        }
        assert_eq!(seen, [true, true, true]);
    }
}
