"""A GGUF file as a safetensors checkpoint folder that taskvec streams and transformers loads.

GGUF (llama.cpp's format) holds the weights, often quantized, with the config and tokenizer in
one file. transformers reads it through the `gguf` package but keeps the weights packed and will
not save them, and nothing else here reads GGUF. So a GGUF file is converted once: dequantized
with transformers' own reader (which also undoes llama.cpp's Q/K row order), rounded to bf16,
and written with its tokenizer into a cache folder named by the file's hash, atomically. Every
later use of the same bytes reuses that folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from functools import cache, partial
from pathlib import Path

from taskvec.errors import TaskVecError
from taskvec.writer import OutputDir

log = logging.getLogger(__name__)
DTYPE = "bfloat16"  # what the hub's checkpoints of these models ship in


def xdg_cache_home() -> Path:
    """$XDG_CACHE_HOME, else ~/.cache. As the XDG spec says, an empty or relative value is
    ignored (a relative one would put the cache in whatever folder a run starts in)."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return xdg if xdg.is_absolute() else Path("~/.cache").expanduser()


def cache_root() -> Path:
    """$TASKVEC_CACHE, else $XDG_CACHE_HOME/taskvec (~/.cache/taskvec)."""
    if os.environ.get("TASKVEC_CACHE"):
        return Path(os.environ["TASKVEC_CACHE"]).expanduser()
    return xdg_cache_home() / "taskvec"


def _sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_of(path.resolve(), stat.st_size, stat.st_mtime_ns)


@cache  # one run resolves its model several times; a 7B GGUF takes seconds to hash
def _sha256_of(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def converted(path: Path) -> Path:
    """The safetensors folder of a GGUF file, converting it on first use."""
    if not path.is_file():
        raise TaskVecError(f"{path}: not a regular file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise TaskVecError(f"{path}: not a GGUF file (no GGUF magic at its start)")
    folder = cache_root() / "gguf" / f"{path.stem}-{_sha256(path)[:16]}"
    if (folder / "config.json").is_file():  # folders appear only complete (OutputDir)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("%s: converting to safetensors in %s (once)", path, folder)
    try:
        with OutputDir(folder) as tmp:
            _convert(path, tmp)
    except TaskVecError:
        if (folder / "config.json").is_file():  # another process converted it meanwhile
            return folder
        raise
    return folder


def _convert(path: Path, out: Path) -> None:
    try:  # imported here: only GGUF inputs pay for transformers
        import gguf  # noqa: F401  (transformers needs it; say so in our words)
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise TaskVecError(f"{path}: reading GGUF needs the `gguf` package ({e.msg})") from None
    import transformers.modeling_gguf_pytorch_utils as gguf_reader

    # transformers' bars would flood a redirected log (on a terminal they show the conversion).
    # Its GGUF reader calls a bare tqdm that no switch reaches, so that name is swapped for the
    # call's duration.
    quiet, bars, reader_bar = (not sys.stderr.isatty(), hf_logging.is_progress_bar_enabled(),
                               gguf_reader.tqdm)
    if quiet:
        hf_logging.disable_progress_bar()
        gguf_reader.tqdm = partial(reader_bar, disable=True)
    try:
        _dequantize_and_save(path, out)
    finally:
        gguf_reader.tqdm = reader_bar
        if quiet and bars:
            hf_logging.enable_progress_bar()


def _dequantize_and_save(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True,
                                       model_to_load=skeleton)["tensors"]
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # the GGUF readers fail on bad bytes with struct, index, value errors
        raise TaskVecError(f"{path}: cannot read this GGUF file with transformers: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    dtype = getattr(torch, DTYPE)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(dtype) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if config.tie_word_embeddings and k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise TaskVecError(f"{path}: its tensors do not match a {type(model).__name__}: "
                           f"missing {sorted(set(missing) - tied)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]}")
    model.tie_weights()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
