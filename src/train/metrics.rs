//! Evaluation metrics for classifiers: accuracy, macro-F1, per-class precision/recall/F1,
//! the confusion matrix, ROC-AUC for binary tasks, and their multi-label counterparts.
//! Plain functions over plain values, so they are easy to check by hand.

use serde::{Deserialize, Serialize};

/// Precision, recall, F1 and support of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassReport {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: u64,
}

/// Everything kiln reports about a single-label classifier on one evaluation set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassificationReport {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub per_class: Vec<ClassReport>,
    /// `confusion[true][predicted]` counts.
    pub confusion_matrix: Vec<Vec<u64>>,
    /// Area under the ROC curve, for two-class tasks only.
    pub roc_auc: Option<f64>,
}

/// Precision/recall/F1 with the convention that 0/0 is 0 (as scikit-learn's `zero_division=0`).
fn prf(tp: u64, fp: u64, fn_: u64) -> (f64, f64, f64) {
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let precision = ratio(tp, tp + fp);
    let recall = ratio(tp, tp + fn_);
    let f1 = if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    };
    (precision, recall, f1)
}

/// Scores single-label predictions. `probabilities[i]` is the predicted distribution of
/// example `i` (used for ROC-AUC when there are two classes); the prediction is its argmax.
pub fn classification_report(
    labels: &[String],
    truth: &[usize],
    probabilities: &[Vec<f32>],
) -> ClassificationReport {
    let k = labels.len();
    let mut confusion = vec![vec![0u64; k]; k];
    let mut correct = 0u64;
    for (&t, probs) in truth.iter().zip(probabilities) {
        let p = argmax(probs);
        if t < k && p < k {
            confusion[t][p] += 1;
        }
        correct += u64::from(t == p);
    }
    let per_class: Vec<ClassReport> = (0..k)
        .map(|c| {
            let tp = confusion[c][c];
            let fp: u64 = (0..k).filter(|&r| r != c).map(|r| confusion[r][c]).sum();
            let fn_: u64 = (0..k).filter(|&p| p != c).map(|p| confusion[c][p]).sum();
            let (precision, recall, f1) = prf(tp, fp, fn_);
            ClassReport {
                label: labels[c].clone(),
                precision,
                recall,
                f1,
                support: tp + fn_,
            }
        })
        .collect();
    let macro_f1 = if k == 0 {
        0.0
    } else {
        per_class.iter().map(|c| c.f1).sum::<f64>() / k as f64
    };
    let roc_auc = (k == 2).then(|| {
        let scores: Vec<f32> = probabilities
            .iter()
            .map(|p| p.get(1).copied().unwrap_or(0.0))
            .collect();
        let positive: Vec<bool> = truth.iter().map(|&t| t == 1).collect();
        roc_auc(&scores, &positive)
    });
    ClassificationReport {
        accuracy: if truth.is_empty() {
            0.0
        } else {
            correct as f64 / truth.len() as f64
        },
        macro_f1,
        per_class,
        confusion_matrix: confusion,
        roc_auc: roc_auc.flatten(),
    }
}

/// Index of the largest value (the first on ties); 0 for an empty slice.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// ROC-AUC by the rank-sum (Mann-Whitney) formula, with ties counted as half.
/// None when one of the classes is absent (the AUC is undefined).
pub fn roc_auc(scores: &[f32], positive: &[bool]) -> Option<f64> {
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks over ties.
    let mut ranks = vec![0.0f64; scores.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &idx in &order[i..=j] {
            ranks[idx] = avg;
        }
        i = j + 1;
    }
    let rank_sum: f64 = (0..scores.len())
        .filter(|&i| positive[i])
        .map(|i| ranks[i])
        .sum();
    let u = rank_sum - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos as f64 * n_neg as f64))
}

/// Multi-label scores: each label is a binary decision at probability 0.5.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultiLabelReport {
    /// Fraction of examples whose whole label set is predicted exactly.
    pub exact_match: f64,
    /// Fraction of (example, label) decisions that are right.
    pub label_accuracy: f64,
    pub micro_f1: f64,
    pub macro_f1: f64,
    pub per_class: Vec<ClassReport>,
}

