"""Prototype discovery (I2X stage 2): i2x.track.prototypes.fit_prototypes against scikit-learn KMeans.

    python -P benchmarks/bench_prototypes.py [--repeats 3] [--skip-memory] [--samples 10000]
    pytest benchmarks/bench_prototypes.py --benchmark-only          (pytest-benchmark view)

Workload: synthetic layer features, not a network's: 10,000 probe samples x C=64 channels x 7x7
(490,000 positions, float32, 125 MB, streamed in batches of 256), drawn from a seeded mixture of
32 Gaussian clusters with unequal spreads and sizes, so k-means has real structure to find.
K = 32 prototypes, d = 64 PCA dimensions, k-means on a uniform subsample of 200,000 positions,
n_init = 3, max_iter = 100, tol = 1e-4 for every contender.

Contenders (medians of interleaved runs, ratios against scikit-learn from this one run):
- ``i2x fit_prototypes``: the whole stage: two streaming passes over the features (float64
  covariance, PCA, projection of all positions), subsample, k-means++ + Lloyd (assignment in the
  compiled ``prototype_assign``), assignment of all positions, exemplars.
- ``i2x k-means + assign``: only the part scikit-learn also does, on the same projected vectors
  and the same subsample (i2x's internal k-means, then ``prototype_assign`` of all positions).
- ``sklearn KMeans``: ``KMeans(n_clusters=32, init="k-means++", n_init=3, random_state=0,
  max_iter=100, tol=1e-4).fit(X_sub)`` + ``.predict(X_all)`` on the projected vectors i2x made
  (projection not timed).

Inertia is reported on the fitted subsample (the k-means objective) and over all positions, with
the planted partition's inertia as a reference: with 32 uneven clusters, three k-means++ starts do
not always find every cluster (for i2x or scikit-learn), so which contender ends lower varies
with the seed.
Peak memory is measured in a fresh subprocess per contender: resident memory sampled during the
call, over what the inputs (features, and the projected vectors for the last two) already hold.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved_medians, machine_line  # noqa: E402

from i2x import ops  # noqa: E402
from i2x.track import prototypes as _prototypes  # noqa: E402
from i2x.track.prototypes import fit_prototypes  # noqa: E402


@dataclasses.dataclass(frozen=True)
class DiscoveryCase:
    samples: int = 10_000
    channels: int = 64
    grid: int = 7
    clusters: int = 32  # planted in the synthetic features
    k: int = 32
    pca_dim: int = 64
    n_init: int = 3
    max_iter: int = 100
    tol: float = 1e-4
    max_fit_positions: int = 200_000
    batch_size: int = 256
    seed: int = 0

    @property
    def positions(self) -> int:
        return self.samples * self.grid * self.grid


# ---------------------------------------------------------------------------------------------
# Inputs


def synthetic_features(case: DiscoveryCase) -> tuple[torch.Tensor, torch.Tensor]:
    """``([samples, C, g, g] float32, planted labels [samples, g, g] int64)``: each position is a
    draw from one of ``clusters`` Gaussians (centres N(0, 3^2) per channel, spreads 0.5..1.5,
    uneven cluster sizes)."""
    gen = torch.Generator().manual_seed(case.seed)
    centres = torch.randn(case.clusters, case.channels, generator=gen) * 3.0
    spreads = 0.5 + torch.rand(case.clusters, generator=gen)
    # Uneven cluster sizes: exponential weights (plus a floor) from the seeded generator.
    weights = -torch.log(torch.rand(case.clusters, generator=gen)) + 0.2
    features = torch.empty(case.samples, case.grid, case.grid, case.channels)
    labels = torch.empty(case.samples, case.grid, case.grid, dtype=torch.int64)
    for start in range(0, case.samples, 1000):  # in slabs, to keep the temporaries small
        n = min(1000, case.samples - start)
        drawn = torch.multinomial(weights, n * case.grid * case.grid, replacement=True, generator=gen)
        noise = torch.randn(drawn.numel(), case.channels, generator=gen) * spreads[drawn, None]
        features[start : start + n] = (centres[drawn] + noise).reshape(n, case.grid, case.grid, case.channels)
        labels[start : start + n] = drawn.reshape(n, case.grid, case.grid)
    return features.permute(0, 3, 1, 2).contiguous(), labels


def partition_inertia(x: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Sum of squared distances of the rows of ``x`` to their cluster means (float64, chunked)."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64)
    for rows, lab in zip(x.split(65536), labels.split(65536)):
        sums.index_add_(0, lab, rows.double())
    means = sums / torch.bincount(labels, minlength=k).clamp(min=1)[:, None]
    return sum(float((rows.double() - means[lab]).pow(2).sum()) for rows, lab in zip(x.split(65536), labels.split(65536)))


def batches(case: DiscoveryCase, features: torch.Tensor):
    return lambda: features.split(case.batch_size)


@dataclasses.dataclass
class Setup:
    case: DiscoveryCase
    features: torch.Tensor
    labels: torch.Tensor  # [samples, g, g], the planted clusters
    projected: torch.Tensor | None = None  # [P, d] float32, exactly the vectors i2x clusters
    subsample: torch.Tensor | None = None  # [min(P, max_fit), d], the rows i2x fits on


def make_setup(case: DiscoveryCase, projected: bool = True) -> Setup:
    """The features, and (``projected``) i2x's projection of them and its subsample, made with
    i2x's own passes so every contender clusters the very same vectors."""
    features, labels = synthetic_features(case)
    setup = Setup(case, features, labels)
    if projected:
        feed = batches(case, features)
        moments = _prototypes._accumulate_moments(feed, False)
        mean, components, _ = _prototypes._pca(moments, case.pca_dim)
        setup.projected = _prototypes._project_all(feed, moments, mean, components, False)
        n_fit = min(case.positions, case.max_fit_positions)
        setup.subsample = _prototypes._subsample(setup.projected, n_fit, torch.Generator().manual_seed(case.seed))
    return setup


