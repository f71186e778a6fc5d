"""`sku unlearn`: one method, end to end, into one run folder (its layout: sku/run.py)."""

from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

import taskvec
from sku.data.encoding import with_answers
from sku.data.readers import load_forget, load_normal
from sku.data.splits import hold_out, splits_json, visited_prompts
from sku.data.template import TEMPLATES
from sku.dtypes import resolve_dtype
from sku.errors import SkuError, loading, refuse_existing
from sku.log import main_process_logger
from sku.run import SPLITS, RunFolder
from sku.train.batch import StepBuilder, schedule
from sku.train.checkpoint import (
    checkpoint_step,
    keep_trainable,
    load_checkpoint,
    save_checkpoint,
    saving,
    weights_finite,
)
from sku.train.config import UnlearnConfig
from sku.train.loop import NonFiniteLoss, train
from sku.train.loss import TrainingModule
from sku.train.methods import METHODS, Method
from sku.train.model import load_model, master_dtype, model_source
from sku.train.teacher import TeacherMode, cache_teacher
from taskvec import OutputDir, jsonfile

logger = main_process_logger(__name__)  # every process runs this code; one speaks
_VERSIONED = ("sku-unlearn", "torch", "transformers", "peft", "accelerate", "tokenizers",
              "safetensors")


def _versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        raise SkuError(f"{name}: no such model folder")
    with loading(name, "the tokenizer"):
        return AutoTokenizer.from_pretrained(model_source(name))


def base_checkpoint(name: str, *, lora: bool) -> tuple[Path, torch.dtype]:
    """The original model's local folder and the floating dtype its tensors are stored in
    (full fine-tunes save θ_bad in that dtype). A LoRA run merges into this very checkpoint,
    so it must be safetensors; a full fine-tune negates against RUN/theta_o instead, so any
    checkpoint transformers loads (.bin, legacy tensor names) will do."""
    folder = taskvec.resolve(name, "model")
    try:
        dtypes = [d for d in taskvec.info(folder)["dtypes"]
                  if getattr(torch, d).is_floating_point]
    except taskvec.TaskVecError as e:
        if lora:
            raise SkuError(f"{e} (a LoRA run merges its adapter into this checkpoint)") from None
        if any(folder.glob("*.safetensors")):  # a safetensors checkpoint that is damaged
            raise SkuError(str(e)) from None
        path = folder / "config.json"
        try:
            config = jsonfile.mapping(jsonfile.load(path), str(path))
        except taskvec.TaskVecError as error:
            raise SkuError(str(error)) from None
        dtypes = [config.get("dtype") or config.get("torch_dtype") or "float32"]
        if not isinstance(getattr(torch, str(dtypes[0]), None), torch.dtype):
            raise SkuError(f"{path}: dtype {dtypes[0]!r} is not a torch dtype") from None
    if len(dtypes) != 1:
        raise SkuError(f"{folder}: holds {', '.join(dtypes) or 'no'} floating tensors; "
                       "expected one floating dtype")
    return folder, getattr(torch, dtypes[0])


