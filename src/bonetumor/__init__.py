"""bonetumor: osteosarcoma H&E tile classification, from data validation to a served champion model.

Every lifecycle step has a subpackage of typed functions: data, transforms, balance, training, evaluation,
registry and serving (docs/architecture.md). The CLI, the DVC stages, the Kubeflow components and the BentoML
service are thin adapters over these functions. Importing the package has no side effects.
"""

__version__ = "0.1.0"
