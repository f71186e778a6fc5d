"""`sku unlearn --model FILE.gguf`: the GGUF file is converted once by taskvec and trained like
any checkpoint; stage 2 negates against that very conversion."""

from __future__ import annotations

import pytest
import torch

import taskvec
from tests.support.checkpoints import read_tensors
from tests.support.gguf import tiny_llama, write_llama_gguf
from tests.support.sku import build_tokenizer, run_sku, unlearn_args

pytest.importorskip("gguf")


def test_sku_lora_run_on_a_gguf_model(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    tokenizer = build_tokenizer(tmp_path / "tokenizer", kind="bpe")  # trained on the fixtures
    gguf_file = write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama(tokenizer),
                                 tmp_path / "tokenizer")
    out = tmp_path / "run"
    proc = run_sku(*unlearn_args("sku", gguf_file, out, "--lora", "--lora-targets",
                                 "q_proj,v_proj"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    converted = taskvec.resolve(gguf_file)
    assert converted.parent == tmp_path / "cache" / "gguf"
    taskvec.negate_adapter(out / "theta_bad", tmp_path / "negated")
    taskvec.apply(converted, [tmp_path / "negated"], tmp_path / "expected")
    got, want = read_tensors(out / "model"), read_tensors(tmp_path / "expected")
    assert got.keys() == want.keys()
    assert any(not torch.equal(got[k], read_tensors(converted)[k]) for k in got)
    for name in want:
        assert torch.equal(got[name], want[name]), name
