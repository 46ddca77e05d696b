"""How the text baseline's TF-IDF settings (fedssl/evaluation/baselines.py) were picked: on a validation split
of the fortunes run's consented TRAINING pool, never its test split.

    .venv/bin/python simulations/fortunes_tfidf_validation.py [configs/experiments/fortunes-mlm.yaml]

Prints validation accuracy per analyzer / n-gram range / C at the run's label counts (two label seeds each).
"""

from __future__ import annotations

import sys

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from fedssl.data.sampling import stratified_subset
from fedssl.data.text import decode
from fedssl.experiment import central_data_for, load_experiment

CANDIDATES = [(analyzer, ngrams, C) for analyzer, ngrams in (("char_wb", (1, 4)), ("char_wb", (2, 5)), ("word", (1, 2)))
              for C in (1.0, 10.0, 100.0)]
VALIDATION_SIZE = 300


def main(config_path: str) -> None:
    config = load_experiment(config_path)
    data = central_data_for(config)  # the test split stays untouched below: only data.train is read
    assert data.labels is not None, "the config needs data.labels"
    ids = data.labels.consented_ids(data.train.sample_ids)
    row = {sample_id: i for i, sample_id in enumerate(data.train.sample_ids)}
    texts = [decode(data.train.inputs[row[i]].long().tolist()) for i in ids]
    labels = data.labels.labels_for(ids)
    order = np.random.default_rng(0).permutation(len(ids))
    validation, pool = order[:VALIDATION_SIZE], order[VALIDATION_SIZE:]
    counts = [config.evaluation.labels_needed(f, len(data.train), len(set(labels))) for f in config.evaluation.label_fractions]
    for analyzer, ngrams, C in CANDIDATES:
        vectorizer = TfidfVectorizer(analyzer=analyzer, ngram_range=ngrams, sublinear_tf=True, max_features=50_000)
        vectorizer.fit([texts[i] for i in pool])  # as the evaluation fits it: on the pool's inputs, no labels
        scores = []
        for count in counts:
            for seed in (0, 1):
                chosen = pool[stratified_subset(labels[pool], count, seed)]
                probe = LogisticRegression(C=C, max_iter=2000)
                probe.fit(vectorizer.transform([texts[i] for i in chosen]), labels[chosen])
                predicted = probe.predict(vectorizer.transform([texts[i] for i in validation]))
                scores.append(f"{count}:{np.mean(predicted == labels[validation]):.3f}")
        print(f"{analyzer:8} {ngrams} C={C:<6g} {' '.join(scores)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "configs/experiments/fortunes-mlm.yaml")
