"""Training: models built by name, the training loop, cross-validation over candidates, the refit.

``models`` (torchvision networks by name), ``engine`` (the optimiser loop), ``checkpoint`` (resumable state),
``candidates`` (every model scored on the folds, one protocol), ``cross_validation`` (the train stage),
``refit`` (the winner on all tiles), ``pruning`` and ``export`` (ONNX, INT8, latency).
"""