def prepare_data(config: UnlearnConfig, method: Method, tokenizer):
    """(training pools, evaluation splits, provenance). Unseen harmful prompts and normal
    evaluation questions are held out of every pool; unlearned harmful prompts are drawn from
    the forget rows the run's schedule visits. Nothing depends on the method, so every method
    run with the same seed, batch size and steps is evaluated on the same prompts."""
    forget, normal = load_forget(config.forget_data), load_normal(config.normal_data)
    seed, size = config.seed, config.eval_size
    forget_pool, unseen = hold_out(forget.harmful, size, f"{seed}/unseen")
    normal_pool, normal_eval = hold_out(normal.pairs, size, f"{seed}/normal")
    unseen_prompts = {p.prompt for p in unseen}
    template = TEMPLATES[config.template]
    forget_pool = with_answers(tokenizer, forget_pool, config.max_length, template)
    if not forget_pool:
        raise SkuError(f"{forget.source}: no harmful pair keeps an answer token within "
                       f"max_length {config.max_length}")
    visits = schedule("forget", len(forget_pool), config.batch_size, seed)
    unlearned = visited_prompts(forget_pool, visits, config.max_steps, size, f"{seed}/unlearned")
    splits = dict(zip(SPLITS, (unlearned, unseen, normal_eval), strict=True))
    active = {t.rows for t, _ in method.active_terms(tuple(config.eps))}
    if "mismatch" in active:
        active.add(method.mismatch_pool)

    def used(kind: str, pairs: list) -> list:  # tokenised only when the method uses them
        return (with_answers(tokenizer, pairs, config.max_length, template)
                if kind in active else [])

    pools = {"forget": forget_pool, "normal": used("normal", normal_pool),
             "safe": used("safe", [p for p in forget.safe if p.prompt not in unseen_prompts])}
    sources = {"normal": normal.source, "safe": f"{forget.source} (responses labelled safe)"}
    for kind in active & sources.keys():
        if not pools[kind]:
            raise SkuError(f"{sources[kind]}: no {kind} pairs to train {method.name} on")
    if "mismatch" in active and len({p.prompt for p in pools[method.mismatch_pool]}) < 2:
        source = forget.source if method.mismatch_pool == "forget" else normal.source
        raise SkuError(f"{source}: {method.name}'s mismatch rows need responses to two prompts "
                       "or more")
    provenance = {"forget_data": forget.source, "normal_data": normal.source,
                  "pool_sizes": {kind: len(pairs) for kind, pairs in pools.items()}}
    return pools, splits, provenance


