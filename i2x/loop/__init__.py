"""Stage 9, the closed loop: targets, the strategies acting on them, the explanation penalty,
training and fine-tuning, the paired experiment, and planted marks to test it on.

    targets.py      :class:`Targets` (what the loop acts on) and the strategies they hand out
    target_rule.py  :func:`find_targets`: from flagged prototypes to targeted samples
    strategies.py   torch Dataset / Sampler objects (exclude, perturb, transplant, reweight)
    penalty.py      :class:`ExplanationPenalty`, a loss term on where the model looks
    training.py     :func:`train`, :func:`finetune`, :func:`evaluate`
    experiments.py  :func:`experiment`: arms x seeds, paired intervals, resumable
    held_out.py     :func:`counterfactual_split`: the held-out images' copies the recommendation reads
    planted.py      :class:`Mark`, :func:`draw_marks`, :func:`plant_mark`: known shortcuts of any shape
    rrr.py          :class:`RRRPenalty`: baseline, "right for the right reasons" (input-gradient penalty)
    jtt.py          :func:`jtt_error_set`, :func:`jtt_sampler`: baseline, "just train twice"
    dfr.py          :func:`dfr_retrain`: baseline, last-layer retraining on a group-balanced set
"""

from i2x.loop.dfr import DFR_C, DFR_SUBSAMPLES, dfr_retrain, final_linear
from i2x.loop.experiments import (
           ALL_ARMS,
           DEFAULT_ARMS,
           QUICK_ARMS,
           experiment,
           load_results,
)
from i2x.loop.held_out import counterfactual_split
from i2x.loop.jtt import JTT_LAMBDA_UP, jtt_error_set, jtt_sampler
from i2x.loop.penalty import ExplanationPenalty
from i2x.loop.planted import SHAPES, Mark, PlantedMark, draw_marks, plant_mark
from i2x.loop.rrr import RRR_WEIGHT, RRRPenalty
from i2x.loop.target_rule import TARGET_DEFAULTS, check_target_options, find_targets, otsu_threshold, separability
from i2x.loop.targets import NothingToCurate, Targets, known_targets, load_targets
from i2x.loop.training import evaluate, finetune, train

__all__ = ["Targets", "NothingToCurate", "find_targets", "known_targets", "load_targets", "TARGET_DEFAULTS",
           "check_target_options", "otsu_threshold", "separability",
           "ExplanationPenalty", "train", "finetune", "evaluate", "experiment", "load_results",
           "counterfactual_split", "ALL_ARMS",
           "DEFAULT_ARMS", "QUICK_ARMS", "PlantedMark", "plant_mark", "Mark", "draw_marks", "SHAPES",
           "RRRPenalty", "RRR_WEIGHT", "jtt_error_set", "jtt_sampler", "JTT_LAMBDA_UP", "dfr_retrain", "final_linear",
           "DFR_C", "DFR_SUBSAMPLES"]
