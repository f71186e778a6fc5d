"""Turn a user's model argument (folder, GGUF file, Hugging Face id, or short alias) into a local
folder.

Resolution never touches the network: a hub id is looked up in the local Hugging Face cache
(HF_HOME / HF_HUB_CACHE are honoured), so `taskvec` behaves the same on an offline cluster.
"""

from __future__ import annotations

import os
from pathlib import Path

from taskvec.errors import TaskVecError

ALIASES = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "opt-2.7b": "facebook/opt-2.7b",
}


def resolve(name_or_path: str | Path, role: str = "model") -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        from taskvec.gguf import converted  # imports transformers, so only when needed

        return converted(path)
    if path.exists():
        return path
    name = str(name_or_path)
    repo_id = ALIASES.get(name.lower(), name)
    looked_for = f"{repo_id} (alias {name})" if repo_id != name else repo_id
    if repo_id.count("/") != 1 or name.startswith((".", "/", "~")):
        raise TaskVecError(f"{name}: {role} is not an existing folder or file")
    # Imported here: the hub client is only needed for ids, and is slow to import.
    from huggingface_hub import snapshot_download

    cache = hub_cache()
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache))
    except Exception:
        raise TaskVecError(
            f"{name}: {role} {looked_for} is not a local folder and is not in the Hugging Face "
            f"cache ({cache}); download it there (`hf download {repo_id}`) or pass the path of "
            "a local folder"
        ) from None


def hub_cache() -> Path:
    """The cache folder as the environment says now (huggingface_hub reads it once, at import,
    which is too early for a library called from a long-lived process)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"
