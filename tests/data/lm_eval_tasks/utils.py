"""Loads pycode_choice.jsonl from this folder (lm-evaluation-harness calls ``load`` through ``custom_dataset``)."""

from pathlib import Path


def load(**kwargs):
    import datasets

    path = Path(__file__).with_name("pycode_choice.jsonl")
    return datasets.load_dataset("json", data_files={"test": str(path)})