# ---------------------------------------------------------------------------------------------
# Contenders. Each returns a callable giving (fit inertia, inertia over all positions), called
# outside the timing.


def run_i2x(s: Setup):
    c = s.case
    proto = fit_prototypes(
        batches(c, s.features), n_prototypes=c.k, pca_dim=c.pca_dim, seed=c.seed, max_fit_positions=c.max_fit_positions,
        n_init=c.n_init, max_iter=c.max_iter, tol=c.tol,
    )
    return lambda: (proto.inertia, float(proto.distances.sum(dtype=torch.float64)))


def run_i2x_kmeans(s: Setup):
    c = s.case
    generator = torch.Generator().manual_seed(c.seed)
    if s.subsample.shape[0] < s.projected.shape[0]:
        torch.randperm(s.projected.shape[0], generator=generator)  # the draw the subsample consumed
    centroids, inertia = _prototypes._kmeans(s.subsample, c.k, generator, c.n_init, c.max_iter, c.tol, False)
    _, distance = ops.prototype_assign(s.projected, centroids, return_distances=True)
    return lambda: (inertia, float(distance.sum(dtype=torch.float64)))


def run_sklearn(s: Setup):
    from sklearn.cluster import KMeans

    c = s.case
    x_sub = s.subsample.numpy()
    x_all = s.projected.numpy()
    km = KMeans(n_clusters=c.k, init="k-means++", n_init=c.n_init, random_state=0, max_iter=c.max_iter, tol=c.tol)
    km.fit(x_sub)
    labels = km.predict(x_all)

    def inertias():
        diff = x_all.astype(np.float64) - km.cluster_centers_[labels]
        return float(km.inertia_), float(np.einsum("ij,ij->", diff, diff))

    return inertias


CONTENDERS = {
    "i2x fit_prototypes": run_i2x,
    "i2x k-means + assign": run_i2x_kmeans,
    "sklearn KMeans": run_sklearn,
}
NEEDS_PROJECTION = {"i2x fit_prototypes": False, "i2x k-means + assign": True, "sklearn KMeans": True}
BASELINE = "sklearn KMeans"


# ---------------------------------------------------------------------------------------------
# Memory, in a fresh process per contender

