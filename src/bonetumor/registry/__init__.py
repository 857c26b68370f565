"""Registry: MLflow tracking, the champion gate, model registration and the pyfunc model.

``tracking`` (runs and provenance tags), ``gate`` (champion or challenger), ``register`` (the register stage),
``model_registry`` (MLflow registry calls and the pyfunc), ``bundle`` (weights plus metadata on disk).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Registered models carry a copy of the "model from code" script of their day, which imports
    # ``bonetumor.registry.BoneTumorPyfunc``; resolved lazily so importing this package pulls in no MLflow.
    if name == "BoneTumorPyfunc":
        from bonetumor.registry.model_registry import BoneTumorPyfunc

        return BoneTumorPyfunc
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
