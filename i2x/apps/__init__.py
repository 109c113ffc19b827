"""Whole jobs built from the stages: the demo pipeline (:mod:`i2x.apps.demo`), explaining image
files with a run's prototypes (:mod:`i2x.apps.explain_files`) and what explaining costs
(:mod:`i2x.apps.bench`). Their modules are imported on use; this package imports nothing."""
