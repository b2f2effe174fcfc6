"""Evaluating checkpoints beyond validation loss: lm-evaluation-harness at every size (harness.py, its offline
tasks in harness_tasks/) and the out-of-domain text studies and elastify score on (texts.py)."""
