"""Resolve a model source, a local directory or a Hugging Face Hub repo id, to a local snapshot."""

from __future__ import annotations

import fnmatch
import re
import sys
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import (
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
)

from .errors import FlashError

try:  # huggingface_hub >= 1.0 talks through httpx (httpx2 in 2.x); its transport errors are not OSErrors
    from httpx2 import HTTPError as _TransportError
except ImportError:
    try:
        from httpx import HTTPError as _TransportError
    except ImportError:  # requests era: its errors are OSErrors
        _TransportError = OSError
NETWORK_ERRORS = (OSError, _TransportError)
# huggingface_hub >= 2.4 tells a partly downloaded snapshot from a missing one
_INCOMPLETE = getattr(hf_errors, "IncompleteSnapshotError", ())

# What a conversion needs from a repo: config, weights, tokenizer. Nothing else is downloaded.
META_PATTERNS = [
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "*.model", "vocab*", "merges.txt", "chat_template*",
]
SAFETENSORS_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]

HUB_TIMEOUT_S = 10  # the one request that asks the Hub for a repo's files

# owner/name, as huggingface_hub's validate_repo_id accepts them
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def is_repo_id(source: str) -> bool:
    return bool(REPO_ID.match(source)) and ".." not in source and not source.endswith(".git")


def allow_patterns(files: list[str]) -> list[str]:
    """Download patterns for a repo listing `files`: safetensors when there are any, else .bin."""
    has = lambda patterns: any(fnmatch.fnmatch(f, p) for f in files for p in patterns)  # noqa: E731
    if has(SAFETENSORS_PATTERNS):
        return META_PATTERNS + SAFETENSORS_PATTERNS
    if has(BIN_PATTERNS):
        return META_PATTERNS + BIN_PATTERNS
    return []


def resolve(source: str | Path, progress: bool = True) -> Path:
    """A local directory for `source`: an existing directory as is, else a Hub snapshot.

    Hub downloads fetch only config, weights (safetensors preferred over .bin) and tokenizer files,
    resume where an earlier download stopped, and use the token from HF_TOKEN or `hf auth login`.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists():
        raise FlashError(f"{text}: not a directory (expected a model directory or a Hub repo id)")
    if not is_repo_id(text):
        raise FlashError(f"{text}: no such directory (and not a Hub repo id like owner/name)")
    return _download(text, progress)


def _download(repo_id: str, progress: bool) -> Path:
    if hf_constants.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE=1: the cache only, no request at all
        return _cached_snapshot(repo_id, "HF_HUB_OFFLINE=1 is set")
    print(f"fetching {repo_id} from the Hugging Face Hub ...", file=sys.stderr, flush=True)
    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        try:
            # One request, no retries (list_repo_files backs off for ~20 s when offline).
            info = huggingface_hub.HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
        except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError):
            raise
        except NETWORK_ERRORS:
            # Offline or unreachable: a snapshot already in the local cache still works.
            return _cached_snapshot(repo_id, "no network, or the Hub is down")
        patterns = allow_patterns([s.rfilename for s in info.siblings or []])
        if not patterns:
            raise FlashError(f"{repo_id}: the repo has no *.safetensors or pytorch_model*.bin weights")
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
    except FlashError:
        raise
    except hf_errors.GatedRepoError:
        raise FlashError(f"{repo_id}: gated repo: accept its license on huggingface.co, then set "
                         "HF_TOKEN or run `hf auth login`") from None
    except hf_errors.RepositoryNotFoundError:
        raise FlashError(f"{repo_id}: no such repo on the Hugging Face Hub (or it is private: "
                         "set HF_TOKEN or run `hf auth login`)") from None
    except hf_errors.RevisionNotFoundError:
        raise FlashError(f"{repo_id}: revision not found on the Hub") from None
    except NETWORK_ERRORS as e:
        raise FlashError(f"{repo_id}: download failed: {_one_line(e)}") from None
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()


def _cached_snapshot(repo_id: str, why: str) -> Path:
    patterns = META_PATTERNS + SAFETENSORS_PATTERNS + BIN_PATTERNS
    try:
        path = huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns,
                                                 local_files_only=True)
    except NETWORK_ERRORS as e:
        state = "is incomplete in" if isinstance(e, _INCOMPLETE) else "is not in"
        raise FlashError(f"cannot reach the Hugging Face Hub and {repo_id} {state} the local cache "
                         f"({why}); download it once online or pass a local directory") from None
    return Path(path)


def _one_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an error message, cut at a word boundary past `limit` characters."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " ..."
