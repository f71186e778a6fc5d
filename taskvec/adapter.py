"""peft LoRA adapters read as weight edits, without importing peft.

An adapter folder holds adapter_config.json and adapter_model.safetensors. Per target module
its effect on the base weight W is W' = (R or W) + s·B·A, where R is a tensor the adapter
replaces outright (modules_to_save, or a saved base layer) and s = α/r (α/√r with rsLoRA),
with r and α looked up per module in rank_pattern / alpha_pattern exactly as peft does.
We read the config ourselves so that `taskvec` starts without transformers or peft. This module
is the format only: which tensors a module's factors are and with what scale; the arithmetic on
them lives in sources.py (deltas) and inspection.py (norms).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from taskvec.errors import TaskVecError
from taskvec.reader import Checkpoint

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Config switches that make the merge non-linear or not a plain s·B·A: we refuse them.
UNSUPPORTED = {
    "use_dora": "DoRA rescales each column by a learned magnitude, so its delta is not s·B·A",
    "lora_bias": "lora_bias adds a trained bias to B",
    "use_qalora": "QA-LoRA pools inputs before A",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "alora_invocation_tokens": "aLoRA only acts after its invocation tokens",
    "arrow_config": "Arrow routes between several LoRAs per token",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
    "layer_replication": "layer_replication changes the model's layer structure",
    "trainable_token_indices": "trainable tokens are not supported",
}
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$"
                     r"|^(?P<emodule>.+)\.(?P<ekind>lora_embedding_A|lora_embedding_B)$")


def is_adapter(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def _pattern_value(patterns: dict, module: str, default):
    """peft's get_pattern_key: a key matches when it matches a dotted suffix of the module."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraFactors:
    a: str  # tensor names inside the adapter file
    b: str
    scale: float
    embedding: bool  # lora_embedding_A/B: ΔW is (B·A)ᵀ


@dataclass
class TensorEdit:
    """What the adapter does to one base tensor (named as peft names the module's weight)."""

    name: str
    lora: LoraFactors | None = None
    replacement: str | None = None  # adapter tensor that replaces the base tensor


class Adapter:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        config_path = self.folder / CONFIG_NAME
        try:
            self.config = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise TaskVecError(f"{config_path}: unreadable adapter config: {e}") from None
        peft_type = self.config.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise TaskVecError(f"{config_path}: peft_type {peft_type} is not supported "
                               "(only LoRA adds a linear delta s·B·A)")
        for key, why in UNSUPPORTED.items():
            if self.config.get(key):
                raise TaskVecError(f"{config_path}: {key} is set: {why}; not supported")
        if not (self.folder / WEIGHTS_NAME).is_file():
            raise TaskVecError(f"{self.folder}: adapter folder has no {WEIGHTS_NAME}")
        self.checkpoint = Checkpoint(self.folder / WEIGHTS_NAME)
        self.edits = self._collect_edits(config_path)

    def _collect_edits(self, config_path: Path) -> dict[str, TensorEdit]:
        factors: dict[str, dict[str, str]] = {}
        edits: dict[str, TensorEdit] = {}
        for key in self.checkpoint.tensors:
            if "lora_magnitude_vector" in key:
                raise TaskVecError(f"{self.checkpoint.path}: tensor {key}: DoRA is not supported")
            name = key.removeprefix(PREFIX)
            match = _FACTOR.match(name)
            if match:
                module = match["module"] or match["emodule"]
                factors.setdefault(module, {})[match["kind"] or match["ekind"]] = key
                continue
            # A full tensor saved by the adapter replaces the base's: modules_to_save, or a
            # base layer peft saved (embedding layers with a resized vocabulary).
            target = name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
            edits.setdefault(target, TensorEdit(target)).replacement = key

        use_rslora = bool(self.config.get("use_rslora"))
        for module, pair in factors.items():
            embedding = "lora_embedding_A" in pair or "lora_embedding_B" in pair
            a_key = pair.get("lora_embedding_A" if embedding else "lora_A")
            b_key = pair.get("lora_embedding_B" if embedding else "lora_B")
            if a_key is None or b_key is None:
                raise TaskVecError(f"{self.checkpoint.path}: module {module} has only one "
                                   "LoRA factor")
            rank = self.checkpoint.tensors[a_key].shape[0]
            r = _pattern_value(self.config.get("rank_pattern") or {}, module,
                               self.config.get("r", rank))
            if r != rank:
                raise TaskVecError(f"{config_path}: module {module}: rank {r} in the config but "
                                   f"{rank} in tensor {a_key}")
            alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module,
                                   self.config.get("lora_alpha", r))
            scale = alpha / (math.sqrt(r) if use_rslora else r)
            target = f"{module}.weight"
            edits.setdefault(target, TensorEdit(target)).lora = LoraFactors(
                a_key, b_key, scale, embedding)
        return edits

    def transposed(self, lora: LoraFactors, base_shape: tuple[int, ...]) -> bool:
        """Whether ΔW = s·(B·A)ᵀ: embeddings, and GPT-2 Conv1D weights stored (in, out)."""
        if lora.embedding:
            return True
        out_dim = self.checkpoint.tensors[lora.b].shape[0]
        in_dim = self.checkpoint.tensors[lora.a].shape[1]
        if out_dim != in_dim:
            return tuple(base_shape) == (in_dim, out_dim)
        return bool(self.config.get("fan_in_fan_out"))  # square: only the config can tell

    def delta_shape(self, lora: LoraFactors, transposed: bool) -> tuple[int, int]:
        out_dim = self.checkpoint.tensors[lora.b].shape[0]
        in_dim = self.checkpoint.tensors[lora.a].shape[1]
        return (in_dim, out_dim) if transposed else (out_dim, in_dim)

    def bind(self, base_names) -> dict[str, TensorEdit]:
        """Map each edit to the base tensor it applies to (see match_names)."""
        bound: dict[str, TensorEdit] = {}
        for target, base_name in match_names(self.edits, base_names).items():
            if base_name is None:
                raise TaskVecError(f"{self.folder}: adapter edits {target} but the base has no "
                                   "single matching tensor")
            bound[base_name] = self.edits[target]
        return bound


def match_names(names, base_names) -> dict[str, str | None]:
    """Each name -> the base tensor it stands for: the same name, else the one base name that
    extends it or that it extends at a dot (a prefix one side lacks: GPT-2's `transformer.`,
    legacy checkpoints without `model.`); None when there is no such single tensor or when
    two names would claim it."""
    base_names = list(base_names)
    exact = set(base_names)
    matched: dict[str, str | None] = {}
    for name in names:
        if name in exact:
            matched[name] = name
            continue
        candidates = [n for n in base_names
                      if n.endswith("." + name) or name.endswith("." + n)]
        matched[name] = candidates[0] if len(candidates) == 1 else None
    claims = Counter(b for b in matched.values() if b is not None)
    return {n: b if b is not None and claims[b] == 1 else None for n, b in matched.items()}
