"""A yardstick for the stroke budget: PSNR of the best K-term DCT approximation of each photo.

    python benchmarks/dct_budget.py --photos lisa astronaut grass camera coffee

1000 strokes are 10,000 numbers. Keeping the K largest of each colour plane's
512 x 512 orthonormal DCT coefficients (K = 3,334 per plane: 10,000 numbers,
their positions for free) is a generous linear code of the same size; K =
10,000 per plane is three times the numbers. Where the strokes already beat
the first, a photo's remaining error is detail that no small code holds. CPU only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.fft import dctn, idctn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder.images import center_crop_resize, pil_to_tensor  # noqa: E402
from photos import load_photo  # noqa: E402


def best_terms_psnr(image: np.ndarray, k: int) -> float:
    """PSNR of ``image [3, H, W]`` in [0, 1] rebuilt from the k largest DCT coefficients of each plane."""
    rebuilt = np.empty_like(image)
    for c in range(image.shape[0]):
        coef = dctn(image[c], norm="ortho")
        cut = np.partition(np.abs(coef).ravel(), -k)[-k]
        rebuilt[c] = idctn(np.where(np.abs(coef) >= cut, coef, 0.0), norm="ortho")
    return float(10 * np.log10(1.0 / np.mean((rebuilt - image) ** 2)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", nargs="+", default=["lisa", "astronaut", "grass", "camera", "coffee"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--terms", nargs="+", type=int, default=[3334, 10000], help="coefficients kept per colour plane")
    args = ap.parse_args()
    print(f"{'photo':>12s} " + " ".join(f"{f'K={k}':>9s}" for k in args.terms))
    for name in args.photos:
        image = pil_to_tensor(center_crop_resize(load_photo(name), args.size)).numpy().astype(np.float64)
        print(f"{name:>12s} " + " ".join(f"{best_terms_psnr(image, k):9.2f}" for k in args.terms))


if __name__ == "__main__":
    main()
