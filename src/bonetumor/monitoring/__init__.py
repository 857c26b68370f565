"""Drift monitoring: are the tiles the service answers still like the tiles the model was trained on?

* :mod:`~bonetumor.monitoring.features`: the tile statistics and the penultimate-layer embedding of a tile;
* :mod:`~bonetumor.monitoring.reference`: the training-side reference of a model version (built at registration,
  saved as ``.npz`` + ``.json``), and :func:`~bonetumor.monitoring.reference.served_features`, what the service
  logs with each answer;
* :mod:`~bonetumor.monitoring.drift`: the tests, the decision (``ok`` / ``drift`` / ``insufficient``) and the
  Markdown / JSON / PNG report.

Nothing is imported here: the service needs only ``reference`` (no scikit-learn, no matplotlib).
"""
