"""Upload a Hub-ready folder with huggingface_hub (`vlora-hf push DIR REPO_ID`).

Uploads every file of the folder except cache folders (.cache, .git, __pycache__, .ipynb_checkpoints). Before the
first request it refuses pickles (*.bin, *.pt, *.pth, *.pkl, *.pickle, *.ckpt), secret-looking file names (.env,
token files, keys, credentials) and any file holding a token-like string (Hugging Face, GitHub, AWS, Google keys,
private-key blocks; safetensors files by their header and metadata), and checks the model card's metadata. Then it
creates the repo, commits exactly the checked files and prints the commit URL. `--endpoint` (or HF_ENDPOINT) picks
the server.
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
SKIPPED_FOLDERS = {".cache", ".git", "__pycache__", ".ipynb_checkpoints"}
TOKEN_PATTERNS = {
    "a Hugging Face token": rb"hf_[A-Za-z0-9]{30,}",
    "a GitHub token": rb"(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})",
    "an AWS access key": rb"(?:AKIA|ASIA)[0-9A-Z]{16}",
    "a Google API key": rb"AIza[0-9A-Za-z_-]{35}",
    "a private key": rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----",
}
TOKEN_PATTERN = re.compile(b"|".join(b"(?P<p%d>%s)" % (i, p) for i, p in enumerate(TOKEN_PATTERNS.values())))
CHUNK, OVERLAP = 1 << 20, 256  # files are scanned in chunks that overlap by more than a token's length
MAX_SAFETENSORS_HEADER = 100 * 2**20


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


def _first_token(data: bytes) -> str | None:
    match = TOKEN_PATTERN.search(data)
    if match is None:
        return None
    return list(TOKEN_PATTERNS)[int(match.lastgroup[1:])]


def _safetensors_header(path: Path) -> bytes | None:
    """The JSON header (tensor table and metadata) of a valid safetensors file, else None."""
    with path.open("rb") as f:
        raw = f.read(8)
        size = int.from_bytes(raw, "little") if len(raw) == 8 else 0
        if not 2 <= size <= min(MAX_SAFETENSORS_HEADER, path.stat().st_size - 8):
            return None
        header = f.read(size)
    return header if header.lstrip().startswith(b"{") else None


def find_token(path: Path) -> str | None:
    """What kind of token-like string `path` holds (None: none). A safetensors file is scanned by its header, the
    only place text lives in it; any other file (a misnamed one included) byte by byte."""
    if path.suffix.lower() == ".safetensors":
        header = _safetensors_header(path)
        if header is not None:
            return _first_token(header)
    tail = b""
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            found = _first_token(tail + chunk)
            if found:
                return found
            tail = chunk[-OVERLAP:]
    return None


def upload_files(folder: Path) -> list[Path]:
    """The files an upload of `folder` sends: all of them, cache folders left out."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not SKIPPED_FOLDERS.intersection(p.relative_to(folder).parts[:-1]))


def check_folder(folder: Path) -> list[Path]:
    """Every file to upload; PushError naming pickles, secret-looking files or a bad model card."""
    from .model_card import check_card

    if not folder.is_dir():
        raise PushError(f"{folder} is not a folder")
    files = upload_files(folder)
    if not files:
        raise PushError(f"{folder} is empty")
    pickles = [str(p.relative_to(folder)) for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
    secrets = [str(p.relative_to(folder)) for p in files if is_secret_name(p.name)]
    for p in files:
        found = find_token(p) if str(p.relative_to(folder)) not in secrets else None
        if found:
            secrets.append(f"{p.relative_to(folder)} (holds a string that looks like {found})")
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

    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    files = check_folder(folder)
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"} or constants.HF_HUB_OFFLINE
    if offline:
        raise PushError("HF_HUB_OFFLINE=1 is set: uploading needs the network; unset HF_HUB_OFFLINE to push")
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        # Exactly the checked files: upload_folder would pick its own set.
        operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                      for p in files]
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
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
