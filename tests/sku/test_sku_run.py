"""sku.run, the one owner of the run folder's layout: which θ_o deltas are taken against, and
which entries a --force may replace."""

from sku.run import RunFolder


def test_theta_o_is_the_runs_copy_when_written_else_the_original(tmp_path):
    run, original = RunFolder(tmp_path / "run"), tmp_path / "original"
    run.path.mkdir()
    assert run.theta_o(original) == original  # a LoRA run merges into the original
    (run.path / "theta_o").mkdir()
    assert run.theta_o(original) == run.path / "theta_o"


def test_stage1_folder_follows_the_method():
    run = RunFolder("RUN")
    assert run.stage1(negate=True, lora=True).name == "theta_bad"
    assert run.stage1(negate=False, lora=True).name == "adapter"
    assert run.stage1(negate=False, lora=False) == run.model  # the fine-tune is the final model


def test_only_entries_no_sku_command_writes_are_foreign(tmp_path):
    run = RunFolder(tmp_path)
    for name in ("run.json", "model", "eval", ".model-tmp"):  # eval/: `sku eval`'s default
        (tmp_path / name).mkdir()
    assert run.foreign_entries() == []
    (tmp_path / "notes.txt").write_text("mine")
    assert run.foreign_entries() == ["notes.txt"]


def test_snapshots_are_listed_by_step(tmp_path):
    run = RunFolder(tmp_path)
    for step in (10, 2):
        run.snapshot(step).mkdir(parents=True)
    (run.snapshots / "step-x").mkdir()
    assert run.list_snapshots() == [(2, run.snapshot(2)), (10, run.snapshot(10))]
