"""The model to train: load a causal LM (bf16, optionally 4/8-bit with LoRA) whose LM head is a
plain Linear, and reach its final hidden states through its body (what the head multiplies)."""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from sku.errors import SkuError, first_line, loading

# Config attributes of architectures whose logits are not plain h·Wᵀ (soft-capping, scaling).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def master_dtype(compute: torch.dtype, *, frozen_base: bool) -> torch.dtype:
    """The dtype the model's parameters are held in. Trained weights stay fp32 when compute is
    bf16/fp16 (bf16 autocast over fp32 master weights): AdamW stepping bf16 parameters rounds
    away every update below half a bf16 step (all norm weights, and most late updates under
    linear decay). A LoRA run's frozen base stays in the compute dtype; peft keeps the adapters
    themselves in fp32."""
    if frozen_base or compute.itemsize > 2:
        return compute
    return torch.float32


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def final_hidden_states(model: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """The body's last hidden state, after its final norm (and OPT's project_out): exactly
    what the LM head multiplies."""
    lm = causal_lm(model)
    body = getattr(lm, lm.base_model_prefix)
    return body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _check_plain_head(lm: nn.Module, name: str) -> None:
    head = lm.get_output_embeddings()
    if head is None or not isinstance(head, nn.Linear) or head.bias is not None:
        raise SkuError(f"{name}: the fused loss needs an LM head that is a Linear without bias")
    for attribute in _LOGIT_TRANSFORMS:
        if getattr(lm.config, attribute, None) not in (None, 1, 1.0):
            raise SkuError(f"{name}: its logits are transformed ({attribute}); "
                           "the fused loss computes plain h·Wᵀ")


def _check_lora_rank(model: nn.Module, r: int, targets: list[str]) -> None:
    """B·A has rank at most min(in, out): a larger r only adds memory, and a huge one (a typo,
    --lora-r 1e9) fails allocating it with a traceback."""
    ranks = [min(m.in_features, m.out_features) if hasattr(m, "in_features")
             else min(m.num_embeddings, m.embedding_dim)
             for name, m in model.named_modules() if name.split(".")[-1] in targets
             and (hasattr(m, "in_features") or hasattr(m, "num_embeddings"))]
    if ranks and r > max(ranks):
        raise SkuError(f"lora_r {r}: above the rank of every module it would wrap (at most "
                       f"{max(ranks)}), where a larger adapter adds nothing but memory")


def _quantization(kind: str, compute_dtype: torch.dtype):
    if not torch.cuda.is_available():
        raise SkuError(f"--load-in-{kind} needs a CUDA GPU (bitsandbytes); "
                       "on CPU train in float32 without it")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SkuError(f"--load-in-{kind} needs bitsandbytes (pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def model_source(name: str) -> str:
    """What transformers should load for a --model: a GGUF file's converted folder (taskvec
    caches it; transformers cannot train packed GGUF weights), else the name as given."""
    if name.lower().endswith(".gguf"):
        import taskvec

        return str(taskvec.resolve(name, "model"))
    return name


def load_model(config, compute: torch.dtype, params: torch.dtype, device: torch.device
               ) -> nn.Module:
    """The model to train, its parameters in `params` (see master_dtype): the causal LM,
    wrapped by peft when config.lora."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": params}
    if config.quantize:
        kwargs["quantization_config"] = _quantization(config.quantize, compute)
        kwargs["device_map"] = {"": device}
    with loading(config.model, "the model"):  # a damaged checkpoint
        model = AutoModelForCausalLM.from_pretrained(model_source(config.model), **kwargs)
    _check_plain_head(model, config.model)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if not config.lora:
        return model
    from peft import LoraConfig, get_peft_model

    head_name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    if head_name.split(".")[-1] in config.lora_targets:
        raise SkuError(f"lora_targets: {head_name} is the LM head, which the fused loss reads "
                       "directly; target the body's modules")
    _check_lora_rank(model, config.lora_r, config.lora_targets)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                      target_modules=list(config.lora_targets), lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise SkuError(f"lora_targets {','.join(config.lora_targets)}: {first_line(e)}"
                       ) from None
