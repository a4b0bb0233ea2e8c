"""Fine-tune M diverse reward models from one shared initialisation (the WARM recipe).

1. The shared init: the base model (any HF encoder or decoder) with a 1-label reward head
   drawn once from `seed`, saved to <out>/init. Every member starts here, so their weights
   stay linearly connected and can be averaged.
2. Members: Bradley-Terry fine-tuning on preference pairs with TRL's `RewardTrainer`, each
   with its own learning rate and dropout (cycling through the grids), seed (head-free: the
   seed drives dropout masks) and data order. With `baklava_steps`, member i instead starts
   from step i x baklava_steps of one shared fine-tuning run ("Baklava": different initial
   checkpoints of one run).
3. Ranking: held-out pairwise accuracy; the best `keep` members are merged by weight
   averaging into <out>/warm (a verified artifact, see `merger.build`).

Why TRL: its RewardTrainer is the Bradley-Terry trainer RLHF users already run. We hand it
token ids that we render and tokenise ourselves (`merger.formatting.render`, truncated from
the left like the service), so a member is trained on exactly the text the service scores,
and TRL adds nothing (no EOS, no prompt concatenation of its own).

Every member directory is written to a temporary name and renamed when complete, with a
`member.json` recording its hyperparameters, a key of everything that determines it, and its
accuracy: a rerun with the same inputs reuses it (the demo's cache), any change retrains it.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from merger.build import run_merge
from merger.calibration import calibrate_artifact
from merger.config import MergeSpec
from merger.diagnose import average_states, pairwise_accuracy
from merger.formatting import DEFAULT_SEPARATOR, TokenLayout, render
from merger.plan import plan_merge
from merger.preferences import Preference, pairs_sha256
from merger.recipe.selection import Select, SelectMetric, Tried, greedy_soup, laggards
from merger.scoring import batch_texts, load_reward_model, score_batches
from merger.writer import atomic_file

MEMBER_FILE = "member.json"
REPORT_FILE = "finetune.json"
# Config fields that hold a dropout probability, across BERT, GPT-2, Llama-style configs.
DROPOUT_FIELDS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "summary_first_dropout",
    "attention_dropout",
    "hidden_dropout",
    "dropout",
)

Log = Callable[[str], None]
# (member name, optimiser steps done, steps in all): at its start, then after every step.
Steps = Callable[[str, int, int], None]


def _pair_key(pairs: Sequence[Preference]) -> list[dict[str, str]]:
    return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]


class FinetuneSpec(BaseModel):
    """Everything `warm-merge finetune` needs: data, base model, the diversity grid."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: Path = Field(description="Base model directory (HF encoder or decoder).")
    out: Path = Field(description="Output directory: init/, member-*/, warm/, finetune.json.")
    members: int = Field(4, ge=1, description="How many reward models to fine-tune.")
    keep: int | None = Field(None, ge=1, description="Merge the best `keep` (default: all).")
    select: Select = Field(
        "all",
        description="Which members to merge: 'all', 'top-k' (the best `keep`; implied by "
        "`keep`) or 'greedy' (a greedy soup on the validation pairs).",
    )
    select_metric: SelectMetric = Field(
        "accuracy", description="What the greedy soup improves on the validation pairs."
    )
    learning_rates: tuple[float, ...] = Field((1e-4, 5e-5), min_length=1)
    dropouts: tuple[float, ...] = Field((0.1, 0.0), min_length=1)
    seed: int = Field(0, description="Seeds the shared head; member i uses seed + 1 + i.")
    baklava_steps: int = Field(
        0, ge=0, description="Member i starts from step i x this of one shared run (0: off)."
    )
    epochs: float = Field(1.0, gt=0)
    early_stopping: bool = Field(
        False,
        description="Evaluate the held-out loss `evaluations` times over the run, stop a "
        "member once it has not improved for `patience` evaluations, and keep its best "
        "checkpoint.",
    )
    evaluations: int = Field(10, ge=2, description="Held-out evaluations per member's run.")
    patience: int = Field(2, ge=1, description="Evaluations without improvement before stopping.")
    batch_size: int = Field(16, ge=1, description="Preference pairs per step.")
    max_length: int = Field(128, ge=2, description="Tokens per text (cut from the left).")
    separator: str = DEFAULT_SEPARATOR
    merge: bool = Field(True, description="Write the WARM artifact of the kept members.")
    calibrate: bool = Field(
        False,
        description="Calibrate the WARM artifact on the validation pairs (warm-merge "
        "calibrate: reward statistics, temperature, golden set).",
    )
    golden: int = Field(64, ge=0, description="Golden responses when calibrating.")

    @model_validator(mode="after")
    def _check(self) -> FinetuneSpec:
        if self.select == "greedy" and self.keep is not None:
            raise ValueError("keep is top-k's; a greedy soup chooses its own members")
        if self.select == "top-k" and self.keep is None:
            raise ValueError("select top-k needs keep")
        if self.calibrate and not self.merge:
            raise ValueError("calibrate needs merge: the calibration goes into the WARM artifact")
        if self.keep is not None and self.keep > self.members:
            raise ValueError(f"keep ({self.keep}) exceeds members ({self.members})")
        for lr in self.learning_rates:
            if not 0 < lr < 1:
                raise ValueError(f"learning rate {lr} is outside (0, 1)")
        for p in self.dropouts:
            if not 0 <= p < 1:
                raise ValueError(f"dropout {p} is outside [0, 1)")
        return self


