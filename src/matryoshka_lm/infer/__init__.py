"""Decoding at any size: sampling rules (sampling.py), stop handling (stops.py), the KV-cached engine (engine.py) and
speculative decoding with a nested draft (speculative.py)."""
