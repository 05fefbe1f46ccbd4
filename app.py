"""Hugging Face Space entry point: the `vlora-hf web` page on the shipped demo model.

A Space runs `python app.py` from the repository root with requirements.txt installed; the package is read from
src/. The Space sets GRADIO_SERVER_NAME / GRADIO_SERVER_PORT; run locally, the page stays on 127.0.0.1:7860.
VLORA_MODEL may name another checkpoint (a folder or a Hub id).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from vlora_hf.web import main  # noqa: E402

if __name__ == "__main__":
    model = [os.environ["VLORA_MODEL"]] if os.environ.get("VLORA_MODEL") else []
    sys.exit(main([*model, "--host", os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   "--port", os.environ.get("GRADIO_SERVER_PORT", "7860")]))
