"""PipeFusion across diffusion steps (`ditpass.runtime.lazy`): inside a diffusers pipeline the transformer
returns lazy outputs, stage 0 evaluates the pipeline's own step code patch by patch and starts step t+1
before the last stage has finished step t.

The schedule changes when things run, not what is computed: patch m of step t+1 reads the same fresh
and stale K/V as under the fill-and-drain schedule, and its tokens come from the same latent positions.
So the pictures equal those of ``Plan(across_steps=False)``, on the built-in digits pipeline (DiT, DDIM,
CFG in one batch), FLUX (flow matching, packed latents), SD3 (CFG, conv patch embed) and PixArt-Sigma
(DPM-Solver multistep, learned variance). What proves that it pipelines: each pipelined step's
output is broadcast once, at the end (no per-step synchronisation), and stage 0 starts step t+1
before the last stage ends step t (the ranks' patch timelines).
"""
from __future__ import annotations

import time
import types
import warnings

import pytest
import torch

import ditpass
from ditpass.runtime import lazy

from dist_utils import run_distributed

STEPS = 4


def _flux():
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from ditpass.models import zoo
    from test_pipeline_parallel import WORDS, _t5, _tokenizer, _vae

    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                        eos_token_id=2, bos_token_id=0, pad_token_id=0)).eval()
    return diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=_vae(shift_factor=0.1),
                                  text_encoder=clip, tokenizer=_tokenizer(), text_encoder_2=_t5(),
                                  tokenizer_2=_tokenizer(), transformer=zoo.build("FluxTransformer2DModel"))


def _pipes():
    from test_pipeline_parallel import _digits, _pixart, _sd3

    prompt = dict(prompt=["a red cat", "blue dog on the mat"], height=32, width=32, max_sequence_length=8)
    return {
        "digits": (_digits, dict(class_labels=[3, 7])),
        "FluxPipeline": (_flux, prompt),
        "StableDiffusion3Pipeline": (_sd3, prompt),
        "PixArtSigmaPipeline": (_pixart, dict(prompt, negative_prompt="", use_resolution_binning=False,
                                              clean_caption=False)),
    }


def _run(name, fields, callback=None):
    build, kwargs = _pipes()[name]
    torch.manual_seed(0)
    pipe = build()  # the same random weights on every rank, a fresh copy per plan (PipeFusion frees weights)
    pipe.set_progress_bar_config(disable=True)
    pipe = ditpass.parallelize(pipe, ditpass.Plan(**fields))
    extra = {} if callback is None else dict(callback_on_step_end=callback)
    with torch.no_grad():
        out = pipe(**kwargs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                   output_type="np", **extra).images
    return torch.as_tensor(out), pipe.transformer.ditpass_records[-1].runner


def _slow_patches(seconds):
    """Every stage's patch takes ``seconds`` longer (the tiny models' patches take a few ms, about what the
    pipeline's Python takes between steps; on a GPU a patch is the long part)."""
    from ditpass.runtime.pipeline import PipeFusionRunner

    init = PipeFusionRunner.__init__

    def slow_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        run = self._run_part
        self._run_part = lambda *a: (time.sleep(seconds), run(*a))[1]

    PipeFusionRunner.__init__ = slow_init


def _worker(rank, world, name, fields, slow=0.0):
    warnings.filterwarnings("ignore")
    if slow:
        _slow_patches(slow)
    within, _ = _run(name, dict(fields, across_steps=False))
    across, runner = _run(name, fields)
    return (float((across - within).abs().max()), runner.last_mode, runner.shared_steps, runner.head_local,
            runner.s, list(runner.timeline))


def _overlaps(timelines, n_stages, patches, steps):
    """Steps t after which stage 0 started step t+1 before the last stage had finished step t."""
    first, last = timelines[0], timelines[n_stages - 1]
    start = {(s, m): t0 for _, s, m, t0, _ in first}
    end = {(s, m): t1 for _, s, m, _, t1 in last}
    return [t for t in steps[:-1] if start[(t + 1, 0)] < end[(t, patches - 1)]]


@pytest.mark.parametrize("name,patches,warmup", [("digits", 4, 1), ("digits", 2, 0), ("FluxPipeline", 2, 1),
                                                 ("StableDiffusion3Pipeline", 2, 1), ("PixArtSigmaPipeline", 2, 1)])
def test_across_steps_equals_fill_and_drain_and_pipelines(name, patches, warmup):
    fields = dict(pipefusion=2, patches=patches, warmup_steps=warmup)
    results = run_distributed(_worker, 2, name, fields, 0.03, timeout=600)
    pipelined = list(range(warmup, STEPS))
    for diff, mode, shared_steps, head_local, _, _ in results:
        assert diff <= 1e-6, diff  # the same pictures as the schedule that drains in every call
        assert mode == "pipelined" and head_local
        assert shared_steps == [STEPS] * len(pipelined)  # each output broadcast once, after the loop (the VAE)
    timelines = [r[5] for r in sorted(results, key=lambda r: r[4])]
    assert [(s, m) for _, s, m, _, _ in timelines[0]] == [(s, m) for s in pipelined for m in range(patches)]
    assert _overlaps(timelines, 2, patches, pipelined), "stage 0 never started a step before the last one ended"


def _forcing_worker(rank, world):
    warnings.filterwarnings("ignore")
    seen = []

    def callback(pipe, i, t, kw):  # reads the latents' values every step: the pipeline drains there
        seen.append(float(kw["latents"].abs().max()))
        return kw

    fields = dict(pipefusion=2, patches=2, warmup_steps=1)
    within, _ = _run("FluxPipeline", dict(fields, across_steps=False), callback)
    ref = list(seen)
    seen.clear()
    across, runner = _run("FluxPipeline", fields, callback)
    return float((across - within).abs().max()), ref, seen, runner.shared_steps


