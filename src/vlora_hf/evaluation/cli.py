"""`vlora-hf lmms-eval ARGS...`: lmms-eval's own CLI, unchanged, with our task folder on its `--include_path`.

  vlora-hf lmms-eval --model vlora --tasks vlora_shapes_vqa --batch_size 64 --output_path out/eval

lmms-eval finds tasks only in its own folder and in `--include_path` (0.7.3: no task entry point, and its
`LMMS_EVAL_PLUGINS` task folders are added after the task index is built), so this adds ours; the `vlora` model
itself comes from the `lmms_eval.models` entry point and works with plain `lmms-eval` too
(`lmms-eval ... --include_path "$(vlora-hf lmms-eval --tasks-dir)"` finds our task the same way). lmms-eval takes
one `--include_path` folder: an `--include_path` of your own replaces ours.
"""

import sys

from .shapes_task import tasks_dir


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        print("usage: vlora-hf lmms-eval [--tasks-dir | LMMS-EVAL ARGS...]\n\n" + __doc__.strip()
              + "\n\nlmms-eval's own options: lmms-eval eval --help")
        raise SystemExit(0)
    if argv == ["--tasks-dir"]:
        print(tasks_dir())
        return 0
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(tasks_dir())]
    try:
        from lmms_eval.cli.dispatch import main as lmms_eval_main
    except ImportError:
        print("vlora-hf lmms-eval: lmms-eval is not installed (make eval-setup, or pip install 'vlora_hf[eval]')",
              file=sys.stderr)
        return 2
    sys.argv = ["lmms-eval", *argv]
    lmms_eval_main()
    return 0


__all__ = ["main"]
