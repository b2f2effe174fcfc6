"""Studies over sizes: Mix'n'Match search under a budget (mixnmatch.py) and Matryoshka vs independently trained
models (study.py, report.py)."""