class MemberPlan(BaseModel):
    """One member's hyperparameters."""

    model_config = ConfigDict(frozen=True)

    name: str
    learning_rate: float
    dropout: float
    seed: int = Field(description="Dropout masks and data order.")
    init_step: int = Field(description="Shared-run step it starts from (0: the shared init).")


class TrainedMember(BaseModel):
    """A trained member: its plan, where it is and its held-out accuracy."""

    plan: MemberPlan
    path: str
    key: str
    train_loss: float
    val_accuracy: float
    steps: int | None = Field(
        None, description="Optimiser steps run (early stopping: to the stop)."
    )
    best_step: int | None = Field(None, description="Early stopping: the step kept.")
    best_val_loss: float | None = Field(None, description="Early stopping: its held-out loss.")
    val_losses: list[tuple[int, float]] = Field(
        default_factory=list, description="Early stopping: (step, held-out loss) evaluated."
    )


class FinetuneReport(BaseModel):
    """What `finetune` did: every member ranked, the kept ones, the artifact."""

    init: str
    train_pairs: int
    val_pairs: int
    ranking: list[TrainedMember] = Field(description="Best held-out accuracy first.")
    kept: list[str]
    artifact: str | None
    warnings: list[str] = Field(
        default_factory=list, description="Members far below the best on the held-out pairs."
    )
    selection: list[Tried] = Field(
        default_factory=list, description="Every candidate average the greedy soup scored."
    )
    temperature: float | None = Field(
        None, description="The calibrated artifact's Bradley-Terry temperature (calibrate)."
    )


def plan_members(spec: FinetuneSpec) -> list[MemberPlan]:
    """Member i: the i-th (learning rate, dropout) of the grid, cycling; seed + 1 + i."""
    grid = list(itertools.product(spec.learning_rates, spec.dropouts))
    return [
        MemberPlan(
            name=f"member-{i}",
            learning_rate=grid[i % len(grid)][0],
            dropout=grid[i % len(grid)][1],
            seed=spec.seed + 1 + i,
            init_step=i * spec.baklava_steps,
        )
        for i in range(spec.members)
    ]


def rank(results: Sequence[TrainedMember]) -> list[TrainedMember]:
    """Best held-out accuracy first; ties keep member order."""
    return sorted(results, key=lambda r: -r.val_accuracy)