def test_step_code_that_reads_values_materializes_and_stays_exact():
    for diff, ref, seen, shared_steps in run_distributed(_forcing_worker, 2, timeout=600):
        assert diff <= 1e-6 and seen == ref  # the callback saw the same latents
        assert shared_steps == list(range(2, STEPS + 1))  # each pipelined output made whole in its own step


def _within_worker(rank, world):
    warnings.filterwarnings("ignore")
    out, runner = _run("digits", dict(pipefusion=2, patches=2, warmup_steps=1, across_steps=False))
    return runner.last_mode, runner.materialized


def test_across_steps_off_drains_every_call():
    for mode, materialized in run_distributed(_within_worker, 2, timeout=600):
        assert mode == "patches" and materialized == 0


# ---- the lazy tensor on its own (one process) ------------------------------------------------------

def _source(values):
    """A `lazy.Source` on a one-stage stand-in runner whose patch outputs are ``values`` (already there)."""
    runner = types.SimpleNamespace(s=0, N=1, ranks=[0], group=None, shared_steps=[], state=None)
    src = lazy.Source(runner, values[-1].shape, values[-1].dtype, values[-1].device)
    src.posted = [(v, None) for v in values]
    return src, runner


def test_lazy_records_step_code_and_evaluates_it_per_patch():
    # FLUX-like [B, S, C] output, position dim 1; after patch 0 only the first half of S is this step's
    full = torch.randn(2, 6, 3)
    partial = full.clone()
    partial[:, 3:] = 0
    src, runner = _source([partial, full])
    out = lazy.from_source(src, frozenset({1}))
    latents = torch.randn(2, 6, 3)
    uncond, cond = out.chunk(2)  # CFG halves: along the batch, not a position dim
    guided = uncond + 4.0 * (cond - uncond)
    step = (latents[:1].to(torch.float64) - 0.1 * guided).to(torch.float32)
    step.mul_(2)  # in place on a lazy tensor: recorded and rebound
    nxt = torch.cat([step, step])
    assert lazy.is_lazy(nxt) and nxt.shape == (2, 6, 3) and nxt.dtype == torch.float32
    want = torch.cat([2 * (latents[:1].double() - 0.1 * (full[:1] + 4 * (full[1:] - full[:1]))).float()] * 2)
    early = lazy.value_at(nxt, 0)
    torch.testing.assert_close(early[:, :3], want[:, :3])  # patch 0's positions are already right
    assert not torch.allclose(early[:, 3:], want[:, 3:])
    torch.testing.assert_close(lazy.materialize(nxt), want)
    assert len(runner.shared_steps) == 1


def test_lazy_materializes_what_mixes_positions():
    full = torch.randn(1, 4, 2)
    src, runner = _source([full])
    out = lazy.from_source(src, frozenset({1}))
    assert lazy.is_lazy(out * 2) and lazy.is_lazy(out[:, :, :1])  # channels: not a position dim
    assert not runner.shared_steps
    r = out.reshape(1, 8)  # reshapes the position dim: needs the value
    assert not lazy.is_lazy(r) and len(runner.shared_steps) == 1
    torch.testing.assert_close(r, full.reshape(1, 8))
    src2, _ = _source([full])
    out2 = lazy.from_source(src2, frozenset({1}))
    assert not lazy.is_lazy(out2[:, :2])  # a slice of positions, and a reduction over them
    src3, _ = _source([full])
    assert float(lazy.from_source(src3, frozenset({1})).sum()) == pytest.approx(float(full.sum()))


def _loop_worker(rank, world):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ditpass.models import zoo

    warnings.filterwarnings("ignore")
    name = "FluxTransformer2DModel"
    kw = zoo.make_inputs(name, "tiny")
    outs, modes = [], []
    for across in (False, True):
        torch.manual_seed(0)
        model = ditpass.parallelize(zoo.build(name, "tiny").eval(),
                                    ditpass.Plan(pipefusion=2, patches=2, warmup_steps=1, across_steps=across))
        sched = FlowMatchEulerDiscreteScheduler()
        sched.set_timesteps(STEPS)
        latents = kw["hidden_states"].clone()
        with torch.no_grad(), ditpass.denoising_loop(model, sched) as loop:
            for t in sched.timesteps:
                pred = model(**dict(kw, hidden_states=latents, timestep=(t / 1000).expand(latents.shape[0])))[0]
                latents = sched.step(pred, t, latents, return_dict=False)[0]
            lazy_before = lazy.is_lazy(latents)
            latents = loop.finish(latents)
        outs.append(latents)
        modes.append((model.ditpass_records[0].runner.last_mode, lazy_before, lazy.is_lazy(latents)))
    return float((outs[1] - outs[0]).abs().max()), modes


def test_a_loop_written_by_hand_pipelines_in_denoising_loop():
    for diff, modes in run_distributed(_loop_worker, 2, timeout=600):
        assert diff <= 1e-6
        assert modes == [("patches", False, False), ("pipelined", True, False)]


def _vae_worker(rank, world):
    warnings.filterwarnings("ignore")
    plain, _ = _run("digits", dict(pipefusion=2, patches=2, warmup_steps=1))
    banded, runner = _run("digits", dict(pipefusion=2, patches=2, warmup_steps=1, vae=True))
    return float((banded - plain).abs().max()), runner.last_mode, runner.shared_steps


def test_parallel_vae_decodes_the_pipelined_latents():
    for diff, mode, shared_steps in run_distributed(_vae_worker, 2, timeout=600):
        assert diff <= 1e-5 and mode == "pipelined" and shared_steps == [STEPS] * (STEPS - 1)
