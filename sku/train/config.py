"""The resolved settings of one `sku unlearn` run: defaults, then a recipe, then flags.

Recipes for the paper's models ship in sku/train/recipes/ (Table 4 and the official LoRA settings);
`--config` takes a recipe's name (`llama2-7b`) or the path of a YAML file with the same keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from sku.errors import SkuError
from sku.train.methods import METHODS

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")  # float64: exact comparisons
_RECIPES = resources.files("sku.train") / "recipes"


@dataclass
class UnlearnConfig:
    method: str
    model: str
    forget_data: str
    normal_data: str
    out: str
    # What a recipe may set, with the defaults used without one.
    lora: bool = False
    lora_r: int = 32
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    quantize: str | None = None  # "4bit" | "8bit": QLoRA on a GPU
    max_steps: int = 1000
    batch_size: int = 2  # rows per optimizer step, over all devices and accumulation steps
    micro_batch_size: int | None = None  # rows per forward on one device; default: all of them
    lr: float = 2e-4
    weight_decay: float = 0.01  # torch AdamW's default, as in the official code
    eps: list[float] = field(default_factory=lambda: [2.5, 2.5, 1.0])
    k: int = 5
    scale: float = 1.0  # λ of stage 2
    save_steps: list[int] = field(default_factory=list)
    checkpoint_every: int = 100
    seed: int = 8888
    max_length: int = 512
    eval_size: int = 100
    # Compute dtype: bfloat16 on a GPU, float32 on CPU. Trained weights stay fp32 under
    # bf16/fp16 autocast (sku.train.model.master_dtype); a LoRA run's frozen base is held in it.
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    teacher: str = "cache"  # full fine-tune's KL reference: cached hidden states or a "copy"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


RECIPE_KEYS = [f.name for f in dataclasses.fields(UnlearnConfig)
               if f.name not in {"method", "model", "forget_data", "normal_data", "out"}]


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
        recipe = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SkuError(f"{name_or_path}: unreadable recipe: {str(e).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise SkuError(f"{name_or_path}: a recipe is a mapping of settings")
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise SkuError(f"{name_or_path}: unknown setting {unknown[0]}; "
                       f"known: {', '.join(RECIPE_KEYS)}")
    return recipe


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SkuError(message)


def resolve_config(required: dict, recipe: str | None, overrides: dict) -> UnlearnConfig:
    """Defaults < recipe < overrides (flags left as None do not override)."""
    settings = {**(load_recipe(recipe) if recipe else {}),
                **{k: v for k, v in overrides.items() if v is not None}}
    if isinstance(settings.get("lora_targets"), str):
        settings["lora_targets"] = [t for t in settings["lora_targets"].split(",") if t]
    try:
        config = UnlearnConfig(**required, **settings)
    except TypeError as e:
        raise SkuError(str(e)) from None
    _validate(config)
    return config


def _validate(c: UnlearnConfig) -> None:
    _check(c.method in METHODS, f"method {c.method!r}: expected one of {', '.join(METHODS)}")
    _check(isinstance(c.eps, (list, tuple)) and len(c.eps) == 3
           and all(isinstance(e, (int, float)) for e in c.eps), f"eps {c.eps!r}: three numbers")
    c.eps = [float(e) for e in c.eps]
    for name in ("max_steps", "batch_size", "k", "checkpoint_every", "max_length", "lora_r"):
        value = getattr(c, name)
        _check(isinstance(value, int) and value > 0, f"{name} {value!r}: a positive integer")
    _check(isinstance(c.eval_size, int) and c.eval_size >= 0,
           f"eval_size {c.eval_size!r}: a non-negative integer")
    _check(isinstance(c.lr, (int, float)) and c.lr > 0, f"lr {c.lr!r}: a positive number")
    micro = c.micro_batch_size
    _check(micro is None or (isinstance(micro, int) and micro > 0),
           f"micro_batch_size {micro!r}: a positive integer")
    _check(all(isinstance(s, int) and 0 < s <= c.max_steps for s in c.save_steps),
           f"save_steps {c.save_steps!r}: steps between 1 and max_steps ({c.max_steps})")
    _check(c.dtype in DTYPES, f"dtype {c.dtype!r}: expected one of {', '.join(DTYPES)}")
    _check(c.teacher in ("cache", "copy"), f"teacher {c.teacher!r}: expected cache or copy")
    _check(c.quantize in (None, "4bit", "8bit"), f"quantize {c.quantize!r}: 4bit or 8bit")
    _check(c.quantize is None or c.lora,
           "--load-in-4bit/--load-in-8bit train a LoRA adapter on the quantized base: add --lora")
    _check(not c.lora or bool(c.lora_targets), "lora_targets: name at least one module")
