"""`vlora_shapes_vqa`: shapes-vqa's held-out questions as an lmms-eval task, and the same questions for our loop.

The questions are the held-out split of the demo-scale comparison (docs/vlora_vs_llava.md): the eval split
(never drawn for training), seed 0, 600 classic images and the relation and small families in their training
proportion (20 000 each beside 60 000 classic images: 200 images each), two questions per image, 2000 in all.
They are drawn here and saved as a local `datasets` folder (`load_from_disk`), so no Hub download is
involved. Scoring is our exact match (`normalize_answer`), per family and overall.

The task's YAML names this module's functions with lmms-eval's `!function` tag, which reads any attribute:
its `dataset_path` is `DATASET_DIR`, computed on first access (module `__getattr__`), i.e. only when lmms-eval
loads the task: the folder is drawn then, once, under `HF_DATASETS_CACHE`, named by a digest of the drawing
code and the settings (a change to either never reads an older copy). This module does not import lmms-eval;
`vlora-hf evaluate` uses `heldout_questions` for our own loop.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..atomic import atomic_folder
from ..data import shapes, shapes_families
from ..data.shapes_dataset import heldout_rows
from ..data.shapes_families import question_family
from ..training.evaluate import normalize_answer

TASK_NAME = "vlora_shapes_vqa"
CLASSIC_IMAGES = 600
FAMILIES = {"relation": 20000, "small": 20000}  # training counts: the eval split keeps their proportion ...
TRAINING_IMAGES = 60000                         # ... to the classic training images
SEED = 0
FAMILY_NAMES = ("color", "shape", "count", "describe", "relation_color", "relation_yesno", "small_count",
                "small_shape")


def tasks_dir() -> Path:
    """The folder to give lmms-eval as `--include_path` (it holds `vlora_shapes_vqa.yaml`)."""
    return Path(__file__).parent / "tasks"


def heldout_questions(classic_images: int = CLASSIC_IMAGES, seed: int = SEED):
    """-> (PIL images, rows [(image index, question, answer)]): the task's questions, in the task's order."""
    scale = classic_images / CLASSIC_IMAGES
    families = {f: round(n * scale) for f, n in FAMILIES.items()}
    return heldout_rows(classic_images, seed, None, families, round(TRAINING_IMAGES * scale))


def _source_digest() -> str:
    """A digest of the code that draws the questions: part of the `datasets` cache key, so a change to the
    drawing code never reads an older cached copy."""
    digest = hashlib.sha256()
    for module in (shapes, shapes_families):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def build_dataset(cache_root: str | os.PathLike | None = None, classic_images: int = CLASSIC_IMAGES,
                  seed: int = SEED) -> Path:
    """Draw the task's documents (one per question) into a `datasets` folder with one split, `test`; -> the
    folder. Reused when it exists; written atomically (a folder beside it, then a rename)."""
    import datasets

    root = Path(cache_root or datasets.config.HF_DATASETS_CACHE)
    target = root / f"{TASK_NAME}-{classic_images}-{seed}-{_source_digest()}"
    if (target / "dataset_dict.json").is_file():
        return target
    images, rows = heldout_questions(classic_images, seed)
    features = datasets.Features({"question_id": datasets.Value("int32"), "image_index": datasets.Value("int32"),
                                  "image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "family": datasets.Value("string")})
    columns = {"question_id": list(range(len(rows))), "image_index": [i for i, _, _ in rows],
               "image": [images[i] for i, _, _ in rows], "question": [q for _, q, _ in rows],
               "answer": [a for _, _, a in rows], "family": [question_family(q) for _, q, _ in rows]}
    test = datasets.Dataset.from_dict(columns, features=features)
    with atomic_folder(target, replace=True) as tmp:
        datasets.DatasetDict({"test": test}).save_to_disk(str(tmp))
    return target


def __getattr__(name: str):
    if name == "DATASET_DIR":  # the task's dataset_path, drawn on first use
        return str(build_dataset())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc: dict, results: list[str]) -> dict:
    """-> {"exact_match": 0/1, "exact_match_FAMILY": 0/1} (only the doc's own family: lmms-eval averages each
    metric over the docs that report it)."""
    hit = int(normalize_answer(results[0]) == normalize_answer(doc["answer"]))
    return {"exact_match": hit, f"exact_match_{doc['family']}": hit}


__all__ = ["FAMILY_NAMES", "TASK_NAME", "build_dataset", "doc_to_text", "doc_to_visual", "heldout_questions",
           "process_results", "tasks_dir"]
