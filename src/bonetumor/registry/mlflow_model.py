"""MLflow "model from code" script for the bonetumor pyfunc model.

MLflow copies this file into every logged model and executes it when the model is loaded, instead of
unpickling an object (pickles can run arbitrary code and break across versions). bonetumor itself never imports
this module; :func:`bonetumor.registry.model_registry.log_and_register` passes its path to ``mlflow.pyfunc.log_model``.
"""

from mlflow.models import set_model

from bonetumor.registry.model_registry import BoneTumorPyfunc

set_model(BoneTumorPyfunc())
