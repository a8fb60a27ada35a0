"""Whole pipelines on CPU (gloo): ``ditpass.parallelize(pipe, plan)`` equals the single-process run.

Three diffusers pipelines built from tiny random components (no hub access: the tokenizers are
word-level ones built here, the text encoders and VAE come from configs, the transformers from
the zoo): PixArt-Sigma (T5), Stable Diffusion 3 (2x CLIP + T5, flow matching) and DiT (class
labels). Each runs 3 steps with classifier-free guidance on 2 prompts / class labels, so the
transformer's batch is 4 = [uncond x 2; cond x 2]. Plans: ulysses=2, cfg=2, dp=2 on 2 ranks;
cfg=2 x ulysses=2 and dp=2 x cfg=2 on 4 ranks. Plus a padded batch (3 labels, dp=2), a control
with the gather skipped, and the error cases.

The reference run and every capture the ranks will need (one per local batch size) happen once
in the parent; the ranks are forked from it (the pipeline passed to them as an argument, which fork
does not pickle) and hit the capture cache.
"""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import ditpass
from ditpass.plan import PlanError
from ditpass.runtime import batch as batch_rt
from ditpass.runtime.batch import BatchLayout, split_inputs

from dist_utils import run_distributed

TOL = 1e-4
STEPS = 3
PLANS_2 = [dict(ulysses=2), dict(cfg=2), dict(dp=2)]
PLANS_4 = [dict(cfg=2, ulysses=2), dict(dp=2, cfg=2)]

# ---- tiny pipelines from configs ------------------------------------------------------------

WORDS = ["<pad>", "</s>", "<unk>"] + "a cat dog red blue photo of the on mat".split()


def _tokenizer(max_len: int = 8):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_len)


def _t5(dim: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=dim, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, dropout_rate=0.0)).eval()


def _clip(hidden: int = 16, proj: int = 8):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=proj, eos_token_id=2, bos_token_id=0, pad_token_id=0)).eval()


def _vae(**kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=32, **kw).eval()


def _pixart():
    import diffusers
    from ditpass.models import zoo

    return diffusers.PixArtSigmaPipeline(tokenizer=_tokenizer(), text_encoder=_t5(), vae=_vae(),
                                         transformer=zoo.build("PixArtTransformer2DModel"),
                                         scheduler=diffusers.DPMSolverMultistepScheduler())


def _sd3():
    import diffusers
    from ditpass.models import zoo

    return diffusers.StableDiffusion3Pipeline(
        transformer=zoo.build("SD3Transformer2DModel"), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=_vae(shift_factor=0.1, scaling_factor=1.5), text_encoder=_clip(), tokenizer=_tokenizer(),
        text_encoder_2=_clip(), tokenizer_2=_tokenizer(), text_encoder_3=_t5(), tokenizer_3=_tokenizer())


def _dit():
    import diffusers
    from ditpass.models import zoo

    return diffusers.DiTPipeline(transformer=zoo.build("DiTTransformer2DModel"), vae=_vae(),
                                 scheduler=diffusers.DDIMScheduler())


def _digits():
    from ditpass.models import digits

    return digits.load_pipeline()


# name -> (builder, call kwargs); 32x32 px images: 16x16 latents, 64 tokens
PIPES = {
    "PixArtSigmaPipeline": (_pixart, dict(prompt=["a red cat", "blue dog on the mat"], negative_prompt="", height=32,
                                          width=32, use_resolution_binning=False, max_sequence_length=8,
                                          clean_caption=False)),
    "StableDiffusion3Pipeline": (_sd3, dict(prompt=["a red cat", "blue dog on the mat"], height=32, width=32,
                                            max_sequence_length=8)),
    "DiTPipeline": (_dit, dict(class_labels=[1, 7])),
    # the built-in trained model (DiTPipeline with the shipped weights)
    "digits": (_digits, dict(class_labels=[3, 7])),
}

# ---- parent-side setup, shared with the forked ranks ----------------------------------------

_PIPES: dict = {}  # (name, repr(kwargs)) -> the pipeline, its reference run and its transformer calls


