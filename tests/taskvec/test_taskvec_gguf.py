"""A .gguf file wherever taskvec takes a model: converted once into a cached bf16 safetensors
folder named by the file's hash, exactly the tensors of the model it was written from."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import taskvec
from tests.support.checkpoints import read_tensors
from tests.support.cli import assert_cli_error, cli_env, run_cli
from tests.support.gguf import SENTENCES, bpe_tokenizer, tiny_llama, write_llama_gguf

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(GGUF file, the model and tokenizer it was written from)."""
    root = tmp_path_factory.mktemp("gguf")
    tokenizer = bpe_tokenizer(root / "tokenizer")
    model = tiny_llama(tokenizer)
    return write_llama_gguf(root / "tiny-llama.gguf", model, root / "tokenizer"), model, tokenizer


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_gguf_file_becomes_the_bf16_checkpoint_of_its_model(written, cache):
    from transformers import AutoTokenizer

    path, model, tokenizer = written
    folder = taskvec.resolve(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert folder == cache / "gguf" / f"tiny-llama-{digest}"
    # Q/K rows back in HF's order, lm_head tied (not stored), each tensor rounded once to bf16.
    want = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()
            if k != "lm_head.weight"}
    got = read_tensors(folder)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    reloaded = AutoTokenizer.from_pretrained(folder)
    assert reloaded(SENTENCES).input_ids == tokenizer(SENTENCES).input_ids


def test_the_conversion_is_reused_and_keyed_by_the_bytes(written, tmp_path):
    path = written[0]
    folder = taskvec.resolve(path)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert taskvec.resolve(path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(folder.parent.glob(".*")), "no temporary left behind"
    other = tmp_path / "tiny-llama.gguf"
    other.write_bytes(path.read_bytes() + b"\0" * 32)  # same name, other bytes
    assert taskvec.resolve(other) != folder


def test_negate_takes_a_gguf_base(written, tmp_path, cache):
    from transformers import AutoModelForCausalLM

    path = written[0]
    converted = taskvec.resolve(path)
    tuned = AutoModelForCausalLM.from_pretrained(converted)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(0.01)
    tuned.save_pretrained(tmp_path / "theta_bad")
    env = cli_env(TASKVEC_CACHE=str(cache))
    proc = run_cli("negate", "--base", path, "--tuned", tmp_path / "theta_bad",
                   "--out", tmp_path / "from_gguf", env=env)
    assert proc.returncode == 0, proc.stderr
    taskvec.negate(converted, tmp_path / "theta_bad", tmp_path / "from_folder")
    for name in ("model.safetensors",):
        assert ((tmp_path / "from_gguf" / name).read_bytes()
                == (tmp_path / "from_folder" / name).read_bytes())


@pytest.mark.parametrize("content", [b"not a model at all", "truncated"])
def test_a_bad_gguf_file_is_one_line(written, tmp_path, cache, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(written[0].read_bytes()[:4096] if content == "truncated" else content)
    proc = run_cli("info", bad, env=cli_env(TASKVEC_CACHE=str(cache)))
    assert_cli_error(proc, str(bad))
    assert not (cache / "gguf").exists() or not any((cache / "gguf").iterdir())


@pytest.mark.parametrize("xdg", ["", "relative/cache"])
def test_an_empty_or_relative_xdg_cache_home_is_ignored(written, tmp_path, xdg):
    """XDG_CACHE_HOME="" made the cache `./taskvec/` in whatever folder a run started in."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    root = str(Path(__file__).parents[2])  # this checkout, though the run starts elsewhere
    env = {k: v for k, v in cli_env(XDG_CACHE_HOME=xdg, HOME=str(home), PYTHONPATH=root).items()
           if k != "TASKVEC_CACHE"}
    proc = subprocess.run([sys.executable, "-m", "taskvec", "info", str(written[0])], cwd=work,
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert list(work.iterdir()) == []
    assert any((home / ".cache" / "taskvec" / "gguf").iterdir())
