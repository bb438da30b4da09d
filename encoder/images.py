"""Image helpers: load, resize-and-centre-crop, tensors <-> PIL, PSNR, downsampling."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class ImageError(ValueError):
    """An image that cannot be read or used."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, P, RGBA, CMYK, I;16, ...) to 8-bit RGB.

    Transparency is composited over white, the usual look of such images on a
    web page; 16-bit greyscale is scaled down rather than clipped.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Resize so the short side is ``size`` (bicubic), then centre-crop to size x size.

    Bicubic matches the preprocessing the seed's checkpoint was fitted on (25.4 dB).
    """
    image = to_rgb(image)
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> ``[3, H, W]`` float32 in [0, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [0, 1] -> 8-bit RGB PIL image."""
    array = (image.detach().float().clamp(0, 1) * 255.0 + 0.5).byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Read an image file and prepare it as a ``[3, size, size]`` target."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
            return pil_to_tensor(center_crop_resize(image, size))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None


def psnr(canvas: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of ``[B, 3, H, W]`` tensors in [0, 1]: ``[B]``."""
    mse = (canvas.float() - target.float()).square().mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """Area-average ``[B, 3, S, S]`` images down to ``size`` x ``size``."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="area")
