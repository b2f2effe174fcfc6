"""Dataset loader of the shipped tasks (`custom_dataset: !function loader.load_local` in their YAML).

`datasets.load_dataset("json", data_files=...)` reads relative paths from the working directory and writes a cache;
this reads the task's `data_files` relative to this folder instead, so the tasks run from anywhere, offline.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_local(data_files: dict[str, str], **_):
    """{split: JSONL file name} -> a DatasetDict (extra keys lm-eval passes, e.g. its metadata, are ignored)."""
    import datasets

    splits = {}
    for split, name in data_files.items():
        lines = (HERE / name).read_text(encoding="utf-8").splitlines()
        splits[split] = datasets.Dataset.from_list([json.loads(s) for s in lines if s.strip()])
    return datasets.DatasetDict(splits)
