"""The label diagnosis at full size, against labels flipped on purpose.

    python -P scripts/label_noise.py OUT [--pair 1,8] [--flip 0.1] [--epochs 4]
                                         [--publish docs/results/label-noise]

Fashion-MNIST's 60,000 training images, with ``--flip`` of each class of ``--pair`` (seeded)
relabelled as the pair's other class. A small ResNet is trained on the noisy labels with i2x's
recipe (online Tracker, prototypes), the run is analysed over every pair of classes, and
``i2x.analysis.labels.diagnose_labels`` reads all 60,000 images (5-fold cross-fitted logistic
regression on the final model's pooled features, then cleanlab). Measured against the planted
truth:

- precision and recall of the pair's likely label issues (suggested label: the other class)
  against the flipped images, and the pair's verdict and figures;
- where the planted pair ranks among the analysis' most confused pairs (the diagnosis reads the
  ones the analysis names; ``i2x labels --n-pairs``);
- the same figures for Fashion-MNIST's own most overlapping pair (T-shirt/top vs Shirt), where
  nothing was flipped, for contrast.

A resumed call reuses the trained run. ``OUT/label_noise.json`` (and with ``--publish``,
``PATH.json``) holds every figure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import i2x
from i2x.analysis.labels import diagnose_labels
from i2x.apps.demo import train_run
from i2x.data import ImageDataset, load_dataset

NATURAL_PAIR = (0, 6)  # T-shirt/top, Shirt


def flip_labels(train: ImageDataset, pair: tuple[int, int], share: float, seed: int = 0):
    """``(noisy dataset, flipped [N] bool)``: ``share`` of each class of ``pair`` relabelled as
    the other class (a seeded draw per class)."""
    g = torch.Generator().manual_seed(seed)
    labels = train.labels.clone()
    flipped = torch.zeros(labels.numel(), dtype=torch.bool)
    for c, other in (pair, pair[::-1]):
        idx = (train.labels == c).nonzero().flatten()
        chosen = idx[torch.randperm(idx.numel(), generator=g)[:round(share * idx.numel())]]
        labels[chosen] = other
        flipped[chosen] = True
    noisy = ImageDataset(train.images, labels, list(train.classes), train.name, train.split, train.mean, train.std)
    return noisy, flipped


def pair_figures(entry: dict, flipped: torch.Tensor | None) -> dict:
    """One pair of the diagnosis, and (with the planted truth) precision and recall of its issues."""
    out = {k: entry[k] for k in ("pair", "names", "images", "issues", "issue_share", "overlap", "verdict", "line")}
    if flipped is not None:
        found = torch.zeros_like(flipped)
        found[torch.as_tensor(entry["issue_positions"], dtype=torch.int64)] = True
        hits = int((found & flipped).sum())
        out.update(flipped=int(flipped.sum()), found=int(found.sum()), true_positives=hits,
                   precision=hits / max(1, int(found.sum())), recall=hits / max(1, int(flipped.sum())))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--pair", default="1,8", help="the two classes whose labels are flipped (default Trouser, Bag)")
    p.add_argument("--flip", type=float, default=0.1, help="share of each class of the pair flipped (default 0.1)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--publish", type=Path, default=None, help="also write PATH.json")
    args = p.parse_args(argv)
    pair = tuple(int(c) for c in args.pair.split(","))
    if len(pair) != 2 or pair[0] == pair[1] or not all(0 <= c < 10 for c in pair):
        p.error(f"--pair: expected two different classes in 0-9, got {args.pair!r}")
    if not 0 < args.flip < 0.5:
        p.error(f"--flip: expected a share in (0, 0.5), got {args.flip}")
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    train, flipped = flip_labels(load_dataset("fashion-mnist", train=True), pair, args.flip, args.seed)
    store, model, _ = train_run(args.out / "run", train, epochs=args.epochs, seed=args.seed,
                                dataset_record={"name": "fashion-mnist", "flipped": list(pair), "flip": args.flip})
    trained_s = time.perf_counter() - began
    m = train.num_classes
    analysis = i2x.analyze(store.path, n_pairs=m * (m - 1) // 2)  # every pair, ranked
    ranked = [tuple(sorted(e["pair"])) for e in analysis.data["uncertainty"]]
    started = time.perf_counter()
    result = diagnose_labels(store.path, model, train, n_pairs=len(ranked), n_images=None, folds=args.folds,
                             seed=args.seed)
    by_pair = {tuple(sorted(e["pair"])): e for e in result["pairs"]}
    planted, natural = tuple(sorted(pair)), tuple(sorted(NATURAL_PAIR))
    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "images": result["images"], "probabilities": result["probabilities"], "head_accuracy": result["accuracy"],
        "issues_overall": result["issues"],
        "planted": {**pair_figures(by_pair[planted], flipped), "rank": ranked.index(planted) + 1},
        "natural": {**pair_figures(by_pair[natural], None), "rank": ranked.index(natural) + 1},
        "verdicts": {f"{a}-{b}": e["verdict"] for (a, b), e in sorted(by_pair.items())},
        "seconds": {"train": round(trained_s, 1), "diagnosis": round(time.perf_counter() - started, 1)},
    }
    text = json.dumps(summary, indent=2)
    (args.out / "label_noise.json").write_text(text)
    if args.publish:
        args.publish.with_suffix(".json").write_text(text)
    pl, na = summary["planted"], summary["natural"]
    print(f"planted {pl['names'][0]} vs {pl['names'][1]} (rank {pl['rank']}): {pl['flipped']} flipped, "
          f"{pl['found']} found, precision {pl['precision']:.3f}, recall {pl['recall']:.3f}; {pl['line']}")
    print(f"natural {na['names'][0]} vs {na['names'][1]} (rank {na['rank']}): {na['line']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
