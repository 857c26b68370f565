"""bonetumor: osteosarcoma H&E tile classification, from data validation to a served champion model.

Every lifecycle step is a module with typed functions (ingest, validate, split, augment, balance, train,
evaluate, register, inference). The CLI, the DVC stages, the Kubeflow components and the BentoML service are
thin adapters over these functions. Importing the package has no side effects.
"""

__version__ = "0.1.0"