def _micro_batch_size(config: UnlearnConfig, world: int) -> int:
    if config.batch_size % world:
        raise SkuError(f"batch_size {config.batch_size} does not split over {world} processes")
    micro = config.micro_batch_size or config.batch_size // world
    if (config.batch_size // world) % micro:
        raise SkuError(f"micro_batch_size {micro} does not divide the {config.batch_size // world}"
                       " rows of each process")
    return micro


# Settings a --resume may change: what recovering from a NaN stop needs. Recorded in run.json.
RESUME_MAY_CHANGE = {"lr"}


def _check_folder(run: RunFolder, config: UnlearnConfig, *, resume: bool, force: bool) -> dict:
    """The refusals, on every process (so all raise together), before anything is changed.
    Returns the settings a resume changes, {key: [was, now]}."""
    out, changed = run.path, {}
    if resume:
        if not run.run_json.is_file():
            raise SkuError(f"{out}: nothing to resume (no run.json); start it without --resume")
        saved, now = run.read_run()["config"], config.as_dict()
        for key in saved.keys() - {"out"}:
            if saved[key] != now.get(key):
                if key not in RESUME_MAY_CHANGE:
                    raise SkuError(f"{out}: --resume with other settings: {key} was "
                                   f"{saved[key]!r}, now {now.get(key)!r} (only "
                                   f"{', '.join(sorted(RESUME_MAY_CHANGE))} may change)")
                changed[key] = [saved[key], now[key]]
    elif out.exists() and any(out.iterdir()):
        refuse_existing(out, force, "pass --resume to continue it, or --force to start over")
        foreign = run.foreign_entries()
        if foreign:
            raise SkuError(f"{out}: not a sku run folder (it holds {foreign[0]}); "
                           "refusing to replace it")
    return changed


def _prepare_folder(run: RunFolder, accelerator, *, resume: bool) -> None:
    """An empty run folder for a new run (a forced one's old run set aside); as it is for a
    resumed one. Changes on the main process only."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not resume and any(run.path.iterdir()):
        run.set_aside()
    accelerator.wait_for_everyone()


class Saver:
    """Stage-1 outputs: adapters, or full checkpoints in the base checkpoint's dtype (a full
    fine-tune's snapshots are task vectors against `base`, the run's θ_o copy)."""

    def __init__(self, accelerator, module, tokenizer, config: UnlearnConfig, base: Path,
                 base_dtype: torch.dtype):
        self.accelerator, self.module, self.tokenizer = accelerator, module, tokenizer
        self.lora, self.base, self.base_dtype = config.lora, base, base_dtype

    def save(self, folder: Path) -> None:
        """From the full state dict accelerate gathers on the main process (under FSDP the
        parameters themselves are shards): a collective, so every process calls it."""
        accelerator = self.accelerator
        model = accelerator.unwrap_model(self.module).model
        state = accelerator.get_state_dict(self.module)
        if accelerator.is_main_process:
            with saving(folder), OutputDir(folder, force=True) as tmp:
                if self.lora:  # peft keeps the adapter's tensors of the whole state
                    model.save_pretrained(tmp, state_dict=self._own(state, None))
                else:
                    model.save_pretrained(tmp, state_dict=self._own(state, self.base_dtype))
                    self.tokenizer.save_pretrained(tmp)
        accelerator.wait_for_everyone()

    @staticmethod
    def _own(state: dict, dtype: torch.dtype | None) -> dict:
        """The trained model's tensors (not the TrainingModule's teacher), cast to `dtype` (the
        original's: fp32 master weights are rounded once, here). Tied tensors (a head tied to
        the embeddings) stay one tensor: save_pretrained drops tied duplicates only then."""
        cast, by_storage = {}, {}
        for name, tensor in state.items():
            if name.startswith("model."):
                key = (tensor.data_ptr(), tensor.shape)
                if key not in by_storage:
                    by_storage[key] = tensor if dtype is None else tensor.to(dtype)
                cast[name.removeprefix("model.")] = by_storage[key]
        return cast

    def snapshot(self, folder: Path) -> None:
        """An adapter, or the task vector θ_step − θ_o of a full fine-tune."""
        if self.lora:
            return self.save(folder)
        full = folder.with_name(f".{folder.name}-full")
        self.save(full)
        if self.accelerator.is_main_process:
            taskvec.diff(self.base, full, folder, force=True)
            shutil.rmtree(full)
        self.accelerator.wait_for_everyone()


def _stage1(config: UnlearnConfig, method: Method, accelerator, precision: Precision,
            tokenizer, pools, run: RunFolder, micro: int, resume: bool) -> None:
    device = accelerator.device
    model = load_model(config, precision.compute, precision.params, device)
    _, base_dtype = base_checkpoint(config.model, lora=config.lora)
    sizes = ", ".join(f"{kind} {len(pairs)}" for kind, pairs in pools.items() if pairs)
    logger.info(f"stage 1 of {method.name}: {config.max_steps} steps of {config.batch_size} "
                f"rows on {accelerator.num_processes} process(es), "
                f"{precision.as_dict()['compute']} compute; pools {sizes}")
    if not config.quantize:
        model.to(device)
    builder = StepBuilder(method, config.eps, pools, tokenizer, batch_size=config.batch_size,
                          k=config.k, max_length=config.max_length,
                          template=TEMPLATES[config.template], seed=config.seed)
    needs_reference = any(t.loss == "kl" for t, _ in builder.terms)
    module = TrainingModule(model, config.teacher if needs_reference else None,
                            precision.compute)
    cache = None
    if module.teacher is not None and module.teacher.mode is TeacherMode.CACHE:
        with accelerator.autocast():  # θ_o's states as the student computes its own
            cache = cache_teacher(module, pools["normal"], tokenizer, config.max_length, device,
                                  bar=accelerator.is_main_process,
                                  template=TEMPLATES[config.template])
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad],
                                  lr=config.lr, weight_decay=config.weight_decay)
    module, optimizer = accelerator.prepare(module, optimizer)
    # Not prepared: accelerate would step it once per process; checkpointed with its state.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: max(0.0, 1.0 - s / config.max_steps))
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_save_state_pre_hook(keep_trainable)
    saver = Saver(accelerator, module, tokenizer, config, run.theta_o_copy, base_dtype)
    if not config.lora and not run.theta_o_copy.is_dir():
        # Before any step (and before a resumed checkpoint is loaded) the model is θ_o.
        # Written like θ_bad, stage 2 subtracts tensors of the same names and dtype whatever
        # format the original came in; a LoRA run merges into the original itself.
        saver.save(run.theta_o_copy)
    checkpoint = run.checkpoint
    start = 0
    if resume and checkpoint_step(checkpoint) is not None:
        start = load_checkpoint(checkpoint, accelerator, optimizer, scheduler, config.lr)
        logger.info(f"resuming at step {start} from {checkpoint}")
    if accelerator.is_main_process:
        run.truncate_log(start)

    def on_step(step: int, record: dict) -> None:
        if accelerator.is_main_process:
            run.append_log(record)
        if step in config.save_steps:
            saver.snapshot(run.snapshot(step))
            logger.debug(f"snapshot of step {step} in {run.snapshot(step)}")
        if step % config.checkpoint_every == 0 and step < config.max_steps:
            save_checkpoint(checkpoint, step, accelerator, module)

    try:
        train(module, optimizer, scheduler, builder, accelerator, start_step=start,
              max_steps=config.max_steps, micro_batch_size=micro, teacher_cache=cache,
              on_step=on_step)
        if not weights_finite(module, accelerator):  # stage 1 is never saved with NaN/Inf
            raise NonFiniteLoss(config.max_steps, "weights are not finite")
    except NonFiniteLoss as e:
        last = checkpoint_step(checkpoint)
        kept = (f"the last good checkpoint (step {last}) is kept in {checkpoint}; fix the "
                "cause and --resume (a lower --lr is accepted)" if last
                else "no checkpoint was saved yet, so nothing of this run is kept")
        raise SkuError(f"{e}: stopped; {kept}") from None
    stage1 = run.stage1(negate=method.negate, lora=config.lora)
    saver.save(stage1)
    logger.info(f"stage 1 saved in {stage1}")
    if accelerator.is_main_process:
        shutil.rmtree(checkpoint, ignore_errors=True)


def _stage2(config: UnlearnConfig, method: Method, tokenizer, run: RunFolder) -> None:
    base = run.theta_o(base_checkpoint(config.model, lora=config.lora)[0])
    stage1, final = run.stage1(negate=method.negate, lora=config.lora), run.model
    if method.negate:
        logger.info(f"stage 2: θ_o − {config.scale:g}·(θ_bad − θ_o) into {final}")
        taskvec.negate(base, stage1, final, scale=config.scale, force=True)
    else:  # a LoRA adapter, merged into the original checkpoint
        logger.info(f"merging the adapter into {base}: {final}")
        taskvec.apply(base, stage1, final, force=True)
    if not (final / "tokenizer_config.json").is_file():
        tokenizer.save_pretrained(final)


@dataclass(frozen=True)
class Precision:
    """compute: the dtype forward and backward run in (`--dtype`); params: the dtype the
    parameters are held in (fp32 master weights under bf16/fp16 autocast, see master_dtype)."""

    compute: torch.dtype
    params: torch.dtype

    def as_dict(self) -> dict:
        return {"compute": str(self.compute).removeprefix("torch."),
                "parameters": str(self.params).removeprefix("torch.")}


_AUTOCAST = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")


def _accelerator(config: UnlearnConfig):
    """The Accelerator of a run and its precision, after refusing what cannot work: each
    refusal is a setting that would otherwise run, silently, not as asked."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, parse_flag_from_env

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("true", "1"):
        raise SkuError("DeepSpeed is not supported yet (its checkpoints are untested here); "
                       "shard with FSDP2: accelerate launch --use_fsdp --fsdp_version 2")
    if _fsdp_requested():
        if config.quantize:
            raise SkuError("FSDP cannot shard a 4-bit/8-bit base; train QLoRA with DDP "
                           "(accelerate launch without --use_fsdp)")
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise SkuError("FSDP1 is not supported: launch with --use_fsdp --fsdp_version 2")
    # The device accelerate will pick, decided before it starts: its mixed precision is fixed
    # at construction (and an early PartialState would miss ACCELERATE_USE_CPU under torchrun).
    on_cpu = not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
    compute = resolve_dtype(config.dtype, torch.device("cpu" if on_cpu else "cuda"))
    # Under FSDP a LoRA run's frozen base is sharded in fp32 too: FSDP2 all-gathers one dtype
    # per group, cast to the compute dtype by its mixed-precision policy.
    params = master_dtype(compute, frozen_base=config.lora and not _fsdp_requested())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched == 1:
        # accelerate keeps one process-wide state whose mixed precision cannot change; Python
        # callers (and `sku demo`) run several unlearn() calls in one process, each its own.
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=_AUTOCAST.get(compute) if params != compute
                              else "no")
    if _fsdp_requested() and accelerator.distributed_type != DistributedType.FSDP:
        raise SkuError(f"FSDP was requested, but accelerate runs {accelerator.distributed_type}"
                       " here, which does not shard (accelerate shards on GPUs only); on CPU "
                       "launch without --use_fsdp (DDP)")
    if launched != accelerator.num_processes:
        raise SkuError(f"launched as {launched} processes but accelerate sees "
                       f"{accelerator.num_processes}; on CPU set ACCELERATE_USE_CPU=1")
    return accelerator, Precision(compute, params)


