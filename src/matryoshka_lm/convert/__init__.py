"""Checkpoints in other shapes: one size as a standalone model (extract.py), Hugging Face export/import (hf.py), and
importance reordering that makes a pretrained model nestable (reorder.py)."""