def _call(pipe, kwargs, seed=0):
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return pipe(**kwargs, num_inference_steps=STEPS, generator=gen, output_type="np").images


def _setup(name: str, kwargs: dict | None = None, layouts=()):
    """Build the pipeline, run it once (the reference) and capture the transformer for each local
    batch that ``layouts`` (``(dp, cfg)`` pairs) will give; everything cached in ``_PIPES``."""
    warnings.filterwarnings("ignore")
    build, default_kwargs = PIPES[name]
    kwargs = default_kwargs if kwargs is None else kwargs
    key = (name, repr(kwargs))
    if key not in _PIPES:
        torch.manual_seed(0)
        pipe = build()
        pipe.set_progress_bar_config(disable=True)
        calls = []
        hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
        ref = _call(pipe, kwargs)
        hook.remove()
        _PIPES[key] = dict(pipe=pipe, kwargs=kwargs, ref=ref, first_call=calls[0], n_calls=len(calls))
    st = _PIPES[key]
    args, kw = st["first_call"]
    B = batch_rt.batch_size_of(st["pipe"].transformer, args, kw)
    if any(B % cfg == 0 for _, cfg in layouts):  # the full call's capture tells the per-sample inputs
        ditpass.capture(st["pipe"].transformer, *args, **kw)
    for dp, cfg in layouts:  # the capture each rank will look up: done here once, inherited by fork
        if B % cfg:
            continue  # refused before any capture
        la, lk = split_inputs(BatchLayout(B, dp, cfg, 0, 0), args, kw)
        ditpass.capture(st["pipe"].transformer, *la, **lk)
    return st


def _layouts(plans):
    return {(p.get("dp", 1), p.get("cfg", 1)) for p in plans}


# ---- what every rank runs -------------------------------------------------------------------


def _run_plans(rank, world, st, plans, mode):
    warnings.filterwarnings("ignore")
    pipe, kwargs, ref = st["pipe"], st["kwargs"], st["ref"]
    if mode == "skip_gather":  # control: each rank's own rows stand in for the gathered batch
        batch_rt.all_gather = lambda x, n, group: torch.cat([x] * world)
    out = []
    for fields in plans:
        ditpass.parallelize(pipe, ditpass.Plan(**fields))
        pm = pipe.transformer
        if mode == "rank_seeds":  # no generator, a different global seed per rank
            torch.manual_seed(rank)
            images = _call(pipe, kwargs, seed=None)
        else:
            images = _call(pipe, kwargs)
        split = pm.batch_split
        rec = pm.ditpass_records[0] if pm.ditpass_records else None
        out.append(dict(
            diff=float(abs(images - ref).max()), shape=images.shape, type=type(pm).__name__,
            calls=None if split is None else split.calls,
            batch=None if split is None else split.last_layout.batch,
            local=None if split is None else split.last_layout.local,
            strategies={s.node: s.describe() for s in rec.sites} if rec is not None else {}))
    return out


def _check(name, plans, world, mode="ok", kwargs=None):
    """(the setup, per rank: one result per plan)."""
    st = _setup(name, kwargs, _layouts(plans))
    results = run_distributed(_run_plans, world, st, plans, mode, timeout=300, start_method="fork")
    assert len(results) == world and all(len(r) == len(plans) for r in results), [len(r) for r in results]
    return st, results


