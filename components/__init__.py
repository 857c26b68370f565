"""Kubeflow Pipelines (kfp v2) components of the bonetumor pipeline: one thin component per stage.

The components only translate typed KFP artifacts into the paths that the ``bonetumor`` stage functions take;
all domain logic stays in the package. See :mod:`components.stages`.
"""

from components.stages import (
    BASE_IMAGE,
    augment,
    balance,
    evaluate,
    ingest,
    register,
    split,
    train,
    validate,
)

__all__ = [
    "BASE_IMAGE",
    "augment",
    "balance",
    "evaluate",
    "ingest",
    "register",
    "split",
    "train",
    "validate",
]
