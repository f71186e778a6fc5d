"""`sku unlearn` end to end on tiny models: run folder, stage 2, LoRA, baselines, resume, NaN
stop, DDP with two gloo processes, one-line errors, and `sku demo --quick`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import taskvec
from sku.cli import main
from sku.train.batch import StepBuilder
from tests.support.checkpoints import read_tensors
from tests.support.sku import (
    PKU_V1,
    TRUTHFULQA,
    run_sku,
    tiny_model,
    unlearn_args,
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_model("llama", tmp_path_factory.getbasetemp())


def _run(*args: str) -> None:
    assert main(list(args)) == 0


def _assert_negated(model_dir, base_dir, tuned_state, scale=1.0):
    base = read_tensors(base_dir)
    final = read_tensors(model_dir)
    assert final.keys() == base.keys()
    for name, original in base.items():
        expected = original - scale * (tuned_state[name] - original)
        torch.testing.assert_close(final[name], expected, rtol=0, atol=1e-6)


def _log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_sku_full_fine_tune_run(llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    _run(*unlearn_args("sku", llama, run, "--save-steps", "2", "--checkpoint-every", "2"))
    assert sorted(p.name for p in run.iterdir()) == [
        "model", "run.json", "snapshots", "splits.json", "theta_bad", "theta_o",
        "train_log.jsonl"]
    original = read_tensors(llama)
    assert {k: torch.equal(v, original[k]) for k, v in read_tensors(run / "theta_o").items()} == {
        k: True for k in original}
    theta_bad = read_tensors(run / "theta_bad")
    _assert_negated(run / "model", llama, theta_bad)
    assert any(not torch.equal(theta_bad[k], v) for k, v in read_tensors(llama).items())
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    assert model(**tokenizer(["### Question: hi"], return_tensors="pt")).logits.isfinite().all()
    assert taskvec.info(run / "snapshots" / "step-2")["kind"] == "task_vector"

    log = _log(run)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert {"loss", "forget_ce", "mismatch_ce", "normal_kl", "lr", "tokens_per_s",
            "memory_gb"} <= log[0].keys()
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 1 and info["method"]["terms"] == {
        "forget_ce": 2.5, "mismatch_ce": 2.5, "normal_kl": -1.0}
    assert {"torch", "transformers", "peft", "accelerate"} <= info["versions"].keys()
    splits = json.loads((run / "splits.json").read_text())
    prompts = {name: {s["prompt"] for s in splits[name]}
               for name in ("unlearned_harmful", "unseen_harmful", "normal")}
    assert prompts["unseen_harmful"] and prompts["unlearned_harmful"] and prompts["normal"]
    assert not prompts["unseen_harmful"] & prompts["unlearned_harmful"]
    records = [json.loads(line) for line in PKU_V1.read_text().splitlines()]
    for entry in splits["unseen_harmful"]:
        assert records[entry["record"]]["prompt"] == entry["prompt"]


def test_resume_after_a_kill_between_stage_1_and_stage_2(llama, tmp_path):
    """Killed after θ_bad was saved, before the checkpoint was removed and stage 2 ran: the
    resume runs stage 2 only and leaves no checkpoint behind."""
    run = tmp_path / "run"
    _run(*unlearn_args("sku", llama, run, "--checkpoint-every", "2"))
    theta_bad = read_tensors(run / "theta_bad")
    shutil.rmtree(run / "model")
    (run / "checkpoint").mkdir()
    (run / "checkpoint" / "step.json").write_text('{"step": 2}\n')
    _run(*unlearn_args("sku", llama, run, "--checkpoint-every", "2", "--resume"))
    assert not (run / "checkpoint").exists()
    assert all(torch.equal(theta_bad[k], v) for k, v in read_tensors(run / "theta_bad").items())
    _assert_negated(run / "model", run / "theta_o", theta_bad)


def _legacy_bin_copy(llama, folder):
    """The tiny original as pytorch_model.bin under legacy names (no `model.` prefix), as
    facebook/opt-* checkpoints are stored on the hub."""
    folder.mkdir()
    for path in llama.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)
    torch.save({k.removeprefix("model."): v for k, v in read_tensors(llama).items()},
               folder / "pytorch_model.bin")
    return folder


def test_full_fine_tune_from_a_legacy_bin_checkpoint(llama, tmp_path):
    """Stage 2 negates against the run's own θ_o copy, written like θ_bad."""
    legacy = _legacy_bin_copy(llama, tmp_path / "legacy")
    original = read_tensors(llama)
    run = tmp_path / "run"
    _run(*unlearn_args("task_vector", legacy, run))
    theta_o = read_tensors(run / "theta_o")
    assert theta_o.keys() == original.keys()
    assert all(torch.equal(theta_o[k], v) for k, v in original.items())
    _assert_negated(run / "model", run / "theta_o", read_tensors(run / "theta_bad"))