def _assert_exact(name, plans, st, results):
    for rank, rank_results in enumerate(results):
        for fields, r in zip(plans, rank_results):
            assert r["type"] == "ParallelModule"
            assert r["shape"] == st["ref"].shape
            assert r["diff"] <= TOL, f"{name} {fields} rank {rank}: max abs diff {r['diff']:.3g} > {TOL}"
    for fields, r in zip(plans, results[0]):
        n = fields.get("dp", 1) * fields.get("cfg", 1)
        if n > 1:  # the batch really was split, on every call
            assert r["calls"] == st["n_calls"] and r["local"] == -(-r["batch"] // n), (fields, r)
        if fields.get("ulysses", 1) > 1:  # and the sequence
            assert any("ulysses" in s for s in r["strategies"].values()), (fields, r["strategies"])


# ---- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PIPES))
def test_two_ranks_match_single_process(name):
    """ulysses=2, cfg=2, dp=2: the images equal the single-process pipeline's."""
    _assert_exact(name, PLANS_2, *_check(name, PLANS_2, 2))


@pytest.mark.parametrize("name", list(PIPES))
def test_four_ranks_hybrid_match_single_process(name):
    """cfg=2 x ulysses=2 and dp=2 x cfg=2 (cfg-major rows, dp-major ranks) on 4 ranks."""
    _assert_exact(name, PLANS_4, *_check(name, PLANS_4, 4))


def test_uneven_batch_is_padded_exactly():
    """3 class labels without guidance (batch 3) over dp=2: rows padded to 4, dropped after."""
    kwargs = dict(class_labels=[1, 7, 3], guidance_scale=1.0)
    plans = [dict(dp=2)]
    st, results = _check("DiTPipeline", plans, 2, kwargs=kwargs)
    _assert_exact("DiTPipeline", plans, st, results)
    assert results[0][0]["batch"] == 3 and results[0][0]["local"] == 2


def test_initial_noise_is_the_same_on_every_rank():
    """No generator and a different global seed per rank: prepare_latents' broadcast from rank 0
    gives every rank rank 0's noise (seed 0, which is also the reference's)."""
    plans = [dict(cfg=2)]
    st, results = _check("PixArtSigmaPipeline", plans, 2, mode="rank_seeds")
    _assert_exact("PixArtSigmaPipeline", plans, st, results)


def test_control_without_gather_differs():
    """The comparison can fail: with the all-gather skipped the images differ."""
    _, results = _check("DiTPipeline", [dict(cfg=2)], 2, mode="skip_gather")
    assert min(r[0]["diff"] for r in results) > 1e-2


def test_cfg_needs_a_batch_with_two_halves():
    """cfg=2 on a call of batch 1 (guidance off, one label): a PlanError that says why and what to use."""
    with pytest.raises(PlanError, match=r"batch of 1, which has no two halves.*dp=2, cfg=1"):
        _check("DiTPipeline", [dict(cfg=2)], 2, kwargs=dict(class_labels=[3], guidance_scale=1.0))


def test_pipefusion_needs_its_processes():
    st = _setup("DiTPipeline")
    for obj in (st["pipe"], st["pipe"].transformer):
        with pytest.raises(PlanError, match="needs 2 processes"):
            ditpass.parallelize(obj, ditpass.Plan(pipefusion=2))
        with pytest.raises(PlanError, match="needs 4 processes"):
            ditpass.parallelize(obj, ditpass.Plan(pipefusion=2, ring=2))
    assert type(st["pipe"].transformer).__name__ == "DiTTransformer2DModel"  # left untouched


def test_unet_pipeline_is_refused():
    import diffusers

    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 8), norm_num_groups=8,
                                 down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    with pytest.raises(PlanError, match="DDPMPipeline has no transformer component .*unet"):
        ditpass.parallelize(pipe, ditpass.Plan())


@pytest.mark.parametrize("B,D,C", [(B, D, C) for B, D, C in itertools.product(range(1, 9), (1, 2, 3, 4), (1, 2))
                                   if D * C > 1 and B % C == 0])
def test_layout_take_and_assemble_round_trip(B, D, C):
    """Every rank's rows, gathered in mesh (dp-major) order, assemble to the batch; cfg rank c
    holds rows of half c only."""
    x = torch.arange(B * 3.0).view(B, 3)
    layouts = [BatchLayout(B, D, C, d, c) for d in range(D) for c in range(C)]  # mesh order
    pieces = [lay.take(x) for lay in layouts]
    assert len({p.shape for p in pieces}) == 1
    assert torch.equal(layouts[0].assemble(torch.cat(pieces)), x)
    for lay, p in zip(layouts, pieces):
        half = lay.cfg_rank * (B // C), (lay.cfg_rank + 1) * (B // C)
        assert all(half[0] <= r < half[1] for r in lay.rows()), (lay, lay.rows())
