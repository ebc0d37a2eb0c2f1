"""NLTK's sentence METEOR for kiln's `meteor` grader test (tests/graders_reference.rs).

Reads a JSON list of {"hypothesis", "reference"} from stdin and prints their scores as a JSON
list. The texts are split as kiln's graders split them (whitespace, ASCII punctuation trimmed
from each word, lower case); matching is exact, then NLTK's Snowball English stemmer; no
WordNet synonyms (kiln does not match synonyms).
"""

import json
import string
import sys

from nltk.stem.snowball import SnowballStemmer
from nltk.translate.meteor_score import single_meteor_score


class NoSynonyms:
    def synsets(self, word):
        return []


def words(text):
    out = (w.strip(string.punctuation).lower() for w in text.split())
    return [w for w in out if w]


def main():
    pairs = json.load(sys.stdin)
    stemmer = SnowballStemmer("english")
    scores = [
        single_meteor_score(
            words(p["reference"]),
            words(p["hypothesis"]),
            stemmer=stemmer,
            wordnet=NoSynonyms(),
        )
        for p in pairs
    ]
    json.dump(scores, sys.stdout)


if __name__ == "__main__":
    main()
