"""The nesting itself: SubmodelSpec (spec.py), the slicing rules (nested.py), the one model class (model.py) and
checkpoints (checkpoint.py). Imports nothing from the other subpackages."""
