"""Kubeflow Pipelines (kfp v2) components of the bonetumor pipeline: one thin component per step.

The components only translate typed KFP artifacts into the paths that the ``bonetumor`` stage functions take;
all domain logic stays in the package. :func:`components.stages.build_components` builds them for one image.
"""

from components.stages import DEFAULT_IMAGE, STEPS, build_components

__all__ = ["DEFAULT_IMAGE", "STEPS", "build_components"]
