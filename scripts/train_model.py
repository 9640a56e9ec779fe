#!/usr/bin/env python3
"""Train the fraud model on features computed by streamscore itself.

Steps (all reproducible from the seed):
  1. `streamscore generate --output` writes a labelled transaction stream;
  2. `streamscore features export` runs the pipeline's own window code over
     it (point-in-time features), so training and serving features are the
     same code;
  3. a standardised logistic regression is fitted on the first 75 % of the
     stream (by event time) and evaluated on the last 25 %;
  4. the scaler is folded into the weights and the model is written as plain
     ONNX MatMul + Add + Sigmoid (float32 [N, 20] -> [N, 1]): tract runs that
     in about 1 us per call and 25 ns per row in batches of 64
     (shared/reference/tract-onnx-notes.md), where tree ensembles cost
     ~200 us per row in tract;
  5. writes models/fraud.onnx, models/fraud.json (signature),
     models/fraud.testvectors.json (rows + expected probabilities, checked by
     a Rust test through tract) and models/MODEL_CARD.md.

Usage: python3 scripts/train_model.py [--bin target/release/streamscore]
Needs: pip install scikit-learn numpy onnx
"""

import argparse
import csv
import datetime
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, precision_score, recall_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def load_csv(path):
    with open(path, newline="") as f:
        r = csv.reader(f)
        header = next(r)
        rows = list(r)
    names = header[4:]
    X = np.array([[float(v) for v in row[4:]] for row in rows], dtype=np.float32)
    y = np.array([int(row[2]) for row in rows], dtype=np.int32)
    patterns = np.array([row[3] for row in rows])
    return names, X, y, patterns


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/streamscore"))
    ap.add_argument("--count", type=int, default=500_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--merchants", type=int, default=2_000)
    ap.add_argument("--workdir", default=os.path.join(ROOT, "data"))
    ap.add_argument("--out", default=os.path.join(ROOT, "models"))
    ap.add_argument("--threshold", type=float, default=0.5)
    a = ap.parse_args()

    os.makedirs(a.workdir, exist_ok=True)
    stream = os.path.join(a.workdir, "train.jsonl")
    table = os.path.join(a.workdir, "train.csv")
    run([a.bin, "generate", "--output", stream, "--count", str(a.count), "--seed", str(a.seed),
         "--users", str(a.users), "--merchants", str(a.merchants), "--start-ms", "1764000000000"])
    run([a.bin, "features", "export", "--input", stream, "--output", table])

    names, X, y, patterns = load_csv(table)
    n_train = int(len(y) * 0.75)
    Xtr, ytr, Xte, yte = X[:n_train], y[:n_train], X[n_train:], y[n_train:]
    scaler = StandardScaler().fit(Xtr)
    # Constant columns would divide by zero: keep their scale at 1.
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    clf = LogisticRegression(C=1.0, max_iter=5000)
    clf.fit((Xtr - scaler.mean_) / scale, ytr)

    w = clf.coef_[0] / scale
    b = clf.intercept_[0] - float(np.sum(clf.coef_[0] * scaler.mean_ / scale))
    W = w.astype(np.float32).reshape(-1, 1)
    B = np.array([b], dtype=np.float32)

    def predict(Xs):
        z = Xs.astype(np.float32) @ W + B
        return (1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))).ravel()

    p_sk = clf.predict_proba((Xte - scaler.mean_) / scale)[:, 1]
    p_fold = predict(Xte)
    assert np.max(np.abs(p_sk - p_fold)) < 1e-4, "folding the scaler changed predictions"

    auc = roc_auc_score(yte, p_fold)
    pr_auc = average_precision_score(yte, p_fold)
    pred = (p_fold >= a.threshold).astype(int)
    prec = precision_score(yte, pred, zero_division=0)
    rec = recall_score(yte, pred, zero_division=0)
    per_pattern = {}
    for pat in sorted(set(patterns[n_train:]) - {""}):
        m = patterns[n_train:] == pat
        per_pattern[pat] = {"n": int(m.sum()), "recall": float(pred[m].mean())}
    fp_rate = float(pred[yte == 0].mean())

    inp = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", len(names)])
    out = helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1])
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "W"], ["z0"]),
            helper.make_node("Add", ["z0", "B"], ["z"]),
            helper.make_node("Sigmoid", ["z"], ["probability"]),
        ],
        "fraud_lr",
        [inp],
        [out],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="streamscore/scripts/train_model.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    os.makedirs(a.out, exist_ok=True)
    onnx.save(model, os.path.join(a.out, "fraud.onnx"))

    today = datetime.date.today().isoformat()
    # The feature set is part of the version: a model trained on other
    # features is another model.
    fset = hashlib.sha256(",".join(names).encode()).hexdigest()[:8]
    version = f"fraud-lr-{today}-s{a.seed}-f{fset}"
    training = {
        "algorithm": "logistic regression (scikit-learn), scaler folded into weights",
        "rows": int(len(y)), "train_rows": int(n_train), "test_rows": int(len(yte)),
        "split": "first 75% of the stream by event time / last 25%",
        "fraud_share": float(y.mean()),
        "roc_auc": float(auc), "pr_auc": float(pr_auc),
        "threshold": a.threshold, "precision": float(prec), "recall": float(rec),
        "false_positive_rate": fp_rate,
        "per_pattern_recall": per_pattern,
        "generator": {"count": a.count, "seed": a.seed, "users": a.users, "merchants": a.merchants},
    }
    sig = {"version": version, "input": "features", "output": "probability",
           "features": names, "training": training}
    with open(os.path.join(a.out, "fraud.json"), "w") as f:
        json.dump(sig, f, indent=2)
        f.write("\n")

    # Test vectors: held-out rows, all frauds among the first ones plus normals.
    idx_f = np.where(yte == 1)[0][:60]
    idx_n = np.where(yte == 0)[0][:140]
    idx = np.sort(np.concatenate([idx_f, idx_n]))
    vectors = {"rows": Xte[idx].tolist(), "probabilities": p_fold[idx].astype(float).tolist()}
    with open(os.path.join(a.out, "fraud.testvectors.json"), "w") as f:
        json.dump(vectors, f)

    coef_lines = "\n".join(f"| `{n}` | {c:+.4f} |" for n, c in zip(names, clf.coef_[0]))
    pattern_lines = "\n".join(f"| {p} | {v['n']} | {v['recall']:.3f} |" for p, v in per_pattern.items())
    card = f"""# Model card: {version}

**What it is.** A logistic regression over the {len(names)} window features of
streamscore (docs/FEATURES.md), exported as plain ONNX
(MatMul + Add + Sigmoid, float32 input `features` `[N, {len(names)}]`, output
`probability` `[N, 1]`) with the standardisation folded into the weights.
Trained by `scripts/train_model.py` on {len(y):,} transactions from
`streamscore generate --seed {a.seed} --users {a.users} --merchants {a.merchants}`,
features computed by `streamscore features export` (the pipeline's own code).

**Why this family.** tract runs a MatMul/Sigmoid model in about 1 us per call
and 25 ns per row in batches of 64; tree ensembles as ONNX-ML run at ~200 us
per row in tract (shared/reference/tract-onnx-notes.md). The per-event budget
of streamscore is a few microseconds, and on this data the features carry most
of the signal (the notes measured LR 0.885 vs boosted trees 0.892 AUC).

## Held-out evaluation (last 25 % of the stream by event time)
| metric | value |
|---|---|
| ROC-AUC | {auc:.4f} |
| PR-AUC (average precision) | {pr_auc:.4f} |
| fraud share | {yte.mean():.4f} |
| precision at threshold {a.threshold} | {prec:.4f} |
| recall at threshold {a.threshold} | {rec:.4f} |
| false-positive rate at threshold {a.threshold} | {fp_rate:.5f} |

Recall by injected pattern at threshold {a.threshold}:

| pattern | held-out rows | recall |
|---|---|---|
{pattern_lines}

## Weights (on standardised features)
| feature | coefficient |
|---|---|
{coef_lines}

## Limits
- Synthetic data: the fraud patterns are the generator's (card testing,
  account takeover, compromised merchant); real fraud differs. Retrain on
  real labelled data exported with `streamscore features export`.
- The traffic shape matters: windows count events per user and merchant, so
  a stream with far more events per user than the training stream shifts
  the count features. Train on traffic like the one you score.
- `tests` check that tract reproduces these probabilities
  (models/fraud.testvectors.json) within 1e-4.
"""
    with open(os.path.join(a.out, "MODEL_CARD.md"), "w") as f:
        f.write(card)
    print(json.dumps({"version": version, "roc_auc": auc, "pr_auc": pr_auc, "precision": prec,
                      "recall": rec, "per_pattern": per_pattern}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
