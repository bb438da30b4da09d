"""Stroke layout, clamps, validation and the seed checkpoint import."""
import math

import pytest
import torch

from conftest import DATA
from encoder.images import load_image, psnr
from encoder.reference import render
from encoder.strokes import CX, ROT, StrokeError, bounds, clamp_, load_seed_checkpoint, random_strokes, validate


def test_clamp_puts_everything_in_range_and_wraps_rotation():
    s = torch.randn(4, 30, 10) * 10
    s[0, 0, ROT] = 3 * math.pi / 2
    clamp_(s, aspect=1.5)
    lo, hi = bounds(1.5)
    assert torch.all(s >= lo) and torch.all(s <= hi)
    assert math.isclose(s[0, 0, ROT].item(), -math.pi / 2, abs_tol=1e-5)
    validate(s, 1.5)


def test_validate_names_the_problem():
    s = random_strokes(1, 4)
    validate(s)
    bad = s.clone()
    bad[0, 2, 3] = float("nan")
    with pytest.raises(StrokeError, match="NaN"):
        validate(bad)
    bad = s.clone()
    bad[0, 1, CX] = 5.0
    with pytest.raises(StrokeError, match="cx out of range"):
        validate(bad)
    with pytest.raises(StrokeError, match="shape"):
        validate(torch.rand(3, 9))


def test_seed_checkpoint_reproduces_the_seed_painting():
    strokes, aspect = load_seed_checkpoint(DATA / "lisa_5_50_300.pt")
    assert strokes.shape == (250, 10) and aspect == 1.0
    canvas = render(strokes[None], torch.zeros(1, 3), 512, 512)
    target = load_image(DATA / "lisa.jpg", 512)
    assert abs(psnr(canvas, target[None]).item() - 25.4) < 0.1


def test_seed_checkpoint_errors(tmp_path):
    with pytest.raises(StrokeError, match="no such stroke file"):
        load_seed_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(StrokeError, match="not a readable seed checkpoint"):
        load_seed_checkpoint(tmp_path / "junk.pt")
    torch.save({"center_x": torch.zeros(3, 1)}, tmp_path / "partial.pt")
    with pytest.raises(StrokeError, match="lacks"):
        load_seed_checkpoint(tmp_path / "partial.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(StrokeError, match="expected a dict"):
        load_seed_checkpoint(tmp_path / "list.pt")
