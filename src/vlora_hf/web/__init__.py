"""`vlora-hf web`: the Gradio page for a VLoRA checkpoint (the shipped demo model by default).

  vlora-hf web                      # the demo model on http://127.0.0.1:7860
  vlora-hf web ORG/REPO --port 8000

It binds to 127.0.0.1 unless --host says otherwise, never opens a public share link and never fetches URLs.
Needs the `web` extra: pip install "vlora_hf[web]".
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from ..dtypes import DTYPES

    p = argparse.ArgumentParser(prog="vlora-hf web", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None,
                   help="one of our checkpoint folders or a Hub id (default: the shipped demo model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 opens the page to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ..processing import REMOTE_IMAGES_ENV

    os.environ[REMOTE_IMAGES_ENV] = "0"  # uploads are local files; no code path of the page may fetch a URL
    try:
        from .app import build_app, launch
    except ImportError as err:
        print(f"vlora-hf web: error: {err}; install the web extra: pip install 'vlora_hf[web]'", file=sys.stderr)
        return 1
    from .session import DemoSession

    try:
        session = DemoSession.load(args.model, args.device, args.dtype)
    except (ValueError, OSError) as err:
        print(f"vlora-hf web: error: {err}", file=sys.stderr)
        return 1
    launch(build_app(session), args.host, args.port)
    return 0


__all__ = ["main"]
