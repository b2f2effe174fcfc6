"""Experiments over sizes, and nothing else: one runner (runner.py: plan -> train -> evaluate -> report; runs.py,
the cache of finished runs and the process pool), one evaluator (evaluate.py), one preset registry (presets.py), and two
studies on top: sizes.py (Matryoshka vs independent baselines, axis ablation, scaling) and recipes.py (training
recipes at equal FLOPs), each with its report (sizes_report.py, recipes_report.py)."""
