"""Fit configuration: one dataclass, read from the ``encoder:`` section of a YAML preset.

A preset is one YAML document with an ``encoder:`` section (read here) and a
``pipeline:`` section (read by the pipeline through ``read_preset``). The
presets live in ``configs/`` at the top of the checkout, where a user looks for
the settings to edit; a wheel installs that folder as ``encoder/presets`` (see
pyproject.toml), so an installed copy finds them by name too. ``read_preset`` is
the one place YAML is parsed, for a preset name (``cpu_small``) or a path alike.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .strokes import FIELDS


def _preset_dir() -> Path:
    """An installed copy's ``encoder/presets``, else the checkout's ``configs/``."""
    here = Path(__file__).resolve().parent
    installed = here / "presets"
    # A leftover folder (a __pycache__ of the old layout) is not the presets: look for a preset.
    return installed if (installed / "default.yaml").is_file() else here.parent / "configs"


PRESET_DIR = _preset_dir()
DEFAULT_PRESET = "default"


def preset_names() -> list[str]:
    """Names of the presets that ship with the package (``default``, ``cpu_small``, ...)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name_or_path: str | Path | None) -> Path:
    """A preset name or a YAML path -> the file. None is the default preset.

    A bare word (no slash, no .yaml suffix) names a packaged preset; anything
    else is a path, so a user's own ``my.yaml`` is never shadowed by a preset.
    """
    if name_or_path is None:
        name_or_path = DEFAULT_PRESET
    text = str(name_or_path)
    if "/" not in text and "\\" not in text and not text.endswith((".yaml", ".yml")):
        path = PRESET_DIR / f"{text}.yaml"
        if not path.is_file():
            raise ValueError(f"no preset named {text!r}; presets: {', '.join(preset_names())} (or give a YAML path)")
        return path
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueError(f"{path}: no such config file")
    return path


def read_preset(name_or_path: str | Path | None = None) -> dict:
    """The whole YAML document of a preset or config file, checked to be a mapping of sections."""
    path = preset_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if data is None:
        # An empty file is a mistake (a truncated copy, the wrong path), not "all defaults": say so.
        raise ValueError(f"{path}: the config is empty; start from a copy of one in configs/ (e.g. configs/default.yaml)")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping with 'encoder:' and 'pipeline:' sections")
    unknown = sorted(set(data) - {"encoder", "pipeline"})
    if unknown:
        raise ValueError(f"{path}: unknown sections {unknown}; a config has 'encoder:' and 'pipeline:'")
    for section in ("encoder", "pipeline"):
        if data.get(section) is not None and not isinstance(data[section], dict):
            raise ValueError(f"{path}: '{section}:' must be a mapping")
    return data


def parse_overrides(items: list[str]) -> dict:
    """``["steps=50", "stages=[[1.0, 1]]"]`` -> ``{"steps": 50, "stages": [[1.0, 1]]}``: values read as YAML scalars."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"{key}: {value!r} is not a valid value") from None
    return out


def check_field_types(config, section: str) -> None:
    """Raise ValueError naming the first field of a dataclass whose value is not of its annotated type.

    YAML and ``--set`` hand over strings, floats and lists freely; a wrong type
    caught here is one clear line instead of a traceback deep in a worker.
    Ints are accepted where floats are expected; bools are never taken for numbers.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _is_instance(value, hints[f.name]):
            raise ValueError(f"{section}.{f.name} must be {_type_name(hints[f.name])}, got {value!r}")


