"""Is a model / dataset value a local path or a hub id? Decided once, up front, and said plainly.

``data.path=my_folder`` with no such folder used to go to the hub (33 s of retries, then
"couldn't reach 'my_folder' on the Hub", with no word about the missing folder); an offline hub
model failed with "does not appear to have a file named config.json". ``check_local_or_hub``
answers in well under a second: an existing path is local; a value that cannot be a hub id is a
missing path; in offline mode (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) a hub id must be in
the local hub cache; online, one metadata request (no retry loop) says whether the hub has it.
Every failure names both readings: the folder that does not exist (resolved to an absolute
path) and why it is not a usable hub id.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")   # "name" or "org/name"
FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".txt", ".csv", ".json", ".jsonl", ".parquet")
TRUE = ("1", "true", "yes", "on")
HUB_TIMEOUT_S = 5.0


def offline_var(repo_type: str) -> str | None:
    """The environment variable that puts this kind of hub access offline, if one is set."""
    names = ("HF_HUB_OFFLINE",) + (("HF_DATASETS_OFFLINE",) if repo_type == "dataset" else ("TRANSFORMERS_OFFLINE",))
    return next((n for n in names if os.environ.get(n, "").lower() in TRUE), None)


def in_hub_cache(repo_id: str, repo_type: str) -> bool:
    """Whether a hub download of ``repo_id`` is in the local caches (what offline mode can load)."""
    from huggingface_hub import constants

    folder = f"{repo_type}s--{repo_id.replace('/', '--')}"
    if (Path(constants.HF_HUB_CACHE) / folder).is_dir():
        return True
    if repo_type == "dataset":
        cache = os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets"
        return (Path(cache) / repo_id.replace("/", "___")).is_dir()
    return False


def check_local_or_hub(value: str, key: str, repo_type: str = "model", revision: str | None = None) -> str:
    """``"local"`` or ``"hub"``; otherwise ``FileNotFoundError`` (or ``ConnectionError`` when the
    hub cannot be asked) naming the missing local path and why it is not a hub id.

    Args:
        value: the configured path or hub id.
        key: the config key, for the message (``data.path``).
        repo_type: ``model`` or ``dataset``.
        revision: hub revision to look up.
    """
    value = str(value)
    path = Path(value).expanduser()
    if path.exists():
        return "local"
    where = f"{key}={value!r}: there is no local file or folder of that name (resolved to {path.resolve()})"
    if not HUB_ID.fullmatch(value) or value.lower().endswith(FILE_SUFFIXES):
        raise FileNotFoundError(f"{where}, and it cannot be a hub {repo_type} id either (those look like "
                                "'name' or 'org/name'). Fix the path.")
    if var := offline_var(repo_type):
        if in_hub_cache(value, repo_type):
            return "hub"
        raise FileNotFoundError(
            f"{where}; and offline mode is on ({var}=1), so it cannot be fetched as a hub {repo_type} id, nor is it "
            f"in the local hub cache. Fix the path, or unset {var} to download {value!r} from the hub.")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().repo_info(value, repo_type=repo_type, revision=revision, timeout=HUB_TIMEOUT_S)
        return "hub"
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{where}; the hub {repo_type} {value!r} has no revision {revision!r}.") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{where}; and the hub has no {repo_type} {value!r} (or it is private: log in with `hf auth login`). "
            "Fix the path or the id.") from None
    except Exception as err:   # noqa: BLE001 - network: DNS, refused, timeout, proxy, 5xx
        raise ConnectionError(
            f"{where}; and the hub could not be reached to look up {value!r} as a {repo_type} id "
            f"({type(err).__name__}: {str(err)[:200]}). If it is a local path, fix it; if it is a hub id, check the "
            "network (or HF_ENDPOINT), or set HF_HUB_OFFLINE=1 to use the local hub cache.") from None