def unlearn(config: UnlearnConfig, *, resume: bool = False, force: bool = False) -> Path:
    """Run stage 1 and stage 2 of `config.method` into `config.out`, or continue it (resume),
    or replace it (force); returns the final model's folder."""
    accelerator, precision = _accelerator(config)
    method, run = METHODS[config.method], RunFolder(config.out)
    micro = _micro_batch_size(config, accelerator.num_processes)
    with run.held() if accelerator.is_main_process else nullcontext():
        return _unlearn(config, accelerator, precision, method, run, micro, resume=resume,
                        force=force)


def _unlearn(config: UnlearnConfig, accelerator, precision: Precision, method: Method,
             run: RunFolder, micro: int, *, resume: bool, force: bool) -> Path:
    accelerator.wait_for_everyone()  # the main process has settled an interrupted --force
    changed = _check_folder(run, config, resume=resume, force=force)
    torch.manual_seed(config.seed)
    # Whatever can be refused is, before a forced run's old run is set aside.
    tokenizer = load_tokenizer(config.model)
    TEMPLATES[config.template].check(tokenizer)
    base_checkpoint(config.model, lora=config.lora)
    pools, splits, provenance = prepare_data(config, method, tokenizer)
    _prepare_folder(run, accelerator, resume=resume)
    if accelerator.is_main_process and changed:
        record = run.read_run()
        record["config"].update({key: now for key, (_, now) in changed.items()})
        record.setdefault("resumed_with", []).append({
            "from_step": checkpoint_step(run.checkpoint), "changed": changed})
        run.write_run(record)
    if accelerator.is_main_process and not resume:
        run.write_splits(splits_json(splits, seed=config.seed, **provenance))
        run.write_run({
            "config": config.as_dict(),
            "method": {"negate": method.negate, "terms": {
                t.name: w for t, w in method.active_terms(tuple(config.eps))}},
            "world_size": accelerator.num_processes, "micro_batch_size": micro,
            "distributed": str(accelerator.distributed_type), "precision": precision.as_dict(),
            "device": str(accelerator.device), "data": provenance, "versions": _versions()})
        run.snapshots.mkdir()
    accelerator.wait_for_everyone()
    stage1 = run.stage1(negate=method.negate, lora=config.lora)
    if not stage1.exists():
        try:
            _stage1(config, method, accelerator, precision, tokenizer, pools, run, micro, resume)
        except BaseException:
            # Nothing to resume from yet: keep nothing, so that a plain rerun runs (and the
            # run a --force was replacing comes back).
            if not resume and accelerator.is_main_process and not run.resumable():
                run.clear()
            raise
    elif accelerator.is_main_process:  # killed after saving stage 1, before removing this
        shutil.rmtree(run.checkpoint, ignore_errors=True)
    if accelerator.is_main_process and not run.model.exists():
        _stage2(config, method, tokenizer, run)
    accelerator.wait_for_everyone()
    return run.model
