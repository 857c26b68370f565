"""Serving logic shared by ``bonetumor predict``, the MLflow pyfunc and the BentoML service (``predictor``)."""