def test_lora_needs_a_safetensors_original(llama, tmp_path, capsys):
    legacy = _legacy_bin_copy(llama, tmp_path / "legacy")
    assert main(unlearn_args("sku", legacy, tmp_path / "run", "--lora")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sku: error:") and "pytorch_model.bin" in err and "LoRA" in err


def test_sku_with_lora_negates_the_adapter(llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    _run(*unlearn_args("sku", llama, run, "--lora", "--lora-r", "4", "--lora-alpha", "8",
                       "--save-steps", "2"))
    assert (run / "theta_bad" / "adapter_config.json").is_file()
    assert (run / "snapshots" / "step-2" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(llama)
    merged = PeftModel.from_pretrained(base, run / "theta_bad").merge_and_unload()
    _assert_negated(run / "model", llama, merged.state_dict())
    assert "lm_head.weight" in read_tensors(run / "model")


def test_task_vector_scale_and_ft_and_ga_with_lora(llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _run(*unlearn_args("task_vector", llama, tmp_path / "tv", "--scale", "2"))
    _assert_negated(tmp_path / "tv" / "model", llama, read_tensors(tmp_path / "tv" / "theta_bad"),
                    scale=2.0)

    _run(*unlearn_args("ft", llama, tmp_path / "ft"))
    assert not (tmp_path / "ft" / "theta_bad").exists()
    assert set(_log(tmp_path / "ft")[0]) >= {"safe_ce"}
    AutoModelForCausalLM.from_pretrained(tmp_path / "ft" / "model")

    _run(*unlearn_args("ga", llama, tmp_path / "ga", "--lora", "--lora-r", "4"))
    base = AutoModelForCausalLM.from_pretrained(llama)
    merged = PeftModel.from_pretrained(base, tmp_path / "ga" / "adapter").merge_and_unload()
    final = read_tensors(tmp_path / "ga" / "model")
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-6)


def test_ga_mismatch_on_opt(tmp_path_factory, tmp_path):
    """OPT: project_out after the final norm, and a head tied to the embeddings, which must
    stay tied when the model trained in another dtype is saved in the checkpoint's."""
    opt = tiny_model("opt", tmp_path_factory.getbasetemp())
    _run(*unlearn_args("ga_mismatch", opt, tmp_path / "run", "--teacher", "copy",
                       "--dtype", "float64"))
    log = _log(tmp_path / "run")
    assert log[0]["normal_kl"] == pytest.approx(0, abs=1e-6) and log[-1]["normal_kl"] > 0
    assert read_tensors(tmp_path / "run" / "model").keys() == read_tensors(opt).keys()


@pytest.mark.parametrize("lora", [(), ("--lora", "--lora-r", "4")], ids=["full", "lora"])
def test_resume_gives_the_uninterrupted_result(llama, tmp_path, monkeypatch, lora):
    args = ("--max-steps", "6", "--checkpoint-every", "2", "--save-steps", "5", *lora)
    _run(*unlearn_args("sku", llama, tmp_path / "whole", *args))

    interrupted = tmp_path / "interrupted"
    original = StepBuilder.micro_batches

    def stop_at_step_5(self, step, *rest):
        if step == 4:
            raise KeyboardInterrupt
        return original(self, step, *rest)

    monkeypatch.setattr(StepBuilder, "micro_batches", stop_at_step_5)
    assert main(unlearn_args("sku", llama, interrupted, *args)) == 130
    assert json.loads((interrupted / "checkpoint" / "step.json").read_text())["step"] == 4
    assert not (interrupted / "theta_bad").exists()
    monkeypatch.setattr(StepBuilder, "micro_batches", original)
    assert main(unlearn_args("sku", llama, interrupted, *args)) == 1  # no --resume, no --force
    _run(*unlearn_args("sku", llama, interrupted, *args, "--resume"))

    whole, resumed = read_tensors(tmp_path / "whole" / "theta_bad"), read_tensors(
        interrupted / "theta_bad")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert all(torch.equal(a, b) for a, b in zip(
        read_tensors(tmp_path / "whole" / "model").values(),
        read_tensors(interrupted / "model").values(), strict=True))
    strip = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "memory_gb")}
             for r in _log(tmp_path / "whole")]
    assert strip == [{k: v for k, v in r.items() if k not in ("tokens_per_s", "memory_gb")}
                     for r in _log(interrupted)]
    assert not (interrupted / "checkpoint").exists()


