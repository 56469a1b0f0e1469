"""`planner.artifact.load_artifact(folder)`, as the docs and every exported manifest name it: kept for users'
scripts. The code lives in planner.analysis.artifact; nothing inside the package imports this module."""

from planner.analysis.artifact import load_artifact, load_weights_into, set_eval, weightless_structure

__all__ = ["load_artifact", "load_weights_into", "set_eval", "weightless_structure"]
