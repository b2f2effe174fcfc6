"""Experiments over sizes: Matryoshka vs independently trained models (study.py, report.py) and training recipes
at equal FLOPs (recipes.py, recipes_report.py)."""