/// Scores multi-label predictions: `truth[i][c]` says whether example `i` has label `c`,
/// `probabilities[i][c]` is the predicted probability (sigmoid) of it.
pub fn multi_label_report(
    labels: &[String],
    truth: &[Vec<bool>],
    probabilities: &[Vec<f32>],
) -> MultiLabelReport {
    let k = labels.len();
    let (mut tp, mut fp, mut fn_) = (vec![0u64; k], vec![0u64; k], vec![0u64; k]);
    let (mut exact, mut right, mut decisions) = (0u64, 0u64, 0u64);
    for (t, p) in truth.iter().zip(probabilities) {
        let mut all = true;
        for c in 0..k {
            let actual = t.get(c).copied().unwrap_or(false);
            let predicted = p.get(c).is_some_and(|&x| x >= 0.5);
            match (actual, predicted) {
                (true, true) => tp[c] += 1,
                (false, true) => fp[c] += 1,
                (true, false) => fn_[c] += 1,
                (false, false) => {}
            }
            all &= actual == predicted;
            right += u64::from(actual == predicted);
            decisions += 1;
        }
        exact += u64::from(all);
    }
    let per_class: Vec<ClassReport> = (0..k)
        .map(|c| {
            let (precision, recall, f1) = prf(tp[c], fp[c], fn_[c]);
            ClassReport {
                label: labels[c].clone(),
                precision,
                recall,
                f1,
                support: tp[c] + fn_[c],
            }
        })
        .collect();
    let (_, _, micro_f1) = prf(tp.iter().sum(), fp.iter().sum(), fn_.iter().sum());
    let n = truth.len().max(1) as f64;
    MultiLabelReport {
        exact_match: exact as f64 / n,
        label_accuracy: right as f64 / decisions.max(1) as f64,
        micro_f1,
        macro_f1: if k == 0 {
            0.0
        } else {
            per_class.iter().map(|c| c.f1).sum::<f64>() / k as f64
        },
        per_class,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("c{i}")).collect()
    }

    fn one_hot(k: usize, i: usize) -> Vec<f32> {
        (0..k).map(|j| if i == j { 1.0 } else { 0.0 }).collect()
    }

    #[test]
    fn a_hand_checked_three_class_report() {
        // truth:     0 0 1 1 2 2
        // predicted: 0 1 1 1 2 0
        let truth = [0, 0, 1, 1, 2, 2];
        let predicted = [0, 1, 1, 1, 2, 0];
        let probs: Vec<Vec<f32>> = predicted.iter().map(|&p| one_hot(3, p)).collect();
        let r = classification_report(&names(3), &truth, &probs);
        assert!((r.accuracy - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(
            r.confusion_matrix,
            vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 1]]
        );
        // class 0: tp 1, fp 1, fn 1 → p .5 r .5 f1 .5; class 1: tp 2 fp 1 fn 0 → p 2/3 r 1 f1 .8;
        // class 2: tp 1 fp 0 fn 1 → p 1 r .5 f1 2/3.
        assert!((r.per_class[0].f1 - 0.5).abs() < 1e-12);
        assert!((r.per_class[1].precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((r.per_class[1].f1 - 0.8).abs() < 1e-12);
        assert!((r.per_class[2].recall - 0.5).abs() < 1e-12);
        assert!((r.macro_f1 - (0.5 + 0.8 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
        assert_eq!(r.per_class[2].support, 2);
        assert_eq!(r.roc_auc, None, "only for two classes");
    }

    #[test]
    fn roc_auc_matches_hand_computation() {
        // Perfect ranking, reversed ranking, and a tie.
        assert_eq!(
            roc_auc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]),
            Some(1.0)
        );
        assert_eq!(
            roc_auc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]),
            Some(0.0)
        );
        assert_eq!(roc_auc(&[0.5, 0.5], &[false, true]), Some(0.5));
        // scikit-learn: roc_auc_score([0,0,1,1],[0.1,0.4,0.35,0.8]) == 0.75
        assert_eq!(
            roc_auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]),
            Some(0.75)
        );
        assert_eq!(roc_auc(&[0.1, 0.2], &[true, true]), None);
    }

    #[test]
    fn binary_reports_include_auc() {
        let truth = [0, 0, 1, 1];
        let probs = vec![
            vec![0.9, 0.1],
            vec![0.6, 0.4],
            vec![0.65, 0.35],
            vec![0.2, 0.8],
        ];
        let r = classification_report(&names(2), &truth, &probs);
        assert_eq!(r.roc_auc, Some(0.75));
        assert!((r.accuracy - 0.75).abs() < 1e-12);
    }

    #[test]
    fn multi_label_counts_each_decision() {
        let truth = vec![vec![true, false], vec![true, true], vec![false, false]];
        let probs = vec![vec![0.9, 0.1], vec![0.8, 0.2], vec![0.7, 0.1]];
        let r = multi_label_report(&names(2), &truth, &probs);
        assert!((r.exact_match - 1.0 / 3.0).abs() < 1e-12);
        assert!((r.label_accuracy - 4.0 / 6.0).abs() < 1e-12);
        // label 0: tp 2 fp 1 fn 0 → f1 0.8; label 1: tp 0 fp 0 fn 1 → f1 0.
        assert!((r.per_class[0].f1 - 0.8).abs() < 1e-12);
        assert_eq!(r.per_class[1].f1, 0.0);
        assert!((r.macro_f1 - 0.4).abs() < 1e-12);
        // micro: tp 2 fp 1 fn 1 → p 2/3 r 2/3 f1 2/3
        assert!((r.micro_f1 - 2.0 / 3.0).abs() < 1e-12);
    }
}
