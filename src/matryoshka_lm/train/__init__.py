"""Training and evaluation: the joint multi-size loop (loop.py) and the mechanics every trainer shares (optim.py,
steps.py), resume (resume.py, state.py), data parallelism (parallelize.py), per-size evaluation (evaluate.py)."""