def _stopped(llama, run, capsys) -> str:
    """Run 8 steps, checkpointing every 2, expecting a stop: its one error line."""
    assert main(unlearn_args("sku", llama, run, "--max-steps", "8", "--checkpoint-every",
                             "2")) == 1
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(llama, tmp_path, monkeypatch,
                                                                 capsys):
    import sku.train.loss

    calls = {"n": 0}
    original = sku.train.loss.linear_ce_kl

    def nan_from_step_5(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 5 else loss

    monkeypatch.setattr(sku.train.loss, "linear_ce_kl", nan_from_step_5)
    run = tmp_path / "run"
    error = _stopped(llama, run, capsys)
    assert error.startswith("sku: error: loss is nan at step 5")
    assert "last good checkpoint (step 4)" in error
    assert json.loads((run / "checkpoint" / "step.json").read_text())["step"] == 4
    assert not (run / "theta_bad").exists() and not (run / "model").exists()
    assert [r["step"] for r in _log(run)] == [1, 2, 3, 4]

    # The advised recovery: a lower --lr from the last good checkpoint, on the same schedule.
    monkeypatch.setattr(sku.train.loss, "linear_ce_kl", original)
    refused = main(unlearn_args("sku", llama, run, "--max-steps", "8", "--checkpoint-every",
                                "2", "--k", "3", "--resume"))
    assert refused == 1 and "only lr may change" in capsys.readouterr().err
    _run(*unlearn_args("sku", llama, run, "--max-steps", "8", "--checkpoint-every", "2",
                       "--lr", "5e-3", "--resume"))
    log = _log(run)
    assert [r["step"] for r in log] == list(range(1, 9))
    assert log[3]["lr"] == pytest.approx(1e-2 * (1 - 3 / 8))  # trained before the stop
    for record in log[4:]:  # linear decay from step 4 on, from the new base rate
        assert record["lr"] == pytest.approx(5e-3 * (1 - (record["step"] - 1) / 8))
    recorded = json.loads((run / "run.json").read_text())
    assert recorded["config"]["lr"] == 5e-3
    assert recorded["resumed_with"] == [{"from_step": 4, "changed": {"lr": [1e-2, 5e-3]}}]
    assert (run / "model").is_dir()


def test_weights_that_are_not_finite_are_never_checkpointed(llama, tmp_path, monkeypatch,
                                                            capsys):
    """A finite loss can still step the weights to Inf: the checkpoint keeps the last good
    state, never the poisoned one."""
    steps = {"n": 0}
    original = torch.optim.AdamW.step

    def poison_step_4(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        steps["n"] += 1
        if steps["n"] == 4:  # after step 4's loss, before its checkpoint
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poison_step_4)
    run = tmp_path / "run"
    error = _stopped(llama, run, capsys)
    assert error.startswith("sku: error: weights are not finite at step 4")
    assert "last good checkpoint (step 2)" in error
    assert json.loads((run / "checkpoint" / "step.json").read_text())["step"] == 2
    assert all(torch.isfinite(t).all() for t in read_tensors(run / "checkpoint").values())


def test_ddp_with_two_gloo_processes_equals_one_process(llama, tmp_path):
    """Equal effective batch (2 rows): 2 processes × 1 row vs 1 process × 2 rows (float64,
    so that Adam's normalisation cannot amplify float32 summation-order noise)."""
    args = ("--dtype", "float64", "--checkpoint-every", "2")
    single = tmp_path / "single"
    _run(*unlearn_args("sku", llama, single, *args))
    ddp = tmp_path / "ddp"
    proc = run_sku(*unlearn_args("sku", llama, ddp, *args),
                   launcher=("-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", "-m", "sku"),
                   env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((ddp / "run.json").read_text())["world_size"] == 2
    one, two = read_tensors(single / "theta_bad"), read_tensors(ddp / "theta_bad")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-7)
    for a, b in zip(_log(single), _log(ddp), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)


def test_bad_data_file_is_one_line_without_traceback(llama, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "hi", "answer": "there"}\n')
    proc = run_sku("unlearn", "--method", "sku", "--model", str(llama), "--forget-data",
                   str(bad), "--normal-data", str(TRUTHFULQA), "--out", str(tmp_path / "run"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sku: error: {bad}: missing columns")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before it is made: no --force needed


@pytest.mark.parametrize("extra, needle", [
    (("--lora", "--load-in-4bit"), "needs a CUDA GPU"),
    (("--resume",), "nothing to resume"),
    (("--config", "no-such-recipe"), "no such recipe"),
    (("--batch-size", "3", "--micro-batch-size", "2"), "micro_batch_size 2 does not divide"),
])
def test_refused_settings(llama, tmp_path, capsys, extra, needle):
    if "--load-in-4bit" in extra and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(unlearn_args("sku", llama, tmp_path / "run", *extra)) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("sku: error:") and needle in error and "\n" not in error


def test_demo_quick(tmp_path, capsys):
    from sku.demo.studies import TINY

    demo = tmp_path / "demo"
    assert main(["demo", "--out", str(demo), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "# Unlearning report (paper Table 1)" in printed and "| SKU w/o RD |" in printed
    report = json.loads((demo / "report" / "report.json").read_text())
    rows = {row["label"]: row for row in report["rows"]}
    assert list(rows) == ["Original", "FT", "GA", "GA+Mismatch", "Task Vector", "SKU"]
    assert [row["label"] for row in report["ablations"]] == [
        "Original", "SKU w/o RD", "SKU w/o PD", "SKU"]
    fields = {"method", "harmful_rate_unlearned", "harmful_rate_unseen", "ppl_unlearned",
              "ppl_unseen", "ppl_normal", "bleurt_normal", "rank_unlearn", "rank_utility",
              "rank_avg", "judge", "source"}
    for label, row in rows.items():
        assert fields <= row.keys() and row["judge"] == "keyword"
        for key in ("harmful_rate_unlearned", "harmful_rate_unseen"):
            assert 0 <= row[key] <= 1
        assert row["ppl_normal"] > 1 and row["bleurt_normal"] is None  # no BLEURT offline
        assert (row["rank_avg"] is None) == (label == "Original")
    assert report["perplexity_model"]["model"] == str(demo / "original")
    assert any(note.startswith("bleurt for ") and "not computed" in note
               for note in report["notes"])
    markdown = (demo / "report" / "report.md").read_text()
    assert "| SKU w/o PD |" in markdown and str(demo / "original") in markdown
    assert report["figures"] == ["figure3.png", "figure3.pdf", "figure3.json"]
    for figure in report["figures"]:
        assert (demo / "report" / figure).stat().st_size > 0
    for name in TINY.runs:
        metrics = json.loads((demo / "runs" / name / "eval" / "metrics.json").read_text())
        assert [m["step"] for m in metrics["steps"]] == [0, 4, 8]  # Figure 3's points
        assert (demo / "runs" / name / "model" / "config.json").is_file()
    losses = json.loads((demo / "answer_loss.json").read_text())["answer_loss"]
    assert losses["ga"]["unlearned_harmful"] > losses["original"]["unlearned_harmful"]
    finished = {p: p.stat().st_mtime_ns for p in demo.rglob("*") if p.is_file()
                and "report" not in p.parts and p.name not in ("study.json", "answer_loss.md",
                                                               "answer_loss.json")}
    assert main(["demo", "--out", str(demo), "--quick"]) == 0  # a rerun continues: all done
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # nothing trained again
    assert main(["demo", "--out", str(demo)]) == 1  # another budget: refused, kept
    assert "made by another study or budget" in capsys.readouterr().err


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "{unlearn,demo,eval,judge,report}" in capsys.readouterr().out


def test_redirected_logs_are_short_lines_and_quiet_is_quiet(llama, tmp_path):
    proc = run_sku(*unlearn_args("sku", llama, tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.split("\n")  # a bar's redraws are \r-separated within one line
    assert any(line.startswith("sku unlearn: stage 1 of sku: 4 steps of 2 rows") for line in lines)
    assert any("stage 1" in line and "4/4" in line for line in lines)  # the bar, at its end
    assert max(map(len, lines)) < 400
    assert "finished; the final model is in" in proc.stdout  # what the command reports

    quiet = run_sku(*unlearn_args("sku", llama, tmp_path / "quiet"), "-q")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "sku unlearn:" not in quiet.stderr and "stage 1" not in quiet.stderr
