"""Hub ids and aliases resolve through a real Hugging Face cache layout, offline; an id that is
not cached is one line naming the id and pointing at local folders."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import taskvec
from tests.support.checkpoints import make_hub_cache, read_tensors, tree_digest
from tests.support.cli import assert_cli_error, assert_one_line, cli_env, run_cli


@pytest.fixture(scope="module")
def hub(tmp_path_factory, llama):
    """HF_HOME with hub/ holding the tiny LLaMA as meta-llama/Llama-2-7b-hf (plus a decoy
    snapshot that refs/main does not name) and its fine-tune as someorg/tiny-tuned."""
    home = tmp_path_factory.mktemp("hf_home")
    cache = home / "hub"
    make_hub_cache(cache, "meta-llama/Llama-2-7b-hf", llama.base)
    decoy = cache / "models--meta-llama--Llama-2-7b-hf" / "snapshots" / ("0" * 40)
    decoy.mkdir()
    for path in llama.tuned2.iterdir():
        (decoy / path.name).write_bytes(path.read_bytes())
    make_hub_cache(cache, "someorg/tiny-tuned", llama.tuned)
    return home


@pytest.fixture(scope="module")
def expected(tmp_path_factory, llama):
    out = taskvec.negate(llama.base, llama.tuned, tmp_path_factory.mktemp("local") / "o")
    return read_tensors(out)


def _assert_same(folder, expected) -> None:
    actual = read_tensors(folder)
    assert sorted(actual) == sorted(expected)
    assert all(torch.equal(actual[k], v) for k, v in expected.items())


@pytest.mark.parametrize(("variable", "base"), [("HF_HUB_CACHE", "llama2-7b"),
                                               ("HF_HOME", "meta-llama/Llama-2-7b-hf")])
def test_cli_resolves_ids_and_aliases_from_the_cache(hub, expected, tmp_path, variable, base):
    env = cli_env(**{variable: str(hub / "hub" if variable == "HF_HUB_CACHE" else hub)})
    env.pop("HF_HOME" if variable == "HF_HUB_CACHE" else "HF_HUB_CACHE", None)
    before = tree_digest(hub)
    proc = run_cli("negate", "--base", base, "--tuned", "someorg/tiny-tuned",
                   "--out", tmp_path / "o", env=env)
    assert proc.returncode == 0, proc.stderr
    _assert_same(tmp_path / "o", expected)
    assert tree_digest(hub) == before


def test_api_resolves_ids_from_the_cache(hub, expected, tmp_path):
    """In a fresh interpreter: the hub client reads HF_HUB_CACHE when it is first imported."""
    script = textwrap.dedent(f"""
        import taskvec
        taskvec.negate("llama2-7b", "someorg/tiny-tuned", {str(tmp_path / "o")!r})
        assert taskvec.info("llama2-7b")["kind"] == "model"
        taskvec.verify("someorg/tiny-tuned")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=cli_env(HF_HUB_CACHE=str(hub / "hub")), timeout=120)
    assert proc.returncode == 0, proc.stderr
    _assert_same(tmp_path / "o", expected)


@pytest.mark.parametrize(("name", "repo_id"), [("opt-2.7b", "facebook/opt-2.7b"),
                                               ("llama2-13b", "meta-llama/Llama-2-13b-hf"),
                                               ("someorg/not-cached", "someorg/not-cached")])
def test_uncached_id_offline_is_one_line_naming_it(hub, llama, tmp_path, name, repo_id):
    env = cli_env(HF_HUB_CACHE=str(hub / "hub"))
    proc = run_cli("negate", "--base", name, "--tuned", llama.tuned, "--out", tmp_path / "o",
                   env=env)
    line = assert_cli_error(proc, repo_id)
    assert "local" in line.lower(), line
    assert not any(tmp_path.iterdir())

    with pytest.raises(taskvec.TaskVecError) as error:
        taskvec.negate(name, llama.tuned, tmp_path / "o")
    assert_one_line(str(error.value), repo_id)
    assert "local" in str(error.value).lower()
    assert not any(tmp_path.iterdir())
