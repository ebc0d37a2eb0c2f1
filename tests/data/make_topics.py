"""Writes topics-train.jsonl and topics-valid.jsonl: short English sentences about four topics
(sports, cooking, technology, weather), used by the real-model fine-tuning test. Sentences are
assembled from hand-written fragments with a fixed seed, so the files are reproducible; the
validation file uses subjects and phrasings the training file never contains."""

import json
import random

TOPICS = {
    "sports": {
        "subjects": ["The striker", "Our goalkeeper", "The home team", "The coach", "The veteran sprinter",
                     "The rookie quarterback", "The tennis champion", "The captain", "The relay squad",
                     "The underdog club", "The point guard", "The cyclist"],
        "held_out_subjects": ["The shortstop", "The marathon runner", "The boxing champion", "The hockey defenseman"],
        "predicates": ["scored twice in the final minutes of the match", "was traded before the playoff deadline",
                       "broke the national record in the hundred meters", "signed a new contract with the league",
                       "missed a penalty kick in extra time", "won the championship after a tense overtime",
                       "trained all summer for the tournament", "was injured during the second half",
                       "celebrated the victory with the fans in the stadium", "lost the semifinal on penalties"],
        "held_out_predicates": ["hit a home run in the ninth inning", "finished the race in record time",
                                "knocked out the challenger in the third round"],
    },
    "cooking": {
        "subjects": ["The chef", "My grandmother", "The baker", "Our neighbor", "The pastry cook", "The restaurant",
                     "The recipe", "My roommate", "The food blogger", "The line cook", "The caterer", "Dad"],
        "held_out_subjects": ["The sous chef", "The cookbook author", "Aunt Maria", "The street vendor"],
        "predicates": ["simmered the tomato sauce with fresh basil for an hour", "kneaded the bread dough before letting it rise",
                       "roasted the vegetables with garlic and olive oil", "whisked the eggs into a fluffy omelette",
                       "seasoned the soup with salt, pepper and thyme", "baked a chocolate cake for the party",
                       "marinated the chicken overnight in lemon and herbs", "chopped onions and carrots for the stew",
                       "caramelized the sugar for the dessert", "served pasta with a creamy mushroom sauce"],
        "held_out_predicates": ["grilled the salmon and squeezed lime over it", "folded the dumplings and steamed them",
                                "stirred the risotto until the rice was tender"],
    },
    "technology": {
        "subjects": ["The startup", "The software engineer", "The new smartphone", "The chip maker", "The developer team",
                     "The cloud provider", "The laptop", "The research lab", "The app", "The database vendor",
                     "The security team", "The robot"],
        "held_out_subjects": ["The browser update", "The semiconductor firm", "The open source project", "The tablet"],
        "predicates": ["released a firmware update that fixes the battery drain", "shipped a faster processor with more cores",
                       "patched a critical vulnerability in the server software", "launched an app that syncs files across devices",
                       "trained a machine learning model on millions of images", "migrated its services to a new data center",
                       "open sourced the compiler toolchain", "announced a laptop with a brighter display",
                       "deployed the code to production after testing", "reduced network latency with a new protocol"],
        "held_out_predicates": ["added end-to-end encryption to its messaging service", "debugged a memory leak in the kernel driver",
                                "unveiled a graphics card for gaming and AI workloads"],
    },
    "weather": {
        "subjects": ["The forecast", "The storm", "The coastal town", "The meteorologist", "The afternoon", "The valley",
                     "The cold front", "The weekend", "The heat wave", "The mountain pass", "The city", "The region"],
        "held_out_subjects": ["The hurricane", "The northern plains", "The blizzard", "The island"],
        "predicates": ["brought heavy rain and strong winds overnight", "warned of thunderstorms and possible hail",
                       "saw temperatures drop below freezing by morning", "expects sunny skies with a light breeze",
                       "had thick fog that delayed flights at the airport", "recorded the hottest day of the summer",
                       "received a foot of snow during the night", "predicts humid weather with scattered showers",
                       "issued a flood warning after days of rain", "will turn cloudy with a chance of drizzle"],
        "held_out_predicates": ["pushed a tornado watch across three counties", "left icy roads and frost on the windshields",
                                "kept the drought going with no rain for weeks"],
    },
}


def sentences(rng, subjects, predicates, n):
    pairs = [(s, p) for s in subjects for p in predicates]
    rng.shuffle(pairs)
    return [f"{s} {p}." for s, p in pairs[:n]]


def main():
    rng = random.Random(20261125)
    train, valid = [], []
    for label, parts in TOPICS.items():
        for text in sentences(rng, parts["subjects"], parts["predicates"], 45):
            train.append({"text": text, "label": label})
        held = sentences(rng, parts["held_out_subjects"], parts["predicates"] + parts["held_out_predicates"], 12)
        held += sentences(rng, parts["subjects"], parts["held_out_predicates"], 8)
        for text in held:
            valid.append({"text": text, "label": label})
    rng.shuffle(train)
    rng.shuffle(valid)
    for name, rows in (("topics-train.jsonl", train), ("topics-valid.jsonl", valid)):
        with open(name, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    print(len(train), "training and", len(valid), "validation examples")


if __name__ == "__main__":
    main()
