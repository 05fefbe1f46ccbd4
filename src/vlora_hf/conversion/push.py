"""Upload a Hub-ready folder with huggingface_hub (`vlora-hf push DIR REPO_ID`).

Refuses folders holding pickles (*.bin, *.pt, *.pth, *.pkl, *.pickle, *.ckpt) or secret-looking files (.env,
token files, keys, credentials, or text that looks like a Hugging Face token), checks the model card's metadata,
then runs create_repo + upload_folder and prints the commit URL. `--endpoint` (or HF_ENDPOINT) picks the server.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
SECRET_NAMES = {"token", "hf_token", "api_token", "access_token", ".netrc", ".git-credentials", "credentials",
                "credentials.json", "id_rsa", "id_ed25519", "id_ecdsa", ".npmrc", ".pypirc", "stored_tokens"}
SECRET_SUFFIXES = (".token", ".pem", ".key", ".p12", ".pfx")
TOKEN_PATTERN = re.compile(rb"hf_[A-Za-z0-9]{30,}")
SCAN_LIMIT = 1_000_000  # text files up to this size are scanned for token-looking strings


class PushError(ValueError):
    """The folder is not fit to upload (the message names the files or the setting)."""


def is_secret_name(name: str) -> bool:
    lower = name.lower()
    return (
        lower in SECRET_NAMES
        or lower == ".env"
        or lower.startswith(".env.")
        or lower.endswith(SECRET_SUFFIXES)
        or (lower.endswith(".env") and not lower.endswith("venv"))
    )


def check_folder(folder: Path) -> list[Path]:
    """Every file to upload; PushError naming pickles, secret-looking files or a bad model card."""
    from .model_card import check_card

    if not folder.is_dir():
        raise PushError(f"{folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.relative_to(folder).parts)
    if not files:
        raise PushError(f"{folder} is empty")
    pickles = [str(p.relative_to(folder)) for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
    secrets = [str(p.relative_to(folder)) for p in files if is_secret_name(p.name)]
    for p in files:
        if p.suffix.lower() in (".safetensors",) or p.stat().st_size > SCAN_LIMIT:
            continue
        if TOKEN_PATTERN.search(p.read_bytes()) and str(p.relative_to(folder)) not in secrets:
            secrets.append(f"{p.relative_to(folder)} (holds a string that looks like a Hugging Face token)")
    problems = []
    if pickles:
        problems.append(f"pickle files {pickles} (they can run code when loaded: convert them to safetensors)")
    if secrets:
        problems.append(f"secret-looking files {secrets}")
    if problems:
        raise PushError(f"refusing to upload {folder}: " + "; ".join(problems))
    check_card(folder / "README.md")
    return files


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
):
    """Check `folder`, create `repo_id` if needed and upload the folder in one commit; returns the CommitInfo."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    folder = Path(folder)
    check_folder(folder)
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"} or constants.HF_HUB_OFFLINE
    if offline:
        raise PushError("HF_HUB_OFFLINE=1 is set: uploading needs the network; unset HF_HUB_OFFLINE to push")
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            repo_type="model",
            commit_message=commit_message or f"Upload VLoRA model ({folder.name})",
        )
    except OfflineModeIsEnabled as err:
        raise PushError(f"HF_HUB_OFFLINE=1 is set: uploading needs the network; unset HF_HUB_OFFLINE ({err})") from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlora-hf push", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a folder written by `vlora-hf convert` or `vlora-hf export`")
    parser.add_argument("repo_id", help="the Hub repo, e.g. your-name/VLoRA-7b-v1-hf")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--commit-message", default=None, help="commit message")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                           commit_message=args.commit_message, endpoint=args.endpoint)
    except ValueError as err:
        print(f"vlora-hf push: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - HTTP errors from the Hub: one line, no traceback
        print(f"vlora-hf push: upload failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"pushed {args.folder} to {args.repo_id}: {info.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