def _is_instance(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is not None:
        hint = origin
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    if hint is tuple:
        return isinstance(value, (tuple, list))
    return isinstance(value, hint)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_stage(stage) -> bool:
    """[scale, share] or [scale, share, steps per group]."""
    return (isinstance(stage, (list, tuple)) and len(stage) in (2, 3) and all(_is_number(v) for v in stage)
            and 0 < stage[0] <= 1 and stage[1] >= 0 and (len(stage) == 2 or (int(stage[2]) == stage[2] >= 1)))


def _is_refine_stage(stage) -> bool:
    """[scale, steps]."""
    return (isinstance(stage, (list, tuple)) and len(stage) == 2 and all(_is_number(v) for v in stage)
            and 0 < stage[0] <= 1 and int(stage[1]) == stage[1] >= 0)


def _type_name(hint) -> str:
    args = typing.get_args(hint)
    if args:
        return " or ".join(_type_name(a) for a in args)
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


@dataclass
class FitConfig:
    """Every knob of the fit. The defaults are the default preset's (configs/default.yaml, a test keeps
    them equal), so ``FitConfig()`` and ``load_config()`` fit alike."""

    strokes: int = 1000          # strokes per image
    size: int = 512              # side of the square target (short side resized, centre-cropped)
    group_size: int = 100        # strokes optimised together, then frozen
    steps: int = 125             # optimiser steps per group
    # Progressive resolution: [scale, share of groups] pairs, coarse first. The
    # groups of each stage are fitted on the target area-averaged to scale * size.
    # An optional third number is that stage's steps per group (default: steps).
    stages: list = field(default_factory=lambda: [[0.25, 0.3], [0.5, 0.4], [1.0, 0.3, 75]])
    loss: str = "l2"             # l2 | l1 | prefix_l1 (the seed's mean-over-prefixes L1)
    lr: float = 0.01
    betas: tuple = (0.8, 0.9)
    # per-field lr multipliers, e.g. {alpha: 2.0}
    lr_scale: dict = field(default_factory=lambda: {"cx": 0.3, "cy": 0.3, "alpha": 2.0})
    # Initial values of new strokes; position and colour come from the error map.
    init_mu_r: float = 0.1
    init_sigma_r: float = 0.1
    init_sigma_t: float = 0.1
    init_alpha: float = 0.01
    # Joint refinement after the groups: [scale, steps] pairs, run in order, each
    # optimising all strokes (and the background) together at scale * size. Frozen
    # groups cannot correct each other; a joint pass can. An image keeps its
    # refined painting only where that lowers its full-size error. Empty: no refinement.
    refine: list = field(default_factory=lambda: [[0.5, 210], [1.0, 100]])
    refine_lr: float = 0.003
    # per-field multipliers of refine_lr
    refine_lr_scale: dict = field(default_factory=lambda: {"cx": 0.5, "cy": 0.5, "r": 2.0, "g": 2.0, "b": 2.0,
                                                           "alpha": 3.0})
    refine_betas: tuple = (0.8, 0.9)
    refine_lr_decay: float = 0.9  # the lr falls linearly to (1 - refine_lr_decay) * refine_lr over each stage
    refine_replace: bool = True   # re-place the strokes of rejected groups where the error is, before refining
    # The opacity below which the renderer of a gradient step skips a stroke on a tile (Triton backend).
    # Culling changes a pixel by at most the sum of the skipped strokes' opacities there, each below
    # this. Every commit and reported PSNR is rendered at the exact threshold (triton_render.CULL_OPACITY,
    # 1e-7), so a coarser value here trades gradient tails for shorter tile lists, never a false PSNR.
    step_cull_opacity: float = 0.002
    # A gradient step lists each tile's strokes (Triton backend, binned launches) every this many steps
    # and keeps the lists in between: strokes move a fraction of a pixel a step, and a listing costs
    # about a tenth of a step. A kept list is exact for the strokes it holds (their current parameters);
    # a stroke that has since reached a new tile is skipped there until the next listing, as culling skips
    # it. Commits and reported PSNRs list afresh. 1: every step lists ("Twice the speed, round 3" in
    # benchmarks/RESULTS.md).
    step_bin_interval: int = 4
    placement: str = "power"      # power: p ~ error ** placement_power; softmax: p ~ exp(error) (the seed's)
    placement_power: float = 2.0
    background: str = "mean"      # initial background: mean colour of the target, or black (the seed's)
    fit_background: bool = True   # fit the background colour with the first group
    backend: str = "auto"         # auto | triton | reference
    cuda_graphs: bool = True      # replay each group's step loop as a CUDA graph (triton backend only)
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    seed: int = 0

    def __post_init__(self) -> None:
        check_field_types(self, "encoder")
        if self.strokes < 1 or self.group_size < 1 or self.steps < 1:
            raise ValueError("encoder.strokes, group_size and steps must be positive")
        if not self.lr > 0 or not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise ValueError(f"encoder.lr must be > 0 and betas two values in [0, 1), got {self.lr}, {self.betas}")
        if self.device not in ("auto", "cpu", "cuda") and not (self.device.startswith("cuda:")
                                                                and self.device[5:].isdigit()):
            raise ValueError(f"encoder.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.size < 8:
            raise ValueError(f"encoder.size must be at least 8 pixels, got {self.size}")
        if self.loss not in ("l2", "l1", "prefix_l1"):
            raise ValueError(f"encoder.loss must be l2, l1 or prefix_l1, got {self.loss!r}")
        if self.placement not in ("power", "softmax"):
            raise ValueError(f"encoder.placement must be power or softmax, got {self.placement!r}")
        if self.background not in ("mean", "black"):
            raise ValueError(f"encoder.background must be mean or black, got {self.background!r}")
        if self.backend not in ("auto", "triton", "reference"):
            raise ValueError(f"encoder.backend must be auto, triton or reference, got {self.backend!r}")
        if not self.stages or not all(_is_stage(s) for s in self.stages):
            raise ValueError(f"encoder.stages must be [scale in (0, 1], share >= 0(, steps >= 1)] lists, got {self.stages}")
        if not all(_is_refine_stage(s) for s in self.refine):
            raise ValueError(f"encoder.refine must be [scale in (0, 1], steps >= 0] pairs, got {self.refine}")
        positive = ("init_mu_r", "init_sigma_r", "init_sigma_t", "init_alpha", "placement_power", "refine_lr")
        if not all(getattr(self, name) > 0 for name in positive):
            raise ValueError(f"encoder.{', '.join(positive)} must be > 0")
        for name in ("lr_scale", "refine_lr_scale"):
            if not all(isinstance(k, str) and _is_number(v) and v >= 0 for k, v in getattr(self, name).items()):
                raise ValueError(f"encoder.{name} must map field names to numbers >= 0, got {getattr(self, name)}")
            unknown = sorted(set(getattr(self, name)) - set(FIELDS))
            if unknown:
                raise ValueError(f"encoder.{name} names unknown fields {unknown}; fields are {', '.join(FIELDS)}")
        if not 0 < self.step_cull_opacity < 1:
            raise ValueError(f"encoder.step_cull_opacity must be in (0, 1), got {self.step_cull_opacity}")
        if not isinstance(self.step_bin_interval, int) or self.step_bin_interval < 1:
            raise ValueError(f"encoder.step_bin_interval must be an integer >= 1, got {self.step_bin_interval!r}")
        if not 0 <= self.refine_lr_decay <= 1:
            raise ValueError(f"encoder.refine_lr_decay must be in [0, 1], got {self.refine_lr_decay}")
        if len(self.refine_betas) != 2 or not all(0 <= b < 1 for b in self.refine_betas):
            raise ValueError(f"encoder.refine_betas must be two values in [0, 1), got {self.refine_betas}")
        self.betas = tuple(self.betas)
        self.refine_betas = tuple(self.refine_betas)

    @property
    def groups(self) -> int:
        return -(-self.strokes // self.group_size)

    def resolution(self, scale: float, size: int | None = None) -> int:
        """Side of a stage fitted at ``scale`` of ``size`` pixels (default: the config's), 8 to ``size``:
        the one rule for groups and joint passes alike."""
        size = self.size if size is None else size
        return min(size, max(8, round(scale * size)))

    def group_schedule(self, size: int | None = None) -> list[tuple[int, int, int]]:
        """(strokes, resolution, steps) of each group, coarse to fine: its stage's scale of ``size``
        (default: the config's) and its stage's steps (default: ``steps``). The last group may be smaller."""
        full, rest = divmod(self.strokes, self.group_size)
        sizes = [self.group_size] * full + ([rest] if rest else [])
        stages = [(self.resolution(scale, size), int(steps[0]) if steps else self.steps)
                  for (scale, _share, *steps), count in zip(self.stages, self._stage_counts()) for _ in range(count)]
        return [(n, res, steps) for n, (res, steps) in zip(sizes, stages)]

    def joint_schedule(self, size: int | None = None) -> list[tuple[int, int]]:
        """(resolution, steps) of each stage of the joint refinement that has steps."""
        return [(self.resolution(scale, size), int(steps)) for scale, steps in self.refine if steps > 0]

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


def load_config(preset: str | Path | None = None, **overrides) -> FitConfig:
    """Read the ``encoder:`` section of a preset (a name such as ``cpu_small``, or a YAML path), then apply ``overrides``.

    ``preset=None`` is the default preset. Overrides whose value is None are
    ignored, so command-line flags can be passed straight in.
    """
    values: dict = dict(read_preset(preset).get("encoder") or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(FitConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown encoder config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return FitConfig(**values)
