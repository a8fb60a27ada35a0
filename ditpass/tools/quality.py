"""Quality of lossy passes on the built-in digits model: classifier accuracy and pixel deviation.

Every lossy pass (PipeFusion with few warm-up steps, DiTFastAttn, step caching) reports these two
figures beside its speed:

    ref = digits.generate(labels, seed=0, pipe=plain_pipe, output_type="np")
    out = digits.generate(labels, seed=0, pipe=lossy_pipe, output_type="np")
    digits_quality(out, labels, reference=ref)
    # {'n': 20, 'accuracy': 0.95, 'reference_accuracy': 1.0, 'pixel_mean_abs': 0.012, 'pixel_max_abs': 0.31}

``accuracy``: the share of images that an SVC trained on scikit-learn's real 8x8 digits labels as the
class asked for (the images are mapped back to 8x8 by `ditpass.models.digits.downscale`, as
``models/DIGITS.md`` describes; the shipped weights score 97/100 unmodified). ``pixel_*``: absolute
deviation from the reference images in [0, 1] pixel units, averaged over all pixels and the worst one.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["digit_classifier", "digits_quality", "balanced_labels", "quiet_pipeline", "digits_reference"]


@lru_cache(maxsize=1)
def digit_classifier():
    """An SVC on scikit-learn's 1,797 real digits (what `models/train_digits.py` evaluates with)."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    data = load_digits()
    return SVC(gamma=0.001).fit(data.data, data.target)


def balanced_labels(per_class: int) -> list[int]:
    """``per_class`` of each digit 0..9, interleaved (0, 1, ..., 9, 0, 1, ...)."""
    return [c for _ in range(per_class) for c in range(10)]


def _as_np(images) -> np.ndarray:
    if hasattr(images, "detach"):  # "pt" output: (N, 1, 32, 32)
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    return np.asarray(images, dtype=np.float32)


def digits_quality(images, labels, reference=None) -> dict:
    """Accuracy of ``images`` (``output_type="np"`` or ``"pt"``) for ``labels``; deviation from ``reference``."""
    from ditpass.models import digits

    imgs = _as_np(images)
    labels = np.asarray([int(v) for v in labels])
    if len(imgs) != len(labels):
        raise ValueError(f"{len(imgs)} images for {len(labels)} labels")
    clf = digit_classifier()
    out = {"n": int(len(labels)),
           "accuracy": float((clf.predict(digits.downscale(imgs).numpy()) == labels).mean())}
    if reference is not None:
        ref = _as_np(reference)
        if ref.shape != imgs.shape:
            raise ValueError(f"reference images {ref.shape} vs images {imgs.shape}")
        out["reference_accuracy"] = float((clf.predict(digits.downscale(ref).numpy()) == labels).mean())
        dev = np.abs(imgs - ref)
        out["pixel_mean_abs"] = float(dev.mean())
        out["pixel_max_abs"] = float(dev.max())
    return out


def quiet_pipeline():
    """A fresh digits pipeline (each lossy plan parallelizes its own) without a progress bar."""
    from ditpass.models import digits

    pipe = digits.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def digits_reference(per_class: int) -> tuple[list[int], object, float, int]:
    """``(labels, single-device images, seconds they took, steps)``: what a quality table compares with
    (``per_class`` of each digit, seed 0, the model's default steps and guidance)."""
    import time

    from ditpass.models import digits

    labels = balanced_labels(per_class)
    t = time.perf_counter()
    ref = digits.generate(labels, seed=0, pipe=quiet_pipeline(), output_type="np")
    return labels, ref, time.perf_counter() - t, digits.defaults()["num_inference_steps"]

