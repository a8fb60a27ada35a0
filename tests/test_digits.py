"""The built-in digits model: weights load, diffusers' DiTPipeline runs it unchanged, and the digits it
draws are recognisable (an SVC trained on scikit-learn's real digits names >= 90% of them right)."""
import inspect
import os

import numpy as np
import pytest
import torch

from ditpass.models import digits


@pytest.fixture
def one_thread():
    # A handful of small ops per step: one thread is as fast and does not fight other processes for cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipe():
    p = digits.load_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def test_weights_small_and_configs_consistent():
    files = [digits.CONFIG_FILE, digits.TRANSFORMER_FILE, digits.VAE_FILE]
    assert all(os.path.exists(f) for f in files)
    assert sum(os.path.getsize(f) for f in files) < 20e6
    cfg = digits.read_config()
    t, v = cfg["transformer"], cfg["vae"]
    # DiTPipeline hard-codes 1000 as the CFG null label: the label table must have that row.
    assert t["num_embeds_ada_norm"] == 1000
    assert t["in_channels"] == v["latent_channels"]
    down = 2 ** (len(v["block_out_channels"]) - 1)
    assert t["sample_size"] * down == v["sample_size"] == digits.IMAGE_SIZE
    assert (t["sample_size"] // t["patch_size"]) ** 2 >= 64  # tokens to split over ranks
    assert t["num_attention_heads"] % 2 == 0


def test_pipeline_loads_and_runs(pipe, one_thread):
    from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

    assert type(pipe) is DiTPipeline
    assert type(pipe.transformer) is DiTTransformer2DModel and type(pipe.vae) is AutoencoderKL
    assert "pipelines/dit/pipeline_dit.py" in inspect.getsourcefile(inspect.unwrap(type(pipe).__call__)).replace(os.sep, "/")
    assert pipe.get_label_ids(["3"]) == [3]
    assert pipe.get_label_ids([str(i) for i in range(10)]) == list(range(10))
    assert sorted(pipe.labels) == [str(i) for i in range(10)]
    # unused label rows are zero; the null row (1000) and the 10 classes are trained
    table = pipe.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert table.shape[0] == 1001
    assert table[10:1000].abs().max() == 0 and table[1000].abs().max() > 0
    out = pipe(class_labels=[3, 7], num_inference_steps=4, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 2 and out.images[0].size == (32, 32)
    a = digits.generate(["3", 7], seed=1, steps=4, pipe=pipe, output_type="np")
    b = digits.generate([3, "7"], seed=1, steps=4, pipe=pipe, output_type="np")
    assert a.shape == (2, 32, 32, 1) and np.array_equal(a, b)
    # the same seed is the same picture; no guidance (guidance_scale=1) also runs
    c = pipe(class_labels=[5], num_inference_steps=3, guidance_scale=1.0, output_type="np",
             generator=torch.Generator().manual_seed(0)).images
    assert c.shape == (1, 32, 32, 1) and np.isfinite(c).all()


def test_data_mapping_round_trip():
    from sklearn.datasets import load_digits

    X, _ = load_digits(return_X_y=True)
    img = digits.upscale(X[:50])
    assert img.shape == (50, 1, 32, 32) and img.min() >= -1 and img.max() <= 1
    back = digits.downscale((img / 2 + 0.5).permute(0, 2, 3, 1).numpy())
    assert np.abs(back.numpy() - X[:50]).max() < 1e-4


def test_generated_digits_are_recognisable(pipe, one_thread):
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    X, y = load_digits(return_X_y=True)
    clf = SVC(gamma=0.001).fit(X, y)
    per_class = 5
    labels = [c for _ in range(per_class) for c in range(10)]
    d = digits.defaults()
    imgs = pipe(class_labels=labels, num_inference_steps=d["num_inference_steps"],
                guidance_scale=d["guidance_scale"], generator=torch.Generator().manual_seed(1234),
                output_type="np").images
    pred = clf.predict(digits.downscale(imgs).numpy())
    acc = float((pred == np.array(labels)).mean())
    assert acc >= 0.9, f"classifier accuracy on generated digits {acc:.2f}; predicted {pred.tolist()}"
