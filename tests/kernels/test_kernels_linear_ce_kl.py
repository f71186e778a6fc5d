"""sku_kernels.linear_ce_kl against a float64 full-logits oracle, for the torch backend and for
the Triton backend (on CPU under the Triton interpreter: fp32, small shapes)."""

import pytest
import torch
import torch.nn.functional as F

from sku_kernels import (
    fused_linear_cross_entropy,
    fused_linear_kl_div,
    linear_ce_kl,
    torch_backend,
)
from sku_kernels.reference import linear_ce_kl_reference

N, H, V, H_TEACHER = 37, 48, 301, 40


def make_case(n=N, h=H, v=V, ht=H_TEACHER, dtype=torch.float32, seed=0):
    """Odd shapes, ~20% ignored labels, signed per-row weights, KL on ~2/3 of the rows."""
    g = torch.Generator().manual_seed(seed)
    case = dict(
        hidden=torch.randn(n, h, generator=g),
        weight=torch.randn(v, h, generator=g) / h**0.5 * 4,
        labels=torch.randint(0, v, (n,), generator=g),
        teacher_hidden=torch.randn(n, ht, generator=g),
        teacher_weight=torch.randn(v, ht, generator=g) / ht**0.5 * 4,
        ce_weight=torch.randn(n, generator=g),
        kl_weight=torch.randn(n, generator=g),
    )
    case["labels"][torch.rand(n, generator=g) < 0.2] = -100
    case["kl_weight"][torch.rand(n, generator=g) < 0.35] = 0.0
    return {k: x.to(dtype) if x.is_floating_point() else x for k, x in case.items()}


def as_float64(case):
    return {k: x.double() if torch.is_tensor(x) and x.is_floating_point() else x
            for k, x in case.items()}


def run_both(case, reduction, backend, grad_weight=True, seed=1):
    """(loss, dH, dW) from linear_ce_kl and from the float64 oracle, same upstream gradient."""
    out = []
    for fn in (linear_ce_kl, linear_ce_kl_reference):
        c = as_float64(case) if fn is linear_ce_kl_reference else dict(case)
        hidden = c.pop("hidden").clone().requires_grad_()
        weight = c.pop("weight").clone().requires_grad_(grad_weight)
        labels = c.pop("labels")
        kw = dict(backend=backend) if fn is linear_ce_kl else {}
        loss = fn(hidden, weight, labels, reduction=reduction, **c, **kw)
        g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed))
        inputs = (hidden, weight) if grad_weight else (hidden,)
        grads = torch.autograd.grad(loss, inputs, g.to(loss.dtype))
        out.append((loss.detach(), *grads))
    return out


def assert_close(got, want, rtol=2e-4):
    for x, r in zip(got, want, strict=True):
        assert torch.isfinite(x).all()
        atol = rtol * max(r.abs().max().item(), 1e-3)
        torch.testing.assert_close(x.double(), r, rtol=rtol, atol=atol)


@pytest.fixture(params=[False, True], ids=["one_chunk", "chunks_of_8"])
def chunked(request, monkeypatch):
    if request.param:  # 8 rows per chunk: exercises the loop, partial last chunk, sparse KL
        monkeypatch.setattr(torch_backend, "chunk_rows", lambda *shape: 8)
    return request.param


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("grad_weight", [True, False], ids=["dW", "frozen_head"])
def test_matches_float64_oracle(reduction, grad_weight, chunked, backend):
    got, want = run_both(make_case(), reduction, backend, grad_weight=grad_weight)
    assert_close(got, want)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_ce_only_and_kl_only(reduction, backend):
    case = make_case()
    ce = {k: v for k, v in case.items() if not k.startswith(("teacher", "kl"))}
    assert_close(*run_both(ce, reduction, backend))
    kl = dict(case, ce_weight=0.0)
    assert_close(*run_both(kl, reduction, backend))


def test_scalar_weights_equal_per_row_weights(backend):
    case = make_case()
    scalar = dict(case, ce_weight=-0.7, kl_weight=2.5)
    rows = dict(case, ce_weight=torch.full((N,), -0.7), kl_weight=torch.full((N,), 2.5))
    got_scalar, want = run_both(scalar, "sum", backend)
    assert_close(got_scalar, want)
    for x, y in zip(got_scalar, run_both(rows, "sum", backend)[0], strict=True):
        torch.testing.assert_close(x, y)


def test_teacher_weight_defaults_to_student_head(backend):
    case = make_case(ht=H)
    case["teacher_weight"] = None
    assert_close(*run_both(case, "sum", backend))


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_3d_input(reduction, backend):
    b, t = 2, 19
    case = {k: (x.reshape(b, t, *x.shape[1:]) if k not in ("weight", "teacher_weight") else x)
            for k, x in make_case(n=b * t).items()}
    got, want = run_both(case, reduction, backend)
    assert got[0].shape == ((b, t) if reduction == "none" else ())
    assert got[1].shape == (b, t, H)
    assert_close(got, want)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("teacher", [False, True])
def test_all_rows_ignored_gives_zero_not_nan(reduction, teacher, backend):
    case = make_case()
    case["labels"][:] = -100
    if teacher:
        case["kl_weight"] = 0.0
    else:
        case = {k: v for k, v in case.items() if not k.startswith(("teacher", "kl"))}
    hidden = case.pop("hidden").requires_grad_()
    weight = case.pop("weight").requires_grad_()
    loss = linear_ce_kl(hidden, weight, reduction=reduction, backend=backend, **case)
    loss.sum().backward()
    for x in (loss, hidden.grad, weight.grad):
        assert torch.equal(x, torch.zeros_like(x))


