"""The loss of a training step against a plain PyTorch reference (full logits,
F.cross_entropy and F.kl_div with the method's weights), for full fine-tunes and LoRA."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sku.data.encoding import encode
from sku.data.readers import load_forget, load_normal
from sku.train.batch import StepBuilder
from sku.train.config import resolve_config
from sku.train.loss import TrainingModule
from sku.train.methods import METHODS
from sku.train.model import final_hidden_states, load_model
from sku.train.teacher import TeacherMode, cache_teacher
from tests.support.sku import (
    PKU_V1,
    TRUTHFULQA,
    build_tokenizer,
    tiny_config,
    tiny_model,
)

EPS = (2.5, 1.0, 0.5)
BATCH, K = 2, 2


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_final_hidden_states_times_the_head_are_the_logits(arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, 50)).eval()
    ids = torch.randint(4, 50, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    hidden = final_hidden_states(model, ids, mask)
    logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(hidden @ model.get_output_embeddings().weight.T, logits)


def _builder(method: str, tokenizer) -> StepBuilder:
    forget, normal = load_forget(str(PKU_V1)), load_normal(str(TRUTHFULQA))
    pools = {"forget": forget.harmful, "normal": normal.pairs, "safe": forget.safe}
    return StepBuilder(METHODS[method], EPS, pools, tokenizer, batch_size=BATCH, k=K,
                       max_length=64, seed=3)


def _reference_loss(student, teacher, builder: StepBuilder, tokenizer) -> torch.Tensor:
    """Σ over rows of (ε-weight / rows of its kind) · mean over answer tokens of CE or KL,
    from full logits, written without sku's collate or kernels."""
    rows_of_kind = {"forget": BATCH, "mismatch": BATCH * K, "normal": BATCH, "safe": BATCH}
    total = torch.zeros((), dtype=torch.float64)
    for example in builder.examples(0):
        for row in example:
            term, weight = builder.terms[row.term]
            [e] = encode(tokenizer, [row.pair], 64)
            ids = torch.tensor([e.input_ids])
            logits = student(input_ids=ids).logits[0, e.answer_start - 1:-1]
            if term.loss == "ce":
                loss = F.cross_entropy(logits, ids[0, e.answer_start:], reduction="sum")
            else:
                with torch.no_grad():
                    reference = teacher(ids)[0, e.answer_start - 1:-1]
                loss = F.kl_div(logits.log_softmax(-1), reference.log_softmax(-1),
                                log_target=True, reduction="sum")
            total = total + weight / rows_of_kind[term.rows] * loss / e.answer_tokens
    return total


def _perturb(parameters, seed: int = 1, std: float = 0.02) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)


def _step(module, builder, cache=None):
    [micro] = builder.micro_batches(0, rank=0, world_size=1, micro_batch_size=BATCH)
    module.zero_grad()
    loss = module(**micro.inputs("cpu", cache)).sum()
    loss.backward()
    return loss


def _check(loss, reference_loss, parameters) -> None:
    fused_grads = [p.grad.clone() for p in parameters]
    for p in parameters:
        p.grad = None
    reference_loss.backward()
    torch.testing.assert_close(loss, reference_loss, rtol=1e-10, atol=1e-12)
    for fused_grad, p in zip(fused_grads, parameters, strict=True):
        torch.testing.assert_close(fused_grad, p.grad, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("method, teacher", [("sku", "cache"), ("sku", "copy"),
                                             ("ga_mismatch", "cache"), ("ft", "cache")])
def test_full_fine_tune_step_equals_the_reference(tmp_path_factory, method, teacher):
    from transformers import AutoModelForCausalLM

    folder = tiny_model("llama", tmp_path_factory.getbasetemp())
    tokenizer = build_tokenizer(tmp_path_factory.mktemp("tok"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)
    original = copy.deepcopy(model).eval()
    builder = _builder(method, tokenizer)
    module = TrainingModule(model, teacher, torch.float64)
    cache = None
    if teacher == "cache" and method != "ft":
        cache = cache_teacher(module, builder.pools["normal"], tokenizer, 64, "cpu")
    _perturb(model.parameters())  # the student moves away from θ_o: KL and its gradient ≠ 0
    loss = _step(module, builder, cache)
    parameters = [p for p in model.parameters() if p.requires_grad]

    def teacher_logits(ids):
        return original(input_ids=ids).logits

    _check(loss, _reference_loss(model, teacher_logits, builder, tokenizer), parameters)


def test_lora_step_uses_the_model_without_its_adapter_as_reference(tmp_path_factory):
    folder = tiny_model("llama", tmp_path_factory.getbasetemp())
    tokenizer = build_tokenizer(tmp_path_factory.mktemp("tok"))
    config = resolve_config(
        {"method": "sku", "model": str(folder), "forget_data": "unused", "normal_data": "unused",
         "out": "unused"},  # a model loaded, no data read, nothing written
        None, {"lora": True, "lora_r": 4, "lora_alpha": 8, "dtype": "float64"})
    model = load_model(config, torch.float64, torch.float64, torch.device("cpu"))
    parameters = [p for p in model.parameters() if p.requires_grad]
    assert parameters and all("lora_" in n for n, p in model.named_parameters()
                              if p.requires_grad)
    _perturb(parameters)  # LoRA B starts at zero; make the adapter act
    module = TrainingModule(model, "cache", torch.float64)
    assert module.teacher.mode is TeacherMode.ADAPTER
    builder = _builder("sku", tokenizer)
    loss = _step(module, builder)

    def teacher_logits(ids):
        with model.disable_adapter():
            return model(input_ids=ids).logits

    _check(loss, _reference_loss(model, teacher_logits, builder, tokenizer), parameters)


def test_cache_teacher_refuses_once_training_started(tmp_path_factory):
    """The "cache" teacher reads θ_o from the student itself, which is θ_o only until the first
    training step: asked later, it would silently return the trained model's states."""
    from transformers import AutoModelForCausalLM

    folder = tiny_model("llama", tmp_path_factory.getbasetemp())
    tokenizer = build_tokenizer(tmp_path_factory.mktemp("tok"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)
    builder = _builder("sku", tokenizer)
    module = TrainingModule(model, "cache", torch.float64)
    cache = cache_teacher(module, builder.pools["normal"], tokenizer, 64, "cpu")  # before: fine
    _step(module, builder, cache)
    with pytest.raises(RuntimeError, match="only before training starts"):
        cache_teacher(module, builder.pools["normal"], tokenizer, 64, "cpu")
    with pytest.raises(RuntimeError, match="only before training starts"):
        _step(module, builder)  # a batch without the cached states
