"""Decoding at any size: one validated Request (request.py) through one engine (engine.py: Engine.run /
stream_request), plainly or speculatively (speculative.py, drafts.py, acceptance.py); the decoder's forward passes
(forward.py), sampling and stops, and the size router with its fitting (router*.py)."""
