"""Stages 3-8: from a run's records and prototypes to what the model learned from which parts,
when classes separated, which prototypes are uncertain or decisive in the confused pairs, and
which are shortcut candidates over the whole model.

:mod:`i2x.analysis.readings` holds the formulas (pure functions of tensors, one per reading);
:mod:`i2x.analysis.shortcuts` the model-wide shortcut reading;
:mod:`i2x.analysis.run_analysis` runs them over a run folder and stores the result.
"""

from i2x.analysis.readings import (
                                   ZERO_VARIANCE_RTOL,
                                   assignment_counts,
                                   changes,
                                   class_presence,
                                   cluster_trajectories,
                                   confusion_matrices,
                                   find_groups,
                                   flag_uncertain,
                                   group_min_cluster_size,
                                   most_confused_pairs,
                                   pair_decisive,
                                   pair_error,
                                   pair_presence,
                                   pair_uncertainty,
                                   presence,
                                   prototype_intensity,
                                   prototype_scores,
                                   register_uncertainty_score,
                                   resolve_uncertainty_score,
                                   ridge_beta,
                                   ridge_sequence,
                                   score_cancellation,
                                   score_decisive,
                                   score_sign_changes,
                                   score_swing,
                                   separating_prototypes,
                                   separation_index,
                                   separation_timeline,
                                   shared_and_specialised,
                                   sign_changes,
                                   standardize_columns,
                                   uncertainty_scores,
                                   uses_hdbscan,
)
from i2x.analysis.run_analysis import (
                                   DEFAULTS,
                                   SCHEMA,
                                   SCHEMA_VERSION,
                                   UNCERTAINTY_PRESENCE,
                                   UNCERTAINTY_REGRESSIONS,
                                   Analysis,
                                   PrototypeEvidence,
                                   SampleExplanation,
                                   analyze,
                                   explain_sample,
                                   load_analysis,
)
from i2x.analysis.shortcuts import (
                                   SHORTCUT_FORMULA,
                                   class_skew,
                                   flag_shortcuts,
                                   model_shortcuts,
                                   saliency_concentration,
                                   shortcut_scores,
)

__all__ = [
    # the run-level stage
    "SCHEMA", "SCHEMA_VERSION", "DEFAULTS", "UNCERTAINTY_REGRESSIONS", "UNCERTAINTY_PRESENCE",
    "Analysis", "analyze", "load_analysis", "PrototypeEvidence", "SampleExplanation", "explain_sample",
    # the readings (formulas)
    "prototype_intensity", "changes", "standardize_columns", "ridge_beta", "ridge_sequence", "group_min_cluster_size",
    "cluster_trajectories", "find_groups", "presence", "class_presence", "assignment_counts", "pair_presence",
    "uses_hdbscan", "shared_and_specialised", "confusion_matrices", "pair_error", "separation_index",
    "separating_prototypes", "separation_timeline", "most_confused_pairs", "sign_changes", "score_sign_changes",
    "score_cancellation", "register_uncertainty_score", "uncertainty_scores", "resolve_uncertainty_score",
    "prototype_scores", "flag_uncertain", "pair_uncertainty", "score_decisive", "pair_decisive", "ZERO_VARIANCE_RTOL",
    "score_swing",
    # the model-wide shortcut reading
    "SHORTCUT_FORMULA", "class_skew", "saliency_concentration", "shortcut_scores", "flag_shortcuts", "model_shortcuts",
]
