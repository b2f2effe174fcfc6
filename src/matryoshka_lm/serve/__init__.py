"""The OpenAI-compatible server: wire protocol (protocol.py), state (state.py), dynamic batching (batcher.py),
replies and SSE (replies.py), metrics (metrics.py), routes (app.py)."""
