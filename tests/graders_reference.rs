//! kiln's `meteor` text-similarity grader against NLTK's `single_meteor_score` (exact and
//! Snowball-stem matching, no synonyms) on generated sentence pairs: inflected forms, repeated
//! words, reordering, punctuation and empty texts.

use kiln::train::graders::{Similarity, similarity};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const WORDS: &[&str] = &[
    "the",
    "a",
    "cat",
    "cats",
    "dog",
    "dogs",
    "run",
    "runs",
    "running",
    "ran",
    "quick",
    "quickly",
    "happy",
    "happily",
    "happiness",
    "generous",
    "generously",
    "sat",
    "sits",
    "sitting",
    "mat",
    "mats",
    "on",
    "under",
    "connect",
    "connected",
    "connection",
    "connects",
    "argue",
    "argued",
    "arguing",
    "skies",
    "sky",
    "dying",
    "die",
    "news",
    "is",
    "was",
    "be",
    "nationalize",
    "nationalization",
    "relational",
    "relate",
    "hopeful",
    "hopefully",
];

fn sentence(rng: &mut StdRng, len: usize) -> String {
    (0..len)
        .map(|_| {
            let w = WORDS[rng.random_range(0..WORDS.len())];
            match rng.random_range(0..12) {
                0 => format!("{w},"),
                1 => w.to_uppercase(),
                2 => format!("\"{w}\"."),
                _ => w.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn nltk_available() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import nltk.translate.meteor_score"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn meteor_matches_nltk() {
    if !nltk_available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have nltk (pip install -r tests/python/requirements.txt)"
        );
        println!("SKIPPED: python3 with nltk is needed for the METEOR reference test");
        return;
    }
    let mut rng = StdRng::seed_from_u64(11);
    let mut pairs = vec![
        (
            "the cats sat on the mat".to_owned(),
            "the cat sat on the mat".to_owned(),
        ),
        ("".to_owned(), "the cat".to_owned()),
        ("the cat".to_owned(), "".to_owned()),
        ("running dogs".to_owned(), "the dog runs".to_owned()),
    ];
    for _ in 0..300 {
        let len = rng.random_range(1..14);
        let reference = sentence(&mut rng, len);
        let hypothesis = if rng.random_bool(0.3) {
            // A reordering of the reference, with a word or two changed.
            let mut words: Vec<&str> = reference.split(' ').collect();
            let n = words.len();
            for _ in 0..rng.random_range(0..3) {
                words.swap(rng.random_range(0..n), rng.random_range(0..n));
            }
            words.join(" ")
        } else {
            let len = rng.random_range(1..14);
            sentence(&mut rng, len)
        };
        pairs.push((hypothesis, reference));
    }
    let input: Vec<serde_json::Value> = pairs
        .iter()
        .map(|(h, r)| serde_json::json!({"hypothesis": h, "reference": r}))
        .collect();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/meteor_reference.py"
    );
    let mut child = std::process::Command::new("python3")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(serde_json::to_string(&input).unwrap().as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "meteor_reference.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Vec<f64> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(theirs.len(), pairs.len());
    let mut nonzero = 0;
    for ((h, r), want) in pairs.iter().zip(&theirs) {
        let got = similarity(Similarity::Meteor, h, r);
        assert!(
            (got - want).abs() < 1e-9,
            "METEOR of {h:?} against {r:?}: kiln {got}, NLTK {want}"
        );
        nonzero += usize::from(*want > 0.0);
    }
    assert!(
        nonzero > 100,
        "the pairs share words often enough: {nonzero}"
    );
}
