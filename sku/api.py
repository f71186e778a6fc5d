"""The Python API: what `sku unlearn` and `sku eval` do, as calls (sku/__init__.py exports it).
Heavy imports wait for the call, so `import sku` stays light."""

from __future__ import annotations

from pathlib import Path

from sku.errors import SkuError


def unlearn(method: str, model: str, forget_data: str, normal_data: str, out: str | Path, *,
            config: str | None = None, resume: bool = False, force: bool = False,
            **settings) -> Path:
    """Stage 1 and stage 2 of `method` into the run folder `out`, as `sku unlearn`; returns
    the final model's folder. `config` names a shipped recipe or a YAML file; `settings` are
    any of UnlearnConfig's fields (`sku unlearn --help`) over it, e.g. max_steps=200."""
    from sku.train.config import resolve_config
    from sku.train.unlearn import unlearn as run_unlearn

    required = {"method": method, "model": str(model), "forget_data": str(forget_data),
                "normal_data": str(normal_data), "out": str(out)}
    return run_unlearn(resolve_config(required, config, settings), resume=resume, force=force)


def evaluate(run: str | Path, out: str | Path | None = None, **options) -> dict:
    """Evaluate a run folder into `out` (default RUN/eval), as `sku eval`; returns the content
    of metrics.json. `options` are any of EvalOptions' and Decoding's fields (`sku eval
    --help`), e.g. judge="keyword", steps=True, max_new_tokens=64."""
    import dataclasses

    from sku.evaluation.evaluate import EvalOptions, evaluate_run
    from sku.evaluation.generate import Decoding
    from sku.run import RunFolder

    decoding_fields = {f.name for f in dataclasses.fields(Decoding)}
    option_fields = {f.name for f in dataclasses.fields(EvalOptions)} - {"decoding"}
    unknown = sorted(options.keys() - decoding_fields - option_fields)
    if unknown:
        raise SkuError(f"evaluate: unknown option {unknown[0]}; known: "
                       f"{', '.join(sorted(option_fields | decoding_fields))}")
    decoding = Decoding(**{k: v for k, v in options.items() if k in decoding_fields})
    settings = EvalOptions(**{k: v for k, v in options.items() if k in option_fields},
                           decoding=decoding)
    return evaluate_run(run, RunFolder(run).eval if out is None else out, settings)
