"""Benchmark: precision and recall of the refusal detectors (refusal.py) that the default judge is built on.

    python bench/judge_measure.py                  grouped 5-fold CV on the dev split, then the held-out test split
    python bench/judge_measure.py --show-errors    also print every response each detector gets wrong
    python bench/judge_measure.py --speed 1000     time the default judge on 1000 responses

The data is data/refusal_responses.jsonl: hand-written responses, each labelled refused or not, grouped by prompt
(all responses to one prompt share a fold, so paraphrases never straddle train and test). The "test" rows were written
after the detectors were frozen and are scored once by a fit on the dev rows. Results are in refusal.py's docstring.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanowaltz.judge import load_judge  # noqa: E402
from nanowaltz.refusal import (DATA_PATH, EmbeddingDetector, MiniLMEmbedder, PhraseDetector, PrefixDetector,  # noqa: E402
                     fit_logistic, load_refusal_data, phrase_features, pivots_to_compliance)


def grouped_folds(groups, k=5, seed=0):
    """Fold index per row; all responses to one prompt share a fold, so paraphrases never straddle train and test."""
    names = sorted(set(groups))
    np.random.default_rng(seed).shuffle(names)
    fold_of = {g: i % k for i, g in enumerate(names)}
    return np.array([fold_of[g] for g in groups])


def refusal_metrics(pred, gold):
    pred, gold = np.asarray(pred, bool), np.asarray(gold, bool)
    tp, fp, fn = (pred & gold).sum(), (pred & ~gold).sum(), (~pred & gold).sum()
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return dict(precision=precision, recall=recall, f1=2 * precision * recall / max(precision + recall, 1e-9),
                accuracy=(pred == gold).mean(), n=len(gold))


def measure(data_path=DATA_PATH, k=5):
    """Grouped k-fold cross-validation on the dev split, then fit on dev and score the fresh test split once."""
    rows = load_refusal_data(data_path)
    texts = [r["response"] for r in rows]
    gold = np.array([r["refusal"] for r in rows])
    dev = np.array([r["split"] == "dev" for r in rows])
    t0 = time.time()
    emb = MiniLMEmbedder()(texts).astype(np.float64)
    embed_seconds = time.time() - t0
    phr = np.stack([phrase_features(t) for t in texts])
    emb = EmbeddingDetector.EMBED_SCALE * emb
    inputs = {"embedding only": emb, "embedding+phrase": np.hstack([emb, phr]), "phrase features LR": phr}
    predictions = {"prefix (baseline)": np.array(PrefixDetector()(texts)), "phrase (hand weights)": np.array(PhraseDetector()(texts))}
    folds = np.where(dev, grouped_folds([r["group"] for r in rows], k), -1)
    for name, x in inputs.items():
        pred = np.zeros(len(rows), bool)
        for f in range(k):  # cross-validated predictions on dev
            w, b = fit_logistic(x[dev & (folds != f)], gold[dev & (folds != f)].astype(float))
            pred[folds == f] = x[folds == f] @ w + b > 0
        w, b = fit_logistic(x[dev], gold[dev].astype(float))  # the fresh test split is scored by a dev-only fit
        pred[~dev] = x[~dev] @ w + b > 0
        if name == "embedding+phrase":  # the deployed EmbeddingDetector adds the pivot rule on top
            predictions[name + " +pivot rule"] = pred & ~np.array([pivots_to_compliance(t) for t in texts])
        predictions[name] = pred
    kinds = sorted({r["kind"] for r in rows})
    print(f"{len(rows)} responses ({dev.sum()} dev in {k} grouped folds, {(~dev).sum()} fresh test); "
          f"embedding {len(rows)} texts took {embed_seconds:.1f}s")
    print(f"{'detector':29s} {'split':5s} {'prec':>5s} {'rec':>5s} {'F1':>5s} {'acc':>5s}  " +
          " ".join(f"{kd[:10]:>10s}" for kd in kinds))
    for name, pred in predictions.items():
        for split, mask in (("dev", dev), ("test", ~dev)):
            if not mask.any():
                continue
            m = refusal_metrics(pred[mask], gold[mask])
            per_kind = [(pred[mask & (kd_mask := np.array([r["kind"] == kd for r in rows]))] ==
                         gold[mask & kd_mask]) for kd in kinds]
            print(f"{name:29s} {split:5s} {m['precision']:5.2f} {m['recall']:5.2f} {m['f1']:5.2f} {m['accuracy']:5.2f}  "
                  + " ".join(f"{a.mean():10.2f}" if len(a) else f"{'-':>10s}" for a in per_kind))
    return predictions


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA_PATH), help="labelled responses (JSONL, see refusal.load_refusal_data)")
    parser.add_argument("--speed", type=int, default=0, help="time the default judge on this many responses")
    parser.add_argument("--show-errors", action="store_true", help="print the rows each detector gets wrong")
    args = parser.parse_args()
    predictions = measure(args.data)
    if args.show_errors:
        rows = load_refusal_data(args.data)
        for name, pred in predictions.items():
            for r, p in zip(rows, pred):
                if p != r["refusal"]:
                    print(f"[{name}] {r['id']} {r['kind']} gold={r['refusal']}: {r['response'][:110]!r}")
    if args.speed:
        rows = load_refusal_data(args.data)
        texts = [rows[i % len(rows)]["response"] for i in range(args.speed)]
        t0 = time.time()
        judge = load_judge("default")
        t1 = time.time()
        judge(["p"] * len(texts), texts, ["harmful"] * len(texts))
        print(f"default judge: load/fit {t1 - t0:.1f}s, {len(texts)} responses in {time.time() - t1:.1f}s")


if __name__ == "__main__":
    main()
