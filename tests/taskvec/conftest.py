"""Shared fixtures for the taskvec tests: tiny real checkpoints and peft adapters, built once.

Every model is a real transformers model (random init, seeded) saved with save_pretrained, so
the files have the exact names, dtypes, sharding and index that the hub's checkpoints have.
Helpers that tests import live in tests/support/.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.support.checkpoints import read_tensors, write_checkpoint

VOCAB = 256
LLAMA_SHARD = "60KB"  # ~220 KB of bf16 weights -> four shards and an index
LORA_STD = 0.05  # with r=4..8 and s≈1..2 this gives ΔW entries ≈ 0.01, like the weights


@dataclass(frozen=True)
class Pair:
    """A base checkpoint and two independently fine-tuned variants of it."""

    base: Path
    tuned: Path
    tuned2: Path


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


@pytest.fixture(scope="session")
def adapter_without_alpha(tmp_path_factory, llama) -> tuple[Path, Path]:
    """(base, adapter) at r = 16 whose adapter_config.json has no lora_alpha: peft then uses
    its default α = 8, not α = r."""
    import json

    from peft import LoraConfig

    config = LoraConfig(r=16, lora_alpha=64, target_modules=["q_proj", "v_proj"])
    adapter = _save_adapter(llama.base, tmp_path_factory.mktemp("no_alpha") / "adapter", config,
                            seed=11)
    path = adapter / "adapter_config.json"
    fields = json.loads(path.read_text())
    del fields["lora_alpha"]
    path.write_text(json.dumps(fields, indent=2))
    return llama.base, adapter
