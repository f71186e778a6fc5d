"""A tiny random-init Llama trained a few steps with linear_ce_kl follows the loss curve of the
same training computed from plain logits (model(...).logits, F.cross_entropy, F.kl_div)."""

import copy

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from sku_kernels import linear_ce_kl

VOCAB, STEPS = 257, 6


def setup():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    ids = torch.randint(0, VOCAB, (4, 16))
    labels = ids[:, 1:].clone()
    labels[:, :5] = -100  # prompt positions carry no CE
    # SKU-like rows: CE on forget rows (0, 1), preservation divergence b < 0 on normal rows (2, 3).
    ce_weight = torch.tensor([1.0, 2.5, 0.0, 0.0])[:, None].expand(4, 15)
    kl_weight = torch.tensor([0.0, 0.0, -0.5, 1.0])[:, None].expand(4, 15)
    return model, teacher, ids, labels, ce_weight, kl_weight


def fused_loss(model, teacher, ids, labels, a, b, backend):
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    with torch.no_grad():
        teacher_hidden = teacher.model(input_ids=ids).last_hidden_state[:, :-1]
    return linear_ce_kl(hidden, model.lm_head.weight, labels, teacher_hidden=teacher_hidden,
                        teacher_weight=teacher.lm_head.weight, ce_weight=a, kl_weight=b,
                        reduction="mean", backend=backend)


def plain_loss(model, teacher, ids, labels, a, b, backend):
    logq = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    with torch.no_grad():
        logp = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), -1)
    ce = F.nll_loss(logq.reshape(-1, VOCAB), labels.reshape(-1), reduction="none").view(4, 15)
    kl = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
    carries_loss = ((a != 0) & (labels != -100)) | (b != 0)
    return (a * ce + b * kl).sum() / carries_loss.sum()


def loss_curve(loss_fn, backend="torch"):
    model, teacher, *batch = setup()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    curve = []
    for _ in range(STEPS):
        loss = loss_fn(model, teacher, *batch, backend)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return torch.tensor(curve)


def test_tiny_llama_follows_the_plain_logits_loss_curve(backend):
    plain = loss_curve(plain_loss)
    fused = loss_curve(fused_loss, backend)
    assert (plain[0] - plain[-1]).abs() > 0.05  # the steps moved the model
    torch.testing.assert_close(fused, plain, rtol=2e-4, atol=1e-5)
