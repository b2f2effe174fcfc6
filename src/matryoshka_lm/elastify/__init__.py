"""`matryoshka elastify`: make a pretrained Llama elastic end to end (recipe.py runs the stages; preset.py, its
settings; measure.py, speed.py and student.py, its stages; report.py, its README)."""
