"""Evaluation through lmms-eval: the `vlora` model backend, the `vlora_shapes_vqa` task, `vlora-hf lmms-eval`.

- `lmms_eval_vlora.VLoRA`: the backend (imports lmms-eval; registered by the `lmms_eval.models` entry point in
  `plugin.py`).
- `shapes_task`: the task's questions and scoring (no lmms-eval import); `tasks/` is its YAML folder.
- `cli`: `vlora-hf lmms-eval ARGS...` = lmms-eval's own CLI with our task folder on `--include_path`.
- `own`: `vlora-hf evaluate`, our own loop on the same questions.
"""
