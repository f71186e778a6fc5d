"""Reading, writing and editing real checkpoint files; peft's own merge as the reference for
adapter deltas; a hub cache laid out as huggingface_hub writes it."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (all shards), read with safetensors itself."""
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def write_checkpoint(folder: Path, tensors: dict, shards: int = 1) -> Path:
    """A minimal model folder (config.json + safetensors, with an index when sharded)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "synthetic"}))
    names = list(tensors)
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    _write_index(folder, weight_map, tensors)
    return folder


def random_pair(root: Path, shapes: dict[str, tuple[int, ...]], shards: int = 1) -> list[Path]:
    """[base, tuned]: fp32 checkpoints of the given tensor shapes, seeded 0 and 1."""
    folders = []
    for side, seed in (("base", 0), ("tuned", 1)):
        generator = torch.Generator().manual_seed(seed)
        tensors = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
        folders.append(write_checkpoint(Path(root) / side, tensors, shards=shards))
    return folders


def _write_index(folder: Path, weight_map: dict, tensors: dict) -> None:
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensors(folder: Path, edit) -> None:
    """Rewrite a checkpoint in place: edit(name, tensor) returns the new tensor or None to drop
    it. The index (when there is one) follows."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    kept = {}
    for path in sorted(folder.glob("*.safetensors")):
        shard = {}
        for name, tensor in load_file(path).items():
            new = edit(name, tensor)
            if new is not None:
                shard[name] = new.contiguous()
            elif index is not None:
                del index["weight_map"][name]
        save_file(shard, path, metadata={"format": "pt"})
        kept.update(shard)
    if index is not None:
        _write_index(folder, index["weight_map"], kept)


def last_tensor(folder: Path) -> tuple[str, Path]:
    """The last-named tensor of the last shard: the latest a streaming pass reaches it."""
    shard = sorted(folder.glob("*.safetensors"))[-1]
    return sorted(load_file(shard))[-1], shard


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_header(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def tree_digest(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the folders (symlinks followed): inputs must not change."""
    digest = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


@cache
def _peft_merge(base: Path, adapter: Path) -> tuple[dict, dict]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    return before, {k: merged[k] for k in before}


def peft_delta(base: Path, adapter: Path) -> tuple[dict, dict]:
    """(base fp32 tensors, ΔW = merged − base) from peft's own merge_and_unload, restricted to
    the tensors that the base checkpoint's files hold."""
    before, merged = _peft_merge(Path(base), Path(adapter))
    names = read_tensors(base).keys()
    return ({k: before[k] for k in names}, {k: merged[k] - before[k] for k in names})


def assert_close_ulp(actual: torch.Tensor, expected_fp32: torch.Tensor, name: str = "") -> None:
    """actual (any float dtype) equals the fp32 reference rounded to its dtype, within one ulp:
    the reference ΔW comes from peft's matmul, whose summation order is not ours."""
    assert actual.shape == expected_fp32.shape, name
    eps = torch.finfo(actual.dtype).eps
    torch.testing.assert_close(actual.float(), expected_fp32.to(actual.dtype).float(),
                               rtol=max(eps, 2e-6), atol=1e-6, msg=lambda m: f"{name}: {m}")


def layer_norms(deltas: dict[str, torch.Tensor]) -> dict[str, float]:
    """Frobenius norm of the delta per transformer block ("layers.N", whatever the model calls
    its blocks) and per tensor outside the blocks, as taskvec.info reports them."""
    squares: dict[str, float] = {}
    for name, delta in deltas.items():
        if not delta.is_floating_point() or not torch.count_nonzero(delta):
            continue
        block = re.search(r"(?:^|\.)(?:layers|h)\.(\d+)\.", name)
        key = f"layers.{block[1]}" if block else name
        squares[key] = squares.get(key, 0.0) + delta.double().square().sum().item()
    return {key: value**0.5 for key, value in squares.items()}


def make_hub_cache(cache: Path, repo_id: str, src: Path) -> Path:
    """The layout huggingface_hub writes: blobs named by hash, snapshot files as relative
    symlinks to them, refs/main naming the snapshot. Returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        blob = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, repo / "blobs" / blob)
        (snapshot / path.name).symlink_to(Path("../../blobs") / blob)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
