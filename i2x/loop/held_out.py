"""What the recommendation is decided on besides plain held-out images: their counterfactual
copies (``experiment(counterfactual=...)``), made with the run's own target rule."""

from __future__ import annotations

from i2x.loop.target_rule import find_targets
from i2x.loop.targets import NothingToCurate


def counterfactual_split(store, model, validation, train, device=None, memory_budget=None, scope: str = "pair"):
    """The held-out images' counterfactual copies: targets found on them by the run's own rule at
    the experiment's ``scope`` (not saved: the run's targets stay the training set's), each flagged
    cue pasted into a held-out image of another class (the pair's other class, or with
    ``scope="model"`` any other class: :meth:`Targets.counterfactual`). None when nothing is
    flagged there."""
    try:
        held = find_targets(store.path, model, validation, device=device, save=False, probe_dataset=train,
                            memory_budget=memory_budget, scope=scope)
        return held.counterfactual(validation, seed=0)
    except NothingToCurate:
        return None
