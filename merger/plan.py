"""A merge's plan: the inputs opened and checked, in canonical order, the output's layout,
and what the artifact will say about itself (its provenance record and config.json).

Reads input headers and configs only, never tensor data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from merger import __version__
from merger.checkpoints import Checkpoint, check_compatible, open_checkpoint
from merger.config import MergeSpec, Method
from merger.dtypes import CONFIG_DTYPE_NAMES, FLOATING, OUTPUT_DTYPES
from merger.manifest import PLACEHOLDER_SHA256, InputRecord, MergeRecord
from merger.methods import liti_weights, simplex
from merger.writer import PlannedTensor, ShardPlan, plan_shards

# Input path -> file name -> SHA-256, as FileHashes computes them.
InputHashes = dict[Path, dict[str, str]]


@dataclass(frozen=True)
class MergePlan:
    """A validated merge: members in canonical order, output tensors and shards."""

    spec: MergeSpec
    members: tuple[Checkpoint, ...]
    raw_weights: tuple[float, ...]  # as given (uniform: 1.0), aligned with members
    init: Checkpoint | None
    shards: tuple[ShardPlan, ...]

    @property
    def tensors(self) -> tuple[PlannedTensor, ...]:
        """Every output tensor, shard by shard in disk order."""
        return tuple(t for s in self.shards for t in s.tensors)

    @property
    def inputs(self) -> tuple[Checkpoint, ...]:
        """Every input: the members, then init if there is one."""
        return (*self.members, *([self.init] if self.init is not None else []))

    def positive_members(self) -> list[tuple[Checkpoint, float]]:
        """Members with a positive raw weight, in canonical order (zero weights are not read)."""
        return [(m, w) for m, w in zip(self.members, self.raw_weights, strict=True) if w > 0]

    def sources(self) -> list[tuple[Checkpoint, float]]:
        """The (input, raw weight) terms a floating tensor is read from, in summation order:
        for an average the members (LITI: init first, folded in by `liti_weights`); for
        SLERP, init then the members."""
        members = self.positive_members()
        if self.spec.method is Method.slerp:
            assert self.init is not None
            return [(self.init, 1.0), *members]
        if self.spec.liti is not None:
            assert self.init is not None
            init_w, member_w = liti_weights([w for _, w in members], self.spec.liti)
            head = [(self.init, init_w)] if init_w > 0 else []
            return head + [(m, w) for (m, _), w in zip(members, member_w, strict=True)]
        return members

    @property
    def bytes_to_read(self) -> int:
        """Tensor bytes read from the inputs."""
        return sum(ckpt.nbytes for ckpt, _ in self.sources())

    @property
    def bytes_to_write(self) -> int:
        """Tensor bytes written to the artifact."""
        return sum(s.nbytes for s in self.shards)


def plan_merge(spec: MergeSpec) -> MergePlan:
    """Open and check every input; fix the canonical order and the output layout."""
    opened = [open_checkpoint(p) for p in spec.inputs]
    # Canonical order: the result never depends on the order of the command-line arguments.
    raw = spec.weights or (1.0,) * len(opened)
    order = sorted(range(len(opened)), key=lambda i: (str(opened[i].path), raw[i]))
    members = tuple(opened[i] for i in order)
    raw_weights = tuple(raw[i] for i in order)
    init = open_checkpoint(spec.init) if spec.init is not None else None
    check_compatible(
        list(members),
        init,
        allow_multi_head=spec.allow_multi_head,
        ignore_config_keys=frozenset(spec.ignore_config_keys),
    )
    override = OUTPUT_DTYPES[spec.dtype] if spec.dtype is not None else None
    planned = [
        PlannedTensor(t.name, override if override and t.dtype in FLOATING else t.dtype, t.shape)
        for t in members[0].tensors.values()
    ]
    shards = tuple(plan_shards(planned, spec.max_shard_size))
    return MergePlan(spec, members, raw_weights, init, shards)


def provenance(plan: MergePlan, hashes: InputHashes | None) -> MergeRecord:
    """The merge record of `plan`'s artifact; `hashes` None: a draft of the same size, with
    placeholder digests (written first, while the inputs are still being hashed)."""

    def files(ckpt: Checkpoint) -> dict[str, str]:
        if hashes is None:
            return {f.name: PLACEHOLDER_SHA256 for f in ckpt.files}
        return hashes[ckpt.path]

    weights = simplex(plan.raw_weights)
    inputs = [
        InputRecord(path=str(m.path), weight=w, files=files(m))
        for m, w in zip(plan.members, weights, strict=True)
    ]
    init = None
    if plan.init is not None:
        init_weight = 0.0 if plan.spec.liti is None else 1.0 - plan.spec.liti
        init = InputRecord(path=str(plan.init.path), weight=init_weight, files=files(plan.init))
    floating = sorted({t.dtype for t in plan.tensors if t.dtype in FLOATING})
    spec = plan.spec.model_dump(mode="json", exclude={"inputs", "init"})
    if plan.spec.weights is not None:
        spec["weights"] = list(plan.raw_weights)  # canonical order, like the inputs
    return MergeRecord(
        tool_version=__version__,
        method=plan.spec.method.value,
        weights=list(weights),
        inputs=inputs,
        init=init,
        liti=plan.spec.liti,
        output_dtype=",".join(CONFIG_DTYPE_NAMES.get(d, d) for d in floating),
        config=spec,
    )


def output_config(plan: MergePlan) -> bytes | None:
    """The artifact's config.json: the first member's, with the output dtype when one was
    asked for (None: the inputs have no config)."""
    config = plan.members[0].config
    if config is None:
        return None
    config = {k: v for k, v in config.items() if k != "_name_or_path"}
    if plan.spec.dtype is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        for key in keys:
            config[key] = plan.spec.dtype
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