_MEMORY_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import bench_prototypes as b
from _timing import peak_rss_growth
case = b.DiscoveryCase(**json.loads(sys.argv[3]))
setup = b.make_setup(case, projected=b.NEEDS_PROJECTION[sys.argv[2]])
print(json.dumps({"extra": peak_rss_growth(lambda: b.CONTENDERS[sys.argv[2]](setup))}))
"""


def peak_extra_memory(contender: str, case: DiscoveryCase) -> int:
    here = str(Path(__file__).resolve().parent)
    out = subprocess.run(
        [sys.executable, "-P", "-c", _MEMORY_CHILD, here, contender, json.dumps(dataclasses.asdict(case))],
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement of {contender} failed:\n{out.stderr}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["extra"])


# ---------------------------------------------------------------------------------------------
# The table


def discovery_table(repeats: int = 3, case: DiscoveryCase | None = None, memory: bool = True) -> list[dict]:
    """One row per contender: ``contender``, ``median_s``, ``ratio`` (median / scikit-learn's),
    ``peak_extra_mib`` (None without ``memory``), ``inertia_fit`` (on the subsample),
    ``inertia_all`` (over all positions); a last row holds the planted partition's inertia over all
    positions (the other fields None)."""
    case = case or DiscoveryCase()
    setup = make_setup(case)
    inertia = {name: run(setup)() for name, run in CONTENDERS.items()}  # also the warm-up round
    medians = interleaved_medians({n: (lambda r=r: r(setup)) for n, r in CONTENDERS.items()}, repeats, warmup=0)
    planted = partition_inertia(setup.projected, setup.labels.flatten(), case.clusters)
    setup = None  # free the 490k projected vectors before the memory subprocesses run
    rows = []
    for name in CONTENDERS:
        rows.append({
            "contender": name,
            "median_s": medians[name],
            "ratio": medians[name] / medians[BASELINE],
            "peak_extra_mib": peak_extra_memory(name, case) / 2**20 if memory else None,
            "inertia_fit": inertia[name][0],
            "inertia_all": inertia[name][1],
        })
    # What k-means would reach if it recovered the planted clusters exactly.
    rows.append({"contender": "planted partition (reference)", "median_s": None, "ratio": None,
                 "peak_extra_mib": None, "inertia_fit": None, "inertia_all": planted})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| contender | median s | x sklearn | peak extra MiB | inertia (fit subsample) | inertia (all positions) |",
             "|---|---|---|---|---|---|"]
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    for r in rows:
        lines.append(f"| {r['contender']} | {cell(r['median_s'], '.2f')} | {cell(r['ratio'], '.2f')} | "
                     f"{cell(r['peak_extra_mib'], '.0f')} | {cell(r['inertia_fit'], '.6g')} | {cell(r['inertia_all'], '.6g')} |")
    return "\n".join(lines)


def seed_sweep(case: DiscoveryCase, seeds: int) -> list[dict]:
    """i2x's k-means and scikit-learn's KMeans on the same subsample, one k-means++ seed each per
    row (both ``n_init`` starts), inertia over all positions: does one seed's local optimum say who
    clusters better?"""
    from sklearn.cluster import KMeans

    s = make_setup(case)
    rows = []
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        started = time.perf_counter()
        centroids, _ = _prototypes._kmeans(s.subsample, case.k, generator, case.n_init, case.max_iter, case.tol, False)
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        km = KMeans(n_clusters=case.k, init="k-means++", n_init=case.n_init, random_state=seed, max_iter=case.max_iter,
                    tol=case.tol).fit(s.subsample.numpy())
        theirs_s = time.perf_counter() - started
        inertia = {}
        for name, c in (("i2x", centroids), ("sklearn", torch.from_numpy(km.cluster_centers_).float())):
            _, distance = ops.prototype_assign(s.projected, c, return_distances=True)
            inertia[name] = float(distance.sum(dtype=torch.float64))
        rows.append({"seed": seed, "i2x_s": ours_s, "sklearn_s": theirs_s, "i2x_inertia": inertia["i2x"],
                     "sklearn_inertia": inertia["sklearn"]})
    return rows


def format_sweep(rows: list[dict]) -> str:
    lines = ["| seed | i2x k-means s | sklearn KMeans s | i2x inertia | sklearn inertia | i2x / sklearn |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['i2x_s']:.1f} | {r['sklearn_s']:.1f} | {r['i2x_inertia']:.6g} | "
                     f"{r['sklearn_inertia']:.6g} | {r['i2x_inertia'] / r['sklearn_inertia']:.4f} |")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("i2x_s", "sklearn_s", "i2x_inertia", "sklearn_inertia")}
    lines.append(f"| mean | {mean['i2x_s']:.1f} | {mean['sklearn_s']:.1f} | {mean['i2x_inertia']:.6g} | "
                 f"{mean['sklearn_inertia']:.6g} | {mean['i2x_inertia'] / mean['sklearn_inertia']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=DiscoveryCase.samples, help="probe samples (x 7 x 7 positions)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--sweep-seeds", type=int, default=0,
                        help="instead: k-means alone, i2x vs scikit-learn, over this many k-means++ seeds")
    args = parser.parse_args(argv)
    case = DiscoveryCase(samples=args.samples)
    if args.sweep_seeds:
        print(f"Command: `python -P benchmarks/bench_prototypes.py --sweep-seeds {args.sweep_seeds}`\n")
        print(format_sweep(seed_sweep(case, args.sweep_seeds)))
        return 0
    rows = discovery_table(args.repeats, case, memory=not args.skip_memory)
    print(f"\n### Prototype discovery on cpu\n\nMachine: {machine_line('cpu')}.\n"
          f"{case.samples} samples x {case.channels} x {case.grid}x{case.grid} = {case.positions} positions (synthetic, "
          f"{case.clusters} planted clusters), K={case.k}, d={case.pca_dim}, n_init={case.n_init}, "
          f"max_iter={case.max_iter}, fit subsample {min(case.positions, case.max_fit_positions)}; "
          f"medians of {args.repeats} interleaved runs.\n"
          f"Command: `python -P benchmarks/bench_prototypes.py --repeats {args.repeats}`\n")
    print(format_table(rows))
    return 0


# ---------------------------------------------------------------------------------------------
# pytest-benchmark view (one contender per test, grouped)

try:
    import pytest
except ImportError:  # the script itself needs no pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def discovery_setup():
        return make_setup(DiscoveryCase())

    @pytest.mark.parametrize("contender", list(CONTENDERS))
    def test_discovery_contender(benchmark, discovery_setup, contender):
        run = CONTENDERS[contender]
        benchmark.group = "prototype discovery 490k x 64, K=32"
        benchmark.pedantic(lambda: run(discovery_setup), rounds=2, warmup_rounds=0)


if __name__ == "__main__":
    raise SystemExit(main())
