"""A planted-concept dataset: the ground truth the analysis is held to.

Every image (1 x 28 x 28) shows two small drawn shapes on faint noise, at random cells of a 3 x 3
layout (so they never overlap). Each class is defined by its pair of shapes:

    class 0 "ring+bar"      ring and bar
    class 1 "ring+plus"     ring and plus        <- shares the ring with class 0: the confusable pair
    class 2 "x+triangle"    x and triangle
    class 3 "square+dot"    square and dot

In a share ``ambiguous`` of classes 0 and 1 the distinguishing shape is left out (or drawn at
``faint`` strength), so the ring alone is what the model sees: those samples cannot be told
apart, the pair stays confused, and the ring's effect on confidence in 0 versus 1 swings as
training pushes those samples one way and then the other. The bar and the plus each belong to one class.
The generator also returns where every shape was drawn, so tests can tell which prototype sits
on which shape.
"""

from __future__ import annotations

import torch

SIZE = 28
CELL = 9  # 3 x 3 cells of 9 px (27 px), offset 1 px from the border
SHAPES = ("ring", "bar", "plus", "x", "triangle", "square", "dot")
CLASS_SHAPES = (("ring", "bar"), ("ring", "plus"), ("x", "triangle"), ("square", "dot"))
CLASSES = ["ring+bar", "ring+plus", "x+triangle", "square+dot"]
SHARED_SHAPE = "ring"
CONFUSED_PAIR = (0, 1)
UNIQUE_SHAPES = {"bar": 0, "plus": 1}


def _glyph(name: str) -> torch.Tensor:
    """A 7 x 7 binary glyph."""
    g = torch.zeros(7, 7)
    r = torch.arange(7)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    d2 = (yy - 3) ** 2 + (xx - 3) ** 2
    if name == "ring":
        g[(d2 >= 5) & (d2 <= 10)] = 1
    elif name == "bar":
        g[2:5, :] = 1
    elif name == "plus":
        g[3, :] = 1
        g[:, 3] = 1
    elif name == "x":
        g[yy == xx] = 1
        g[yy == 6 - xx] = 1
    elif name == "triangle":
        g[(yy >= 1) & ((xx - 3).abs() <= (yy - 1) // 2)] = 1
        g[6, :] = 1
    elif name == "square":
        g[0, :] = g[6, :] = 1
        g[:, 0] = g[:, 6] = 1
    elif name == "dot":
        g[d2 <= 2] = 1
    else:
        raise ValueError(name)
    return g


GLYPHS = {name: _glyph(name) for name in SHAPES}


def make_planted(n_per_class: int = 150, seed: int = 0, ambiguous: float = 0.3, faint: float = 0.0, noise: float = 0.15):
    """Returns ``(images [N, 1, 28, 28], labels [N], placements)`` where ``placements[i]`` maps
    each drawn shape to its ``(top, left)`` pixel corner (a left-out shape is not listed)."""
    g = torch.Generator().manual_seed(seed)
    n = n_per_class * len(CLASS_SHAPES)
    images = torch.randn(n, 1, SIZE, SIZE, generator=g) * noise
    labels = torch.arange(len(CLASS_SHAPES)).repeat_interleave(n_per_class)
    placements = []
    for i in range(n):
        cls = int(labels[i])
        cells = torch.randperm(9, generator=g)[:2].tolist()
        where = {}
        for j, (shape, cell) in enumerate(zip(CLASS_SHAPES[cls], cells)):
            top = 1 + (cell // 3) * CELL + int(torch.randint(0, 3, (1,), generator=g))
            left = 1 + (cell % 3) * CELL + int(torch.randint(0, 3, (1,), generator=g))
            strength = 1.0
            if cls in CONFUSED_PAIR and j == 1 and float(torch.rand(1, generator=g)) < ambiguous:
                strength = faint  # the distinguishing shape is missing (or faint)
            if strength > 0:
                images[i, 0, top:top + 7, left:left + 7] += strength * GLYPHS[shape]
                where[shape] = (top, left)
        placements.append(where)
    perm = torch.randperm(n, generator=g)
    return images[perm], labels[perm], [placements[int(p)] for p in perm]


def shape_map(placements, grid: int = 7, size: int = SIZE) -> torch.Tensor:
    """``[N, grid, grid]`` index into SHAPES of the shape whose 7 x 7 box holds each grid cell's
    centre, -1 for background."""
    scale = size / grid
    centres = torch.arange(grid) * scale + scale / 2
    out = torch.full((len(placements), grid, grid), -1, dtype=torch.long)
    for i, where in enumerate(placements):
        for shape, (top, left) in where.items():
            rows = (centres >= top) & (centres < top + 7)
            cols = (centres >= left) & (centres < left + 7)
            out[i][rows[:, None] & cols[None, :]] = SHAPES.index(shape)
    return out


def prototype_shapes(assignment: torch.Tensor, placements, majority: float = 0.5) -> list[str]:
    """The planted shape each prototype sits on: the shape holding at least ``majority`` of its
    assigned positions, else ``"background"``."""
    k_count = int(assignment.max()) + 1
    where = shape_map(placements, assignment.shape[1])
    names = []
    for k in range(k_count):
        on = where[assignment == k] + 1
        share = torch.bincount(on, minlength=len(SHAPES) + 1).float() / max(1, on.numel())
        best = int(share[1:].argmax()) + 1
        names.append(SHAPES[best - 1] if share[best] >= majority else "background")
    return names


def train_and_track(run_dir, seed: int = 0, n_per_class: int = 500, probe_per_class: int = 100, epochs: int = 8,
                    batch_size: int = 32, lr: float = 1e-3, widths=(8, 16, 32), n_checkpoints: int = 12,
                    n_prototypes: int = 12):
    """Train a small ResNet on the planted data with an online Tracker, then find prototypes.

    The probe set is a stratified subset of the training images, as in the method. Returns
    ``(store, probe_placements)``.
    """
    from i2x.data import stratified_subset
    from i2x.models import SmallResNet
    from i2x.track import Probe

    torch.manual_seed(seed)
    x, y, placements = make_planted(n_per_class, seed=seed)
    probe_idx = stratified_subset(y, probe_per_class * len(CLASSES), seed=seed)
    probe = Probe(x[probe_idx], y[probe_idx], CLASSES, indices=probe_idx, dataset={"name": "planted", "seed": seed})
    model = SmallResNet(num_classes=len(CLASSES), in_channels=1, widths=widths)
    store = adam_train_tracked(model, x, y, probe, run_dir, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                               n_checkpoints=n_checkpoints, n_prototypes=n_prototypes)
    return store, [placements[int(i)] for i in probe_idx]


def adam_train_tracked(model, x, y, probe, run_dir, *, seed: int, epochs: int, batch_size: int, lr: float,
                       n_checkpoints: int, n_prototypes: int):
    """Adam on ``(x, y)`` in seeded shuffles, ``model.layer3`` tracked online on ``probe``; the
    prototypes found at the end. Returns the run's store."""
    import torch.nn.functional as F

    from i2x.track import Tracker

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = len(y) // batch_size
    tracker = Tracker(model, "layer3", probe, run_dir, planned_steps=epochs * steps_per_epoch,
                      n_checkpoints=n_checkpoints)
    g = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            model.train()
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
            tracker.step(step)
    return tracker.finish(step, prototypes={"n_prototypes": n_prototypes, "seed": seed})
