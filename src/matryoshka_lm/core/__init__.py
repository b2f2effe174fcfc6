"""The nesting itself: the nesting rule and its only owner (nested.py), SubmodelSpec (spec.py), the one plain model
class (model.py), the precision handler a model holds (precision.py, with quant.py's codes), token scoring
(scoring.py) and checkpoints (checkpoint.py). Imports nothing from the other subpackages."""
