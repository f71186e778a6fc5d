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

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from taskvec import jsonfile
from taskvec.errors import TaskVecError
from taskvec.reader import FLOAT_DTYPES, Checkpoint

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
# What peft assumes for a field the config leaves out (peft.LoraConfig's defaults; a test keeps
# them equal to the installed peft's).
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8, "use_rslora": False, "fan_in_fan_out": False,
                 "rank_pattern": {}, "alpha_pattern": {}}
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
class LoraSettings:
    """The fields of adapter_config.json that decide the merge, checked, peft's defaults filled."""

    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]


def parse_config(config, path: Path) -> LoraSettings:
    """adapter_config.json's parsed JSON -> LoraSettings, or one TaskVecError naming the field."""
    config = jsonfile.mapping(config, f"{path}: the adapter config")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise TaskVecError(f"{path}: peft_type {peft_type!r} is not supported "
                           "(only LoRA adds a linear delta s·B·A)")
    for key, why in UNSUPPORTED.items():
        if config.get(key):
            raise TaskVecError(f"{path}: {key} is set: {why}; not supported")

    def field(key):
        value = config.get(key, PEFT_DEFAULTS[key])
        # peft reads a null switch or pattern as off / empty; a null r or lora_alpha breaks it
        return PEFT_DEFAULTS[key] if value is None and key not in ("r", "lora_alpha") else value

    patterns = {}
    for key, check in (("rank_pattern", lambda v, w: jsonfile.integer(v, w, minimum=1)),
                       ("alpha_pattern", jsonfile.number)):
        patterns[key] = {}
        for pattern, value in jsonfile.mapping(field(key), f"{path}: {key}").items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise TaskVecError(f"{path}: {key} key {pattern!r} is not a regular "
                                   f"expression: {e}") from None
            patterns[key][pattern] = check(value, f"{path}: {key}[{pattern!r}]")
    return LoraSettings(
        r=jsonfile.integer(field("r"), f"{path}: r", minimum=1),
        lora_alpha=jsonfile.number(field("lora_alpha"), f"{path}: lora_alpha"),
        use_rslora=jsonfile.boolean(field("use_rslora"), f"{path}: use_rslora"),
        fan_in_fan_out=jsonfile.boolean(field("fan_in_fan_out"), f"{path}: fan_in_fan_out"),
        **patterns)


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
        self.settings = parse_config(jsonfile.load(config_path), config_path)
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

        settings = self.settings
        for module, pair in factors.items():
            embedding = "lora_embedding_A" in pair or "lora_embedding_B" in pair
            a_key = pair.get("lora_embedding_A" if embedding else "lora_A")
            b_key = pair.get("lora_embedding_B" if embedding else "lora_B")
            if a_key is None or b_key is None:
                raise TaskVecError(f"{self.checkpoint.path}: module {module} has only one "
                                   "LoRA factor")
            rank = self._check_factors(module, a_key, b_key)
            r = _pattern_value(settings.rank_pattern, module, settings.r)
            if r != rank:
                raise TaskVecError(f"{config_path}: module {module}: rank {r} in the config but "
                                   f"{rank} in tensor {a_key}")
            alpha = _pattern_value(settings.alpha_pattern, module, settings.lora_alpha)
            scale = alpha / (math.sqrt(r) if settings.use_rslora else r)
            target = f"{module}.weight"
            edits.setdefault(target, TensorEdit(target)).lora = LoraFactors(
                a_key, b_key, scale, embedding)
        return edits

    def _check_factors(self, module: str, a_key: str, b_key: str) -> int:
        """A is (r, in) and B is (out, r), float, with one r > 0; returns r."""
        a, b = self.checkpoint.tensors[a_key], self.checkpoint.tensors[b_key]
        if (len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]
                or a.shape[0] == 0 or a.dtype not in FLOAT_DTYPES or b.dtype not in FLOAT_DTYPES):
            raise TaskVecError(f"{self.checkpoint.path}: module {module}: LoRA factors "
                               f"{list(a.shape)} {a.dtype} and {list(b.shape)} {b.dtype} are not "
                               "float matrices (r, in) and (out, r) with one rank r > 0")
        return a.shape[0]

    def transposed(self, lora: LoraFactors, base_shape: tuple[int, ...]) -> bool:
        """Whether ΔW = s·(B·A)ᵀ: embeddings, and GPT-2 Conv1D weights stored (in, out)."""
        if lora.embedding:
            return True
        out_dim = self.checkpoint.tensors[lora.b].shape[0]
        in_dim = self.checkpoint.tensors[lora.a].shape[1]
        if out_dim != in_dim:
            return tuple(base_shape) == (in_dim, out_dim)
        return self.settings.fan_in_fan_out  # square: only the config can tell

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
