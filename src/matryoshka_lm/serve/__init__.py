"""The OpenAI-compatible server: routes and middleware (app.py), wire protocol (protocol.py, body.py, errors.py),
the model field (serving_models.py), one module per endpoint (serving_completion.py, serving_chat.py,
serving_embedding.py) over a shared generation pipeline (serving.py), the batcher (batcher.py), metrics."""
