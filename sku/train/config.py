"""The resolved settings of one `sku unlearn` run: defaults, then a recipe, then flags.

Recipes for the paper's models ship in sku/train/recipes/ (Table 4 and the official LoRA settings);
`--config` takes a recipe's name (`llama2-7b`) or the path of a YAML file with the same keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from sku.data.template import TEMPLATES
from sku.dtypes import DTYPES
from sku.errors import SkuError, first_line, read_text
from sku.settings import (
    BOOL,
    INT,
    NON_NEGATIVE_INT,
    NON_NEGATIVE_NUMBER,
    NUMBER,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    TEXT,
    Check,
    one_of,
    optional,
    setting,
    validate,
)
from sku.train.methods import METHODS
from sku.train.teacher import TEACHER_CHOICES

_RECIPES = resources.files("sku.train") / "recipes"
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _steps(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated step numbers") from None


def _names(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


STEPS = Check(lambda v: isinstance(v, list) and all(POSITIVE_INT.ok(s) for s in v),
              "a list of step numbers")
EPS = Check(lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(map(NUMBER.ok, v)),
            "three numbers")
NAMES = Check(lambda v: isinstance(v, list) and all(isinstance(t, str) and t for t in v),
              "a list of module names")


@dataclass
class UnlearnConfig:
    """Every setting of a run. The five without a default are required flags; the others are
    what a recipe may set (RECIPE_KEYS), and their defaults are used without one."""

    method: str = setting(help="the unlearning method", choices=list(METHODS),
                          check=one_of(*METHODS))
    model: str = setting(help="original model: local folder, hub id or .gguf file", check=TEXT)
    forget_data: str = setting(
        help="PKU-SafeRLHF: hub id[@revision] or .jsonl/.json/.csv/.parquet file", check=TEXT)
    normal_data: str = setting(help="TruthfulQA (generation): hub id[@revision] or a local file",
                               check=TEXT)
    out: str = setting(help="run folder", check=TEXT)
    lora: bool = setting(False, "train a LoRA adapter instead of every weight", check=BOOL)
    lora_r: int = setting(32, "LoRA rank", check=POSITIVE_INT)
    lora_alpha: float = setting(16.0, "LoRA alpha (scale alpha/r)", check=POSITIVE_NUMBER)
    lora_targets: list[str] = setting(
        help="comma-separated module names the adapter wraps", type=_names, check=NAMES,
        factory=lambda: ["q_proj", "v_proj"])
    quantize: str | None = setting(
        None, "train LoRA on a base quantized to {value} (QLoRA: a CUDA GPU, bitsandbytes)",
        shown="neither",
        check=optional(one_of("4bit", "8bit")),
        consts={"--load-in-4bit": "4bit", "--load-in-8bit": "8bit"})
    max_steps: int = setting(1000, "optimizer steps of stage 1", check=POSITIVE_INT)
    batch_size: int = setting(2, "rows per optimizer step, over all devices and accumulation "
                                 "steps", check=POSITIVE_INT)
    micro_batch_size: int | None = setting(
        None, "rows per forward on one device", type=int, check=optional(POSITIVE_INT),
        shown="all of a device's rows")
    lr: float = setting(2e-4, "peak learning rate (linear decay to 0)", check=POSITIVE_NUMBER)
    weight_decay: float = setting(0.01, "AdamW weight decay (torch's default, as the official "
                                        "code)", check=NON_NEGATIVE_NUMBER)
    eps: list[float] = setting(
        help="weights of the three terms (SKU: GD, RD, PD); 0 drops a term", type=float,
        nargs=3, metavar=("E1", "E2", "E3"), check=EPS, factory=lambda: [2.5, 2.5, 1.0])
    k: int = setting(5, "mismatch responses per prompt", check=POSITIVE_INT)
    scale: float = setting(1.0, "λ of stage 2: θ_o − λ·(θ_bad − θ_o)", check=POSITIVE_NUMBER)
    save_steps: list[int] = setting(help="steps to snapshot, e.g. 200,400,600 (metric curves)",
                                    type=_steps, check=STEPS, factory=list)
    checkpoint_every: int = setting(100, "steps between resumable checkpoints",
                                    check=POSITIVE_INT)
    seed: int = setting(8888, "seed of the splits, the row schedule and the initialisation",
                        check=INT)
    max_length: int = setting(512, "tokens per row, prompt and answer", check=POSITIVE_INT)
    template: str = setting("paper", "prompt format: the official code's '### Question: … "
                                     "### Answer:', or the tokenizer's chat template (instruct "
                                     "models); evaluation uses the run's", choices=list(TEMPLATES),
                            check=one_of(*TEMPLATES))
    eval_size: int = setting(100, "prompts per evaluation split", check=NON_NEGATIVE_INT)
    # Trained weights stay fp32 under bf16/fp16 autocast (sku.train.model.master_dtype); a
    # LoRA run's frozen base is held in the compute dtype.
    dtype: str = setting("auto", "compute dtype (auto: bfloat16 on a GPU, float32 on CPU); full "
                                 "fine-tunes keep fp32 master weights under bf16/fp16 autocast",
                         choices=DTYPES, check=one_of(*DTYPES))
    gradient_checkpointing: bool = setting(False, "recompute activations in backward (less "
                                                  "memory, more time)", check=BOOL)
    teacher: str = setting("cache", "full fine-tune's KL reference: cached hidden states of θ_o "
                                    "or a frozen copy", choices=list(TEACHER_CHOICES),
                           check=one_of(*TEACHER_CHOICES))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


REQUIRED = ("method", "model", "forget_data", "normal_data", "out")
RECIPE_KEYS = [f.name for f in dataclasses.fields(UnlearnConfig) if f.name not in REQUIRED]


def recipe_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in _RECIPES.iterdir()
                  if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str) -> dict:
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        if name_or_path not in recipe_names():
            raise SkuError(f"{name_or_path}: no such recipe file or shipped recipe "
                           f"({', '.join(recipe_names())})")
        path = _RECIPES / f"{name_or_path}.yaml"
    try:
        recipe = yaml.safe_load(read_text(path)) or {}
    except yaml.YAMLError as e:
        raise SkuError(f"{name_or_path}: unreadable recipe: {first_line(e)}") from None
    if not isinstance(recipe, dict):
        raise SkuError(f"{name_or_path}: a recipe is a mapping of settings")
    for key, value in recipe.items():  # YAML 1.1 reads `lr: 1e-4` (no dot) as a string
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            recipe[key] = float(value)
    unknown = sorted(map(str, set(recipe) - set(RECIPE_KEYS)))  # YAML keys may be numbers
    if unknown:
        raise SkuError(f"{name_or_path}: unknown setting {unknown[0]}; "
                       f"known: {', '.join(RECIPE_KEYS)}")
    return recipe


def resolve_config(required: dict, recipe: str | None, overrides: dict) -> UnlearnConfig:
    """Defaults < recipe < overrides (flags left as None do not override)."""
    settings = {**(load_recipe(recipe) if recipe else {}),
                **{k: v for k, v in overrides.items() if v is not None}}
    if isinstance(settings.get("lora_targets"), str):  # as --lora-targets writes them
        settings["lora_targets"] = _names(settings["lora_targets"])
    try:
        config = UnlearnConfig(**required, **settings)
    except TypeError as e:
        raise SkuError(str(e)) from None
    _validate(config)
    return config


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SkuError(message)


def _validate(c: UnlearnConfig) -> None:
    """Each setting (its field's Check), then the rules between settings."""
    validate(c)
    c.eps = [float(e) for e in c.eps]
    _check(all(s <= c.max_steps for s in c.save_steps),
           f"save_steps {c.save_steps!r}: steps between 1 and max_steps ({c.max_steps})")
    _check(c.quantize is None or c.lora,
           "--load-in-4bit/--load-in-8bit train a LoRA adapter on the quantized base: add --lora")
    _check(not c.lora or bool(c.lora_targets), "lora_targets: name at least one module")
