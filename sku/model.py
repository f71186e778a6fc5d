"""The model side of training: load a causal LM (bf16, optionally 4/8-bit with LoRA), reach its
final hidden states through its body, and score them with `sku_kernels.linear_ce_kl` against
the LM head, so the N×V logits are never materialised.

The KL term's reference (the original model θ_o) costs no second model: with LoRA it is the
same model with the adapter disabled; for a full fine-tune its final hidden states on the
normal rows are cached once before training ("cache"), or a frozen copy runs beside ("copy").
"""

from __future__ import annotations

import copy
import importlib.util
from contextlib import contextmanager

import torch
from sku_kernels import linear_ce_kl
from torch import nn

from sku.errors import SkuError

# Config attributes of architectures whose logits are not plain h·Wᵀ (soft-capping, scaling).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype `--dtype` names."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


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


def load_model(config, compute: torch.dtype, params: torch.dtype, device: torch.device
               ) -> nn.Module:
    """The model to train, its parameters in `params` (see master_dtype): the causal LM,
    wrapped by peft when config.lora."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": params}
    if config.quantize:
        kwargs["quantization_config"] = _quantization(config.quantize, compute)
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(config.model, **kwargs)
    except (OSError, ValueError) as e:
        raise SkuError(f"{config.model}: cannot load the model: {str(e).splitlines()[0]}"
                       ) from None
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
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                      target_modules=list(config.lora_targets), lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise SkuError(f"lora_targets {','.join(config.lora_targets)}: "
                       f"{str(e).splitlines()[0]}") from None


@contextmanager
def evaluating(model: nn.Module):
    """Eval mode (no dropout) for reference passes, restoring the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class FusedLoss(nn.Module):
    """The module accelerate wraps: every parameter it trains is used inside forward, as
    DDP and FSDP require. Returns the per-position loss of linear_ce_kl."""

    def __init__(self, model: nn.Module, teacher: str | None, compute: torch.dtype):
        """teacher: how to reach θ_o for KL terms: "cache" (hidden states cached by the caller
        before training), "copy", or None when no term needs it; LoRA models always disable
        their adapter instead. compute: the dtype the fused loss runs in, whatever the
        parameters are held in (fp32 master weights under bf16 autocast)."""
        super().__init__()
        self.model, self.compute = model, compute
        # What FSDP's transformer auto-wrap policy shards by: the causal LM's decoder layers.
        self._no_split_modules = getattr(causal_lm(model), "_no_split_modules", None)
        if teacher is not None and hasattr(model, "disable_adapter"):
            teacher = "adapter"
        self.teacher = teacher
        head = causal_lm(model).get_output_embeddings().weight
        # Frozen parameters, not buffers: DDP broadcasts buffers at every step.
        self.teacher_model = self.teacher_head = None
        if self.teacher == "copy":
            self.teacher_model = copy.deepcopy(model).eval().requires_grad_(False).to(compute)
            self.teacher_head = causal_lm(self.teacher_model).get_output_embeddings().weight
        elif self.teacher == "cache":
            self.teacher_head = nn.Parameter(head.detach().clone(), requires_grad=False)

    @torch.no_grad()
    def reference_hidden_states(self, input_ids, attention_mask) -> torch.Tensor:
        """Final hidden states of the original model θ_o."""
        if self.teacher == "copy":
            return final_hidden_states(self.teacher_model, input_ids, attention_mask)
        if self.teacher == "adapter":
            with self.model.disable_adapter(), evaluating(self.model):
                return final_hidden_states(self.model, input_ids, attention_mask)
        with evaluating(self.model):  # "cache": called before training, weights still θ_o
            return final_hidden_states(self.model, input_ids, attention_mask)

    def forward(self, input_ids, attention_mask, positions, labels, ce_weight, kl_weight,
                teacher_hidden=None):
        hidden = final_hidden_states(self.model, input_ids, attention_mask)
        width = hidden.shape[1]
        # In the compute dtype: autocast leaves a custom autograd Function's inputs alone, fp32
        # master weights and k-bit preparation (which upcasts the final norm and the head)
        # would otherwise run the LM-head GEMMs in fp32. dW flows back through the cast.
        head = causal_lm(self.model).get_output_embeddings().weight.to(self.compute)
        hidden = hidden.flatten(0, 1)[positions].to(self.compute)
        kl_rows = kl_weight != 0
        if not kl_rows.any():
            return linear_ce_kl(hidden, head, labels, ce_weight=ce_weight, reduction="none")
        if teacher_hidden is None:  # run the reference on the rows that carry KL only
            rows = torch.unique(positions[kl_rows] // width)
            reference = self.reference_hidden_states(input_ids[rows], attention_mask[rows])
            index = torch.searchsorted(rows, positions[kl_rows] // width) * width
            teacher_hidden = hidden.new_zeros(hidden.shape[0], reference.shape[-1])
            teacher_hidden[kl_rows] = reference.flatten(0, 1)[index + positions[kl_rows] % width]
        teacher_head = None if self.teacher_head is None else self.teacher_head.to(self.compute)
        return linear_ce_kl(hidden, head, labels, teacher_hidden=teacher_hidden.to(self.compute),
                            teacher_weight=teacher_head, ce_weight=ce_weight,
                            kl_weight=kl_weight, reduction="none")
