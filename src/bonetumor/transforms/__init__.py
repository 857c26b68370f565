"""Transforms: one preprocessing path for training, evaluation and serving.

``decode`` (bytes to RGB), ``stain`` (Reinhard/Macenko normalisation), ``preprocess`` (tile ops and tensors),
``augment`` (training policy), ``tta`` (test-time views).
"""
