"""Tensor-by-tensor comparison of two merged HF directories, in units in the last place.

A float's bit pattern, read as a sign-magnitude integer and mapped onto a two's-complement
line (negative values to -magnitude), orders floats monotonically, with +0 and -0 both at 0;
the distance between two mapped integers is their distance in ulps, across signs too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@dataclass
class Comparison:
    """Differences between our merge, the reference merge and the exact (fp64) average."""

    max_ulp: int = 0  # ours vs the reference, the headline figure
    worst_tensor: str = ""
    elements_over_1ulp: int = 0
    elements: int = 0
    ours_vs_exact_ulp: int = 0  # vs the fp64 average, correctly rounded to the dtype
    reference_vs_exact_ulp: int = 0
    missing_in_reference: list[str] = field(default_factory=list)  # the reference skipped
    extra_in_reference: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    dtype_mismatch: list[str] = field(default_factory=list)
    integer_mismatch: list[str] = field(default_factory=list)  # e.g. position_ids buffers


def tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for a single or sharded HF dir."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    out: dict[str, Path] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), path))
    return out


def _ordered(t: torch.Tensor) -> torch.Tensor:
    bits = _INT_VIEW[t.dtype]
    i = t.contiguous().view(bits).to(torch.int64)
    return torch.where(i < 0, torch.iinfo(bits).min - i, i)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in ulps between matching elements of two same-dtype float tensors."""
    if a.numel() == 0:
        return 0
    return int((_ordered(a) - _ordered(b)).abs().max())


def _load(files: dict[str, Path], name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(files[name], framework="pt") as f:
        tensor: torch.Tensor = f.get_tensor(name)
    return tensor


def _exact_mean(members: list[dict[str, Path]], name: str, dtype: torch.dtype) -> torch.Tensor:
    acc: torch.Tensor | None = None
    for files in members:
        t = _load(files, name).to(torch.float64)
        acc = t if acc is None else acc.add_(t)
    assert acc is not None
    return round_once(acc.div_(len(members)), dtype)


def round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp64 x rounded to nearest (ties to even) in dtype; torch's cast to bf16 and fp16
    goes through fp32 and can round twice, so its neighbours are checked too."""
    best = x.to(dtype)
    if dtype == torch.float32:
        return best
    err = (best.to(torch.float64) - x).abs()
    for target in (float("inf"), float("-inf")):
        cand = torch.nextafter(best, torch.full_like(best, target))
        cand_err = (cand.to(torch.float64) - x).abs()
        even = cand.view(_INT_VIEW[dtype]) % 2 == 0
        better = (cand_err < err) | ((cand_err == err) & even)
        best, err = torch.where(better, cand, best), torch.where(better, cand_err, err)
    return best


def compare_dirs(ours: Path, reference: Path, members: list[Path]) -> Comparison:
    """Compare our uniform average with the reference's and with the exact fp64 average."""
    mine, theirs = tensor_files(ours), tensor_files(reference)
    inputs = [tensor_files(m) for m in members]
    result = Comparison(
        missing_in_reference=sorted(set(mine) - set(theirs)),
        extra_in_reference=sorted(set(theirs) - set(mine)),
    )
    for name in sorted(set(mine) & set(theirs)):
        a, b = _load(mine, name), _load(theirs, name)
        if a.shape != b.shape:
            result.shape_mismatch.append(f"{name}: {tuple(a.shape)} vs {tuple(b.shape)}")
            continue
        if a.dtype != b.dtype:
            result.dtype_mismatch.append(f"{name}: {a.dtype} vs {b.dtype}")
            b = b.to(a.dtype)
        if a.dtype not in _INT_VIEW:
            if not torch.equal(a, b):
                result.integer_mismatch.append(name)
            continue
        diff = (_ordered(a) - _ordered(b)).abs()
        result.elements += diff.numel()
        result.elements_over_1ulp += int((diff > 1).sum())
        d = int(diff.max()) if diff.numel() else 0
        if d > result.max_ulp:
            result.max_ulp, result.worst_tensor = d, name
        exact = _exact_mean(inputs, name, a.dtype)
        result.ours_vs_exact_ulp = max(result.ours_vs_exact_ulp, ulp_distance(a, exact))
        result.reference_vs_exact_ulp = max(result.reference_vs_exact_ulp, ulp_distance(b, exact))
    return result
