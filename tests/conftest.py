"""Shared fixtures for the taskvec tests: tiny real checkpoints and peft adapters, built once.

Every model is a real transformers model (random init, seeded) saved with save_pretrained, so
the files have the exact names, dtypes, sharding and index that the hub's checkpoints have.
Helpers that tests import are plain functions at the bottom of this file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

VOCAB = 256
LLAMA_SHARD = "60KB"  # ~220 KB of bf16 weights -> four shards and an index
LORA_STD = 0.05  # with r=4..8 and s≈1..2 this gives ΔW entries ≈ 0.01, like the weights


@dataclass(frozen=True)
class Pair:
    """A base checkpoint and two independently fine-tuned variants of it."""

    base: Path
    tuned: Path
    tuned2: Path


# ---------------------------------------------------------------- model building


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(folder)


def _perturb(model: torch.nn.Module, seed: int, std: float = 0.01) -> None:
    """Stand-in for fine-tuning: small seeded noise on every parameter, rounded once."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            param.copy_((param.float() + noise).to(param.dtype))


def _build_pair(root: Path, make_model, dtype: torch.dtype, **save_kwargs) -> Pair:
    folders = []
    for name, seed in (("base", None), ("tuned", 1), ("tuned2", 2)):
        torch.manual_seed(0)
        model = make_model().to(dtype)
        if seed is not None:
            _perturb(model, seed)
        folder = root / name
        model.save_pretrained(folder, **save_kwargs)
        _write_tokenizer(folder)
        folders.append(folder)
    return Pair(*folders)


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> Pair:
    """Sharded bf16 LLaMA with an untied lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         max_position_embeddings=128, tie_word_embeddings=False)
    pair = _build_pair(tmp_path_factory.mktemp("llama"), lambda: LlamaForCausalLM(config),
                       torch.bfloat16, max_shard_size=LLAMA_SHARD)
    assert len(list(pair.base.glob("*.safetensors"))) > 2, "the fixture must be sharded"
    return pair


@pytest.fixture(scope="session")
def opt(tmp_path_factory) -> Pair:
    """fp16 OPT with tied embeddings: the files hold no lm_head."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=VOCAB, max_position_embeddings=128, word_embed_proj_dim=64)
    pair = _build_pair(tmp_path_factory.mktemp("opt"), lambda: OPTForCausalLM(config),
                       torch.float16)
    assert not any("lm_head" in name for name in read_tensors(pair.base))
    return pair


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory) -> Pair:
    """fp32 GPT-2 (Conv1D weights stored as (in, out))."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    return _build_pair(tmp_path_factory.mktemp("gpt2"), lambda: GPT2LMHeadModel(config),
                       torch.float32)


@pytest.fixture(scope="session")
def with_buffers(tmp_path_factory) -> Pair:
    """A plain safetensors model whose files also hold integer and bool buffers."""
    root = tmp_path_factory.mktemp("buffers")
    folders = []
    for name, seed in (("base", 0), ("tuned", 1), ("tuned2", 2)):
        generator = torch.Generator().manual_seed(seed)
        tensors = {
            "embeddings.position_ids": torch.arange(32).unsqueeze(0) + seed,
            "encoder.mask": torch.rand(8, 8, generator=generator) > 0.5,
            "encoder.weight": torch.randn(8, 8, generator=generator),
            "encoder.bias": torch.randn(8, generator=generator),
        }
        folders.append(write_checkpoint(root / name, tensors))
    return Pair(*folders)


# ---------------------------------------------------------------- adapters


def _save_adapter(base: Path, out: Path, config, seed: int) -> Path:
    """Wrap the base with peft, give every adapter weight random values (peft initialises
    lora_B, or the embedding's A, to zero, which would make ΔW = 0), and save it."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "lora_" in name:
                param.copy_(noise * LORA_STD)
            elif "modules_to_save" in name:
                param.copy_((param.float() + noise * 0.01).to(param.dtype))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, llama, gpt2) -> dict[str, tuple[Path, Path]]:
    """name -> (base folder, adapter folder)."""
    from peft import IA3Config, LoraConfig

    root = tmp_path_factory.mktemp("adapters")
    specs = {
        "qv": (llama.base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
        # Pattern keys are saved sorted; peft takes the first key that matches a dotted suffix,
        # so "1.self_attn.v_proj" wins over the longer "layers.1.self_attn.v_proj", and "_proj"
        # (not a dotted suffix of anything) matches nothing.
        "rslora_all": (llama.base, LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
            rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
            alpha_pattern={"v_proj": 32, "layers.1.self_attn.v_proj": 40,
                           "1.self_attn.v_proj": 5, "_proj": 99,
                           r"model\.layers\.1\.mlp\.(up|down)_proj": 3})),
        "conv1d": (gpt2.base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                         fan_in_fan_out=True)),
        "embedding": (llama.base, LoraConfig(r=4, lora_alpha=4, target_modules=["embed_tokens"])),
        "modules_to_save": (llama.base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                   modules_to_save=["lm_head"])),
        "dora": (llama.base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                        use_dora=True)),
        "ia3": (llama.base, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                      feedforward_modules=["down_proj"])),
    }
    return {name: (base, _save_adapter(base, root / name, config, seed))
            for seed, (name, (base, config)) in enumerate(specs.items())}


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


# ---------------------------------------------------------------- helpers for tests


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


def cli_env(**overrides: str) -> dict[str, str]:
    """The environment for CLI runs: offline, as on the machines this project targets."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", **overrides}


def run_cli(*args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taskvec", *map(str, args)],
                          capture_output=True, text=True, env=env or cli_env(), timeout=timeout)


def assert_cli_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 1, one stderr line `taskvec: error: ...` holding every needle, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("taskvec: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_one_line(message: str, *needles: str) -> None:
    assert "\n" not in message.strip(), message
    for needle in needles:
        assert needle in message, (needle, message)


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