def _set_dropout(config: Any, p: float) -> dict[str, float]:
    """Set every dropout field present on `config` to p; return the old values."""
    old = {
        f: getattr(config, f) for f in DROPOUT_FIELDS if isinstance(getattr(config, f, None), float)
    }
    for field in old:
        setattr(config, field, p)
    return old


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _dir_key(directory: Path) -> str:
    files = sorted(p for p in directory.iterdir() if p.is_file())
    return _key([(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files])


def _save_atomic(model: Any, tokenizer: Any, dest: Path, extra: dict[str, str]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in extra.items():
            (tmp / name).write_text(text)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_init(spec: FinetuneSpec) -> Path:
    """The shared initialisation: base + a reward head drawn from `seed` (kept if present)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    dest = spec.out / "init"
    key = _key("init", _dir_key(spec.base), spec.seed)
    if (dest / "init.key").is_file() and (dest / "init.key").read_text() == key:
        return dest
    tokenizer = AutoTokenizer.from_pretrained(spec.base)
    torch.manual_seed(spec.seed)
    model = AutoModelForSequenceClassification.from_pretrained(spec.base, num_labels=1)
    if tokenizer.pad_token is None:  # decoders: pad with EOS, and read the last real token
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    spec.out.mkdir(parents=True, exist_ok=True)
    _save_atomic(model, tokenizer, dest, {"init.key": key})
    return dest


def encode_pairs(tokenizer: Any, pairs: Sequence[Preference], spec: FinetuneSpec) -> Any:
    """A datasets.Dataset of chosen_ids / rejected_ids, rendered and cut as the service does."""
    from datasets import Dataset

    layout = TokenLayout.of(tokenizer, spec.max_length)

    def ids(prompt: str, response: str) -> list[int]:
        text = render(tokenizer, prompt=prompt, response=response, separator=spec.separator)
        # Cut from the left: keep the response, it is what the reward judges.
        ((out, _),) = layout.encode(tokenizer, [text], "left")
        return out

    rows = [
        {"chosen_ids": ids(p.prompt, p.chosen), "rejected_ids": ids(p.prompt, p.rejected)}
        for p in pairs
    ]
    return Dataset.from_list(rows)


def load_rm(path: Path) -> tuple[Any, Any]:
    """A reward model (eval mode) and its tokenizer."""
    from transformers import AutoTokenizer

    return load_reward_model(path), AutoTokenizer.from_pretrained(path)


def pair_rewards(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[Preference],
    *,
    max_length: int = 128,
    separator: str = DEFAULT_SEPARATOR,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and of the rejected responses (each [N], fp32), as served."""
    texts = [
        render(tokenizer, prompt=p.prompt, response=response, separator=separator)
        for responses in ([p.chosen for p in pairs], [p.rejected for p in pairs])
        for p, response in zip(pairs, responses, strict=True)
    ]
    rewards = score_batches(model.eval(), batch_texts(tokenizer, texts, batch_size, max_length))
    return rewards[: len(pairs)], rewards[len(pairs) :]


def accuracy(model: Any, tokenizer: Any, pairs: Sequence[Preference], spec: FinetuneSpec) -> float:
    """Held-out pairwise accuracy: the share of pairs whose chosen response scores higher."""
    chosen, rejected = pair_rewards(
        model, tokenizer, pairs, max_length=spec.max_length, separator=spec.separator
    )
    return pairwise_accuracy(chosen, rejected)


def _quiet_transformers() -> None:
    """No load reports, progress bars or per-run metric dicts: `log` says what happens."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _trainer(
    model: Any,
    tokenizer: Any,
    data: Any,
    out: Path,
    on_step: Callable[[int, int], None] | None = None,
    *,
    eval_dataset: Any = None,
    patience: int | None = None,
    **args: Any,
) -> Any:
    """TRL's RewardTrainer over `data`; with `eval_dataset` and `patience`, stopped early
    on the held-out loss."""
    from transformers import EarlyStoppingCallback, PrinterCallback, TrainerCallback
    from trl.trainer.reward_config import RewardConfig
    from trl.trainer.reward_trainer import RewardTrainer

    config = RewardConfig(
        output_dir=str(out),
        disable_dropout=False,  # dropout is one of the diversity knobs
        max_length=None,  # already cut to spec.max_length, from the left
        report_to=[],
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        logging_steps=10**9,
        **args,
    )
    trainer = RewardTrainer(
        model=model,
        args=config,
        train_dataset=data,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    if patience is not None:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=patience))
    trainer.remove_callback(PrinterCallback)  # with tqdm off, it prints every metric dict
    if on_step is not None:
        report = on_step

        class Steps(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                report(0, state.max_steps)

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                report(state.global_step, state.max_steps)

        trainer.add_callback(Steps())
    return trainer


def _baklava_inits(
    spec: FinetuneSpec, init: Path, data: Any, plans: list[MemberPlan]
) -> dict[int, Path]:
    """Checkpoints of one shared fine-tuning run at every member's start step."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    steps = sorted({p.init_step for p in plans} - {0})
    if not steps:
        return {0: init}
    root = spec.out / "baklava"
    key = _key("baklava", _dir_key(init), steps, spec.learning_rates[0], spec.batch_size, spec.seed)
    if not ((root / "run.key").is_file() and (root / "run.key").read_text() == key):
        shutil.rmtree(root, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(init)
        model = AutoModelForSequenceClassification.from_pretrained(init)
        trainer = _trainer(
            model, tokenizer, data, root / "run",
            learning_rate=spec.learning_rates[0], per_device_train_batch_size=spec.batch_size,
            max_steps=steps[-1], seed=spec.seed, data_seed=spec.seed, save_strategy="no",
        )  # fmt: skip

        from transformers import TrainerCallback

        class SaveAt(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if state.global_step in steps:
                    _save_atomic(model, tokenizer, root / f"step-{state.global_step}", {})

        trainer.add_callback(SaveAt())
        trainer.train()
        shutil.rmtree(root / "run", ignore_errors=True)
        (root / "run.key").write_text(key)
    return {0: init} | {s: root / f"step-{s}" for s in steps}


def train_member(
    plan: MemberPlan,
    start: Path,
    data: Any,
    val: Sequence[Preference],
    spec: FinetuneSpec,
    key: str,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainedMember:
    """Fine-tune one member from `start` and write it atomically to <out>/<name>;
    `on_step(done, total)` hears of each optimiser step."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(start)
    config = AutoConfig.from_pretrained(start)
    saved_dropout = _set_dropout(config, plan.dropout)  # dropout modules read it when built
    model = AutoModelForSequenceClassification.from_pretrained(start, config=config)
    stopping: dict[str, Any] = {"save_strategy": "no"}
    if spec.early_stopping:
        steps = math.ceil(len(data) / spec.batch_size) * spec.epochs
        every = max(1, math.ceil(steps / spec.evaluations))
        stopping = {
            "eval_dataset": encode_pairs(tokenizer, val, spec),
            "patience": spec.patience,
            "eval_strategy": "steps", "eval_steps": every, "save_strategy": "steps",
            "save_steps": every, "load_best_model_at_end": True,
            "metric_for_best_model": "eval_loss", "greater_is_better": False,
            "save_total_limit": 2, "save_only_model": True,
        }  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        trainer = _trainer(
            model, tokenizer, data, Path(scratch), on_step,
            learning_rate=plan.learning_rate, per_device_train_batch_size=spec.batch_size,
            num_train_epochs=spec.epochs, seed=plan.seed, data_seed=plan.seed, **stopping,
        )  # fmt: skip
        loss = float(trainer.train().training_loss)
        state = trainer.state
    model = trainer.model
    # Members share one config (the init's dropout), so they merge without config overrides.
    for field, value in saved_dropout.items():
        setattr(model.config, field, value)
    result = TrainedMember(
        plan=plan,
        path=str(spec.out / plan.name),
        key=key,
        train_loss=loss,
        val_accuracy=accuracy(model, tokenizer, val, spec),
        steps=state.global_step,
        best_step=state.best_global_step if spec.early_stopping else None,
        best_val_loss=state.best_metric if spec.early_stopping else None,
        val_losses=[
            (int(entry["step"]), float(entry["eval_loss"]))
            for entry in state.log_history
            if "eval_loss" in entry
        ],
    )
    _save_atomic(
        model, tokenizer, spec.out / plan.name, {MEMBER_FILE: result.model_dump_json(indent=2)}
    )
    return result


def _cached(spec: FinetuneSpec, plan: MemberPlan, key: str) -> TrainedMember | None:
    path = spec.out / plan.name / MEMBER_FILE
    if not path.is_file():
        return None
    result = TrainedMember.model_validate_json(path.read_text())
    if result.key != key:
        return None
    return result.model_copy(update={"path": str(path.parent)})  # the directory may have moved


def soup_score(
    members: Sequence[TrainedMember], val: Sequence[Preference], spec: FinetuneSpec
) -> Callable[[list[str]], float]:
    """The held-out score (`spec.select_metric`) of the uniform average of named members."""
    from safetensors.torch import load_file

    from merger.calibration import pair_metrics

    paths = {m.plan.name: Path(m.path) for m in members}
    states = {name: load_file(str(path / "model.safetensors")) for name, path in paths.items()}
    model, tokenizer = load_rm(paths[members[0].plan.name])

    def score(names: list[str]) -> float:
        chosen = [states[n] for n in names]
        model.load_state_dict(average_states(chosen, [1 / len(chosen)] * len(chosen)))
        good, bad = pair_rewards(
            model, tokenizer, val, max_length=spec.max_length, separator=spec.separator
        )
        if spec.select_metric == "accuracy":
            return pairwise_accuracy(good, bad)
        return pair_metrics((good - bad).double().numpy(), 1.0).log_loss

    return score


def finetune(
    spec: FinetuneSpec,
    train: Sequence[Preference],
    val: Sequence[Preference],
    *,
    log: Log = lambda _m: None,
    steps: Steps | None = None,
) -> FinetuneReport:
    """Train (or reuse) every member, rank them on `val`, merge the best `keep` into warm/.

    `log` hears one line per member; `steps` (for progress bars) each member's optimiser
    steps, a reused member as one step done of one."""
    from transformers import AutoTokenizer

    if not train or not val:
        raise ValueError(f"need training and validation pairs (got {len(train)} and {len(val)})")
    if spec.calibrate and len(val) < 2:
        raise ValueError(f"calibrate: {len(val)} validation pair(s), at least 2 needed")
    _quiet_transformers()
    init = make_init(spec)
    tokenizer = AutoTokenizer.from_pretrained(init)
    data = encode_pairs(tokenizer, train, spec)
    data_key = _key(_pair_key(train), _pair_key(val))
    plans = plan_members(spec)
    starts = _baklava_inits(spec, init, data, plans)
    results = []
    for plan in plans:
        start = starts[plan.init_step]
        key = _key(
            plan.model_dump(),
            _dir_key(start),
            data_key,
            spec.epochs,
            spec.batch_size,
            spec.max_length,
            spec.separator,
            *(("early", spec.evaluations, spec.patience) if spec.early_stopping else ()),
        )
        result = _cached(spec, plan, key)
        if result is None:
            log(
                f"{plan.name}: lr {plan.learning_rate:g}, dropout {plan.dropout:g}, "
                f"seed {plan.seed}, from step {plan.init_step}"
            )
            on_step = None if steps is None else functools.partial(steps, plan.name)
            result = train_member(plan, start, data, val, spec, key, on_step)
        elif steps is not None:
            steps(plan.name, 1, 1)
        log(f"{plan.name}: held-out accuracy {result.val_accuracy:.3f}")
        results.append(result)
    ranking = rank(results)
    accuracy_of = {r.plan.name: r.val_accuracy for r in ranking}
    warnings = [
        f"{name}: held-out accuracy {accuracy_of[name]:.3f}, far below the best "
        f"({ranking[0].val_accuracy:.3f}): under-trained, or stuck on a shortcut?"
        for name in laggards(accuracy_of, len(val))
    ]
    for warning in warnings:
        log(f"warning: {warning}")
    tried: list[Tried] = []
    if spec.select == "greedy":
        names, tried = greedy_soup(
            [r.plan.name for r in ranking],
            [r.val_accuracy for r in ranking],
            soup_score(ranking, val, spec),
            higher_is_better=spec.select_metric == "accuracy",
        )
        kept = [r for r in ranking if r.plan.name in names]
        log(f"greedy soup of {len(kept)}: {', '.join(names)} ({len(tried)} averages tried)")
    else:
        kept = ranking[: spec.keep or spec.members]
    artifact = None
    if spec.merge:
        artifact = spec.out / "warm"
        inputs = tuple(Path(r.path) for r in kept)
        run_merge(plan_merge(MergeSpec(inputs=inputs)), artifact, overwrite=True)
    temperature = None
    if artifact is not None and spec.calibrate:
        calibration = calibrate_artifact(
            artifact,
            ("validation pairs", pairs_sha256(val)),
            val,
            golden=spec.golden,
            max_length=spec.max_length,
            separator=spec.separator,
        )
        temperature = calibration.temperature.value
        log(
            f"calibrated on {len(val)} validation pairs: temperature {temperature:.4g}, "
            f"golden set of {len(calibration.golden)}"
        )
    report = FinetuneReport(
        init=str(init),
        train_pairs=len(train),
        val_pairs=len(val),
        ranking=ranking,
        kept=[r.plan.name for r in kept],
        artifact=str(artifact) if artifact else None,
        warnings=warnings,
        selection=tried,
        temperature=temperature,
    )
    with atomic_file(spec.out / REPORT_FILE) as fh:
        fh.write(report.model_dump_json(indent=2).encode())
    return report
