"""Fit configuration: one dataclass, read from the ``encoder:`` section of a YAML preset."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


@dataclass
class FitConfig:
    """Every knob of the fit. The defaults are the first tuned 1000-strokes-at-512 schedule, with no
    joint refinement (opt-in, so small configs stay small); configs/default.yaml is the current default."""

    strokes: int = 1000          # strokes per image
    size: int = 512              # side of the square target (short side resized, centre-cropped)
    group_size: int = 100        # strokes optimised together, then frozen
    steps: int = 200             # optimiser steps per group
    # Progressive resolution: [scale, share of groups] pairs, coarse first. The
    # groups of each stage are fitted on the target area-averaged to scale * size.
    # An optional third number is that stage's steps per group (default: steps).
    stages: list = field(default_factory=lambda: [[0.25, 0.2], [0.5, 0.3], [1.0, 0.5]])
    loss: str = "l2"             # l2 | l1 | prefix_l1 (the seed's mean-over-prefixes L1)
    lr: float = 0.005
    betas: tuple = (0.8, 0.9)
    lr_decay: float = 0.0        # each group's lr falls linearly to (1 - lr_decay) * lr over its steps
    lr_scale: dict = field(default_factory=dict)  # per-field lr multipliers, e.g. {alpha: 2.0}
    # Initial values of new strokes; position and colour come from the error map.
    init_mu_r: float = 0.1
    init_sigma_r: float = 0.1
    init_sigma_t: float = 0.1
    init_alpha: float = 0.01
    # Joint refinement after the groups: [scale, steps] pairs, run in order, each
    # optimising all strokes (and the background) together at scale * size. Frozen
    # groups cannot correct each other; a joint pass can. An image keeps its
    # refined painting only where that lowers its full-size error. Empty: no refinement.
    refine: list = field(default_factory=list)
    refine_lr: float = 0.001
    refine_lr_scale: dict = field(default_factory=dict)  # per-field multipliers of refine_lr
    refine_betas: tuple = (0.8, 0.9)
    refine_lr_decay: float = 0.0  # as lr_decay, over each refinement stage
    # Joint refinement steps at the end of every stage but the last, at that stage's resolution.
    stage_refine: int = 0
    refine_replace: bool = True   # re-place the strokes of rejected groups where the error is, before refining
    placement: str = "power"      # power: p ~ error ** placement_power; softmax: p ~ exp(error) (the seed's)
    placement_power: float = 2.0
    background: str = "mean"      # initial background: mean colour of the target, or black (the seed's)
    fit_background: bool = True   # fit the background colour with the first group
    backend: str = "auto"         # auto | triton | reference
    cuda_graphs: bool = True      # replay each group's step loop as a CUDA graph (triton backend only)
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strokes < 1 or self.group_size < 1:
            raise ValueError("strokes and group_size must be positive")
        if self.size < 8:
            raise ValueError(f"size must be at least 8 pixels, got {self.size}")
        if self.loss not in ("l2", "l1", "prefix_l1"):
            raise ValueError(f"loss must be l2, l1 or prefix_l1, got {self.loss!r}")
        if self.placement not in ("power", "softmax"):
            raise ValueError(f"placement must be power or softmax, got {self.placement!r}")
        if self.background not in ("mean", "black"):
            raise ValueError(f"background must be mean or black, got {self.background!r}")
        if self.backend not in ("auto", "triton", "reference"):
            raise ValueError(f"backend must be auto, triton or reference, got {self.backend!r}")
        if not self.stages or any(len(s) not in (2, 3) or not 0 < s[0] <= 1 or s[1] < 0 for s in self.stages):
            raise ValueError(f"stages must be [scale in (0, 1], share >= 0(, steps)] lists, got {self.stages}")
        if any(len(s) == 3 and (int(s[2]) != s[2] or s[2] < 1) for s in self.stages):
            raise ValueError(f"a stage's third number (steps per group) must be a positive integer, got {self.stages}")
        if any(len(s) != 2 or not 0 < s[0] <= 1 or int(s[1]) != s[1] or s[1] < 0 for s in self.refine):
            raise ValueError(f"refine must be [scale in (0, 1], steps >= 0] pairs, got {self.refine}")
        if self.steps < 0 or self.refine_lr <= 0 or self.stage_refine < 0:
            raise ValueError("steps and stage_refine must be >= 0 and refine_lr positive")
        if not (0 <= self.lr_decay <= 1 and 0 <= self.refine_lr_decay <= 1):
            raise ValueError("lr_decay and refine_lr_decay must be in [0, 1]")
        self.betas = tuple(self.betas)
        self.refine_betas = tuple(self.refine_betas)

    @property
    def groups(self) -> int:
        return -(-self.strokes // self.group_size)

    def group_resolutions(self) -> list[int]:
        """Resolution at which each group is fitted, coarse to fine; the last is ``size``."""
        out: list[int] = []
        for stage, count in zip(self.stages, self._stage_counts()):
            out += [max(8, round(stage[0] * self.size))] * count
        return out

    def _stage_counts(self) -> list[int]:
        """Groups in each stage, in proportion to the stages' shares."""
        shares = [s[1] for s in self.stages]
        total = sum(shares) or 1.0
        counts = [round(share / total * self.groups) for share in shares]
        counts[-1] = self.groups - sum(counts[:-1])
        while counts[-1] < 0:  # rounding took too many groups: give them back from the front
            i = next(i for i, c in enumerate(counts[:-1]) if c > 0)
            counts[i] -= 1
            counts[-1] += 1
        return counts

    def group_steps(self) -> list[int]:
        """Optimiser steps for each group: its stage's third number, else ``steps``."""
        out: list[int] = []
        for (_scale, _share, *steps), count in zip(self.stages, self._stage_counts()):
            out += [int(steps[0]) if steps else self.steps] * count
        return out

    def group_sizes(self) -> list[int]:
        """Strokes in each group (the last may be smaller)."""
        full, rest = divmod(self.strokes, self.group_size)
        return [self.group_size] * full + ([rest] if rest else [])


def load_config(path: str | Path | None = None, **overrides) -> FitConfig:
    """Read the ``encoder:`` section of a YAML preset, then apply ``overrides``.

    ``path=None`` reads configs/default.yaml when it exists. Overrides whose
    value is None are ignored, so command-line flags can be passed straight in.
    """
    values: dict = {}
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such config file")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at top level")
        values.update(data.get("encoder") or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(FitConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown encoder config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return FitConfig(**values)