def test_rows_without_kl_never_read_the_teacher(backend):
    case = make_case()
    poisoned = dict(case, teacher_hidden=case["teacher_hidden"].clone())
    poisoned["teacher_hidden"][case["kl_weight"] == 0] = float("nan")
    assert_close(run_both(poisoned, "sum", backend)[0], run_both(case, "sum", backend)[1])


def test_rows_without_loss_are_never_computed(backend):
    # Ignored rows with b = 0 are skipped, so even NaN hidden states there cannot leak in.
    case = make_case()
    skipped = (case["labels"] == -100) & (case["kl_weight"] == 0)
    assert skipped.any()
    poisoned = dict(case, hidden=case["hidden"].clone())
    poisoned["hidden"][skipped] = float("nan")
    assert_close(run_both(poisoned, "sum", backend)[0], run_both(case, "sum", backend)[1])


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 7])
def test_fused_linear_cross_entropy_equals_f_cross_entropy(reduction, ignore_index, backend):
    case = make_case()
    labels = case["labels"].clone()
    labels[labels == -100] = ignore_index
    got, want = [], []
    for fused in (True, False):
        hidden = case["hidden"].clone().requires_grad_()
        weight = case["weight"].clone().requires_grad_()
        if fused:
            loss = fused_linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index,
                                              reduction=reduction, backend=backend)
        else:
            loss = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=ignore_index,
                                   reduction=reduction)
        loss.sum().backward()
        (got if fused else want).append((loss.detach(), hidden.grad, weight.grad))
    for x, y in zip(got[0], want[0], strict=True):
        torch.testing.assert_close(x, y, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_fused_linear_kl_div_equals_f_kl_div(reduction, backend):
    case = make_case()
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    args = (case["teacher_hidden"], case["teacher_weight"])
    loss = fused_linear_kl_div(hidden, weight, *args, reduction=reduction, backend=backend)
    logq = torch.log_softmax(hidden @ weight.t(), -1)
    logp = torch.log_softmax(args[0] @ args[1].t(), -1)
    per_elem = F.kl_div(logq, logp, log_target=True, reduction="none")
    ref = {"sum": per_elem.sum(), "mean": per_elem.sum() / N, "none": per_elem.sum(-1)}[reduction]
    torch.testing.assert_close(loss, ref, rtol=2e-4, atol=1e-5)
    dh, dw = torch.autograd.grad(loss.sum(), (hidden, weight))
    rh, rw = torch.autograd.grad(ref.sum(), (hidden, weight))
    torch.testing.assert_close(dh, rh, rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(dw, rw, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_torch_backend(dtype):
    # The oracle sees the same rounded inputs in float64; what remains is bf16/fp16 rounding of
    # logits and of the dH/dW matmuls, while softmax statistics and dW accumulation are fp32.
    got, want = run_both(make_case(dtype=dtype), "sum", "torch")
    assert got[0].dtype == torch.float32
    assert got[1].dtype == got[2].dtype == dtype
    assert_close(got, want, rtol=3e-2)


def test_no_grad_and_no_grad_inputs(backend):
    case = make_case()
    want = linear_ce_kl_reference(**as_float64(case))
    with torch.no_grad():
        loss = linear_ce_kl(backend=backend, **case)
    torch.testing.assert_close(loss.double(), want, rtol=2e-4, atol=1e-5)
    assert linear_ce_kl(backend=backend, **case).grad_fn is None


def test_autocast_does_not_change_the_precision(backend):
    case = make_case()
    want = run_both(case, "sum", backend)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run_both(case, "sum", backend)[0]
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y)


def test_teacher_gets_no_gradient(backend):
    case = make_case()
    case["teacher_hidden"].requires_grad_()
    case["teacher_weight"].requires_grad_()
    case["hidden"].requires_grad_()
    linear_ce_kl(backend=backend, **case).backward()
    assert case["hidden"].grad is not None
    assert case["teacher_hidden"].grad is None and case["teacher_weight"].grad is None


def test_second_backward_through_the_graph_is_refused():
    case = make_case()
    hidden = case.pop("hidden").requires_grad_()
    loss = linear_ce_kl(hidden, backend="torch", **case)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_chunks_bound_logits_memory():
    # Chunk logits never exceed max(N·H, 4M) elements: e.g. the CPU bench shape.
    for n, h, v in [(8192, 256, 32000), (16384, 4096, 128256), (5, 8, 11)]:
        rows = torch_backend.chunk_rows(n, h, v)
        assert 1 <= rows <= n and rows * v <= max(n * h, torch_backend._MIN_CHUNK_ELEMS, v)
        assert torch_backend.chunk_rows(n, h, v, cuda=True) == min(n, max(rows, 1024))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(labels=torch.full((N,), V)), "labels must lie"),
        (dict(labels=torch.zeros(N + 1, dtype=torch.long)), "labels shape"),
        (dict(labels=torch.zeros(N)), "integer"),
        (dict(teacher_hidden=None, teacher_weight=None), "no teacher_hidden"),
        (dict(teacher_weight=torch.zeros(V + 1, H_TEACHER)), "teacher_weight must be"),
        (dict(weight=torch.zeros(V, H, dtype=torch.float64)), "dtype"),
        (dict(ce_weight=torch.ones(N - 1)), "ce_weight"),
        (dict(reduction="batchmean"), "reduction"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_arguments_raise_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        linear_ce_kl(**{**make_case(), "backend": "torch", **kwargs})
