"""Kubeflow Pipelines adapter: the pipeline definition, its compiler entry point and a submit helper.

* ``python -m pipelines.compile`` writes ``pipelines/training_pipeline.yaml`` (``--check`` verifies it is fresh).
* ``python -m pipelines.submit --host URL`` submits the compiled pipeline with params.yaml as its ``params``.
"""
