"""xDiT (``xfuser`` 0.7.0) as a peer in the sequence-parallel benchmark: one FLUX.1-dev step.

``run_xdit_flux(...)`` times xfuser's sequence-parallel FLUX transformer (Ulysses and/or ring) on a
diffusers ``FluxTransformer2DModel`` that the caller built (random weights, on the GPU, bf16) and
returns the gathered output, the caller's timing dict, and notes. It runs on every rank under
torchrun, with ``torch.distributed`` already initialised and ``ulysses * ring == world size``.
``xdit_versions()`` names the installed versions, or says why ``xfuser`` does not import.

What is done, in order (the references are to files in the xfuser 0.7.0 wheel):

1. xfuser's world group on the caller's process group:
   ``parallel_state.init_distributed_environment(backend=<that group's backend>)``. With
   ``torch.distributed`` already initialised it creates no new default group; it wraps the existing
   one in xfuser's ``GroupCoordinator`` and calls ``torch.cuda.set_device(LOCAL_RANK)``.
2. xfuser's model-parallel groups: ``parallel_state.initialize_model_parallel(ulysses_degree=u,
   ring_degree=r, sequence_parallel_degree=u*r)``, with data, CFG, PipeFusion and tensor parallel
   all 1. xfuser's runtime state makes the same call (``runtime_state._check_distributed_env``).
   Here the backend is passed explicitly, because xfuser otherwise derives it from the device
   and raises on a machine without CUDA. With yunchang installed, this call also runs
   ``yunchang.set_seq_parallel_pg``, which builds the Ulysses and ring groups that xfuser's
   attention uses. A later call with other degrees destroys the groups and builds them again.
3. Engine config: ``xFuserArgs(model="black-forest-labs/FLUX.1-dev", ulysses_degree=u,
   ring_degree=r, height, width, attention_backend).create_config()``. This builds the config only
   and downloads nothing.
4. The model: ``xFuserFlux1Transformer2DWrapper``. For FLUX.1-dev, xfuser 0.7.0's runner
   (``model_executor/models/runner_models/flux.py``, ``xFuserFluxModel._load_model``) uses this
   class whenever ``pipefusion_parallel_degree == 1``. The older ``xFuserFluxPipeline`` with
   ``xFuserFluxTransformer2DWrapper`` is used only for PipeFusion. The class is a
   ``FluxTransformer2DModel`` subclass. Every attention processor is ``xFuserFluxAttnProcessor``:
   QKV, the QK RMSNorms and RoPE are computed as in diffusers, and attention goes through
   xfuser's ``USP`` (Ulysses all-to-all, then torch's ``_templated_ring_attention`` over the ring
   group when ring > 1). Its ``forward`` shards the inputs and all-gathers the output itself (see
   6). The class is built on the meta device from ``transformer.config``, then
   ``load_state_dict(transformer.state_dict(), assign=True)``, so it shares the caller's weight
   tensors and makes no second copy.
5. Runtime state: ``initialize_runtime_state(pipeline, engine_config)``, then
   ``get_runtime_state().set_input_parameters(height, width, batch_size,
   max_condition_sequence_length=<text tokens>, split_text_embed_in_sp=True)``. These are the
   arguments of the runner's ``_run_pipe`` for FLUX.1-dev, plus height and width. ``pipeline`` is
   a stand-in for diffusers' ``FluxPipeline``: the runtime state reads only
   ``pipeline.transformer.config`` (heads, patch size, channels) and ``pipeline.vae_scale_factor``,
   which is 8 in ``FluxPipeline`` and doubled by xfuser for Flux pipelines, so 16 here.
6. One step: ``model(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids,
   txt_ids, guidance, return_dict=False)[0]`` with the full inputs, under ``torch.no_grad``.
   Inside, xfuser's wrapper keeps this rank's 1/N of the image tokens and ``img_ids``. When the text
   length divides by N (FLUX's 512 tokens do for N = 1, 2, 4, 8), it also keeps 1/N of the text tokens and
   ``txt_ids``. It runs the blocks, then all-gathers the output along the sequence on the SP group.
   The timed step therefore includes that slicing and the all-gather, as in each denoising step of
   xfuser's own run. The step is first run once, untimed, so that a failure is reported as
   coming from xfuser. Then ``time_fn(step)`` runs it ``warmup + iters`` times. The output returned
   is that of the last step.

How this differs from xfuser's own FLUX.1-dev run (``xfuser/runner.py``):

- Only the transformer forward (one denoising step) is timed. Text encoders, the scheduler and the
  VAE are not run.
- The weights are the caller's (random) and are shared, not loaded by xfuser's ``ModelLoader``.
  There is no quantisation, FSDP or offload (xfuser's defaults).
- xfuser's defaults everywhere else: no ``torch.compile`` (``use_torch_compile=False``), no step
  cache, no FP8 communication, no CFG parallel (FLUX.1-dev is guidance-distilled: one batch).
- The attention backend is the one xfuser picks (``RuntimeState._select_attention_backend``)
  unless ``attention_backend`` is given. On CUDA that is FLASH_4 or FLASH_3 if those packages are
  installed, else ``CUDNN`` (``aten._scaled_dot_product_cudnn_attention``), since cuDNN is tried
  before flash-attn 2. xfuser refuses ring > 1 with ``SDPA`` or ``SDPA_MATH``: they return no LSE.
  The backend used is returned as ``result["attention_backend"]``.

Constraints, checked before anything runs (with a message naming the rule): the image tokens and the
latent height (``height // 16``) must divide by ``ulysses * ring``, and the heads by ``ulysses``.
xfuser 0.7.0's padding path for uneven image tokens calls a method that does not exist
(``self._pad_to_sp_divisible``; the method is ``pad_to_sp_divisible``), and the runtime state refuses
a latent height that does not divide. The text tokens must divide by ``ulysses * ring`` too. With
PipeFusion 1 and uneven text, each rank keeps all the text tokens and xfuser's attention has no
joint-tensor path, so the sequence gathered by the all-to-all holds every text token once per SP
rank.

Verified on a CPU machine (torch 2.13 CPU, diffusers 0.42.1, gloo, float32) with a tiny FLUX
(1 double and 1 single block, 2 or 4 heads of 16, guidance embeds, an 8x6 image grid, 8 text tokens),
by a test script kept outside the repo. It used a stub ``triton`` and a few test-only patches,
because xfuser 0.7.0 neither imports nor turns on yunchang without CUDA: it reads
``torch.version.cuda`` at import and needs ``torch.cuda.is_available()`` for ``has_long_ctx_attn``.
Ring needs an attention that returns the LSE, and xfuser refuses SDPA and SDPA_MATH for ring, so
the test registered a math attention with LSE under the SDPA_EFFICIENT key. Against the plain
single-process diffusers output (values up to about 1.9), the gathered output differed by at most:

- 2 processes: ulysses=2 with xfuser's CPU default SDPA and with SDPA_MATH, 2.4e-7; ring=2, 2.4e-7.
- 4 processes: ulysses=4 (4 heads), 3.6e-7; ulysses=2 x ring=2, 3.0e-7; ring=4, 2.4e-7.

The query and key shapes that reached the attention function were as expected: Ulysses had the full
sequence and heads / ulysses, ring had the sequence / ring. The checks also passed under
``torch.inference_mode``, with several configurations called one after another in one process. The
caller's model was left unchanged: same processors, bit-identical output. The uneven-text rule above
was measured with the check taken out: 7 text tokens on 2 ranks gave a 62-token attention sequence
(48 + 2 x 7) and an output off by 1.1e-2.

Left for the GPU: NCCL, xfuser's CUDA backend choice (CUDNN, or flash-attn 3/4 if installed) and
bf16 at full size. There xfuser imports without patches, given ``triton`` (which ships with torch)
and the wheels xfuser 0.7.0, yunchang 0.6.4, distvae 0.1.0, beautifulsoup4 and soupsieve (installed
with ``--no-deps``). Call ``xdit_versions()`` and ``run_xdit_flux()`` only after
``torch.cuda.set_device(LOCAL_RANK)``: xfuser probes the current CUDA device when it is imported.
"""
from __future__ import annotations

import importlib.metadata
import itertools
import types
from typing import Any, Callable

import torch
import torch.distributed as dist

XFUSER_MODEL_NAME = "black-forest-labs/FLUX.1-dev"
# FluxPipeline.vae_scale_factor is 8; xfuser's runtime state doubles it for Flux pipelines
# (2x2 latent patches), so one image token covers 16x16 pixels.
FLUX_PIXELS_PER_TOKEN = 16


def xdit_versions() -> dict:
    """Versions of xfuser, yunchang and distvae; ``import_error`` when xfuser does not import; and
    what xfuser detected (yunchang usable, flash-attn variants) when it does."""
    out: dict[str, Any] = {}
    for name in ("xfuser", "yunchang", "distvae"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        from xfuser.envs import PACKAGES_CHECKER

        info = PACKAGES_CHECKER.get_packages_info()
        out["xfuser_detected"] = {k: str(v) if not isinstance(v, bool) else v for k, v in info.items()}
    except Exception as e:  # noqa: BLE001 - reported, not swallowed: this is the answer
        out["import_error"] = f"{type(e).__name__}: {e}"
    return out


def _import_xfuser() -> types.SimpleNamespace:
    """The xfuser pieces used here. Raises RuntimeError that gives the reason when xfuser cannot run."""
    try:
        import xfuser  # noqa: F401 - the package imports every pipeline: a broken install fails here
        from xfuser.config import xFuserArgs
        from xfuser.core.distributed import parallel_state, runtime_state
        from xfuser.envs import PACKAGES_CHECKER
        from xfuser.model_executor.models.transformers.transformer_flux import (
            xFuserFlux1Transformer2DWrapper,
        )
    except Exception as e:
        raise RuntimeError(f"xfuser cannot be imported: {type(e).__name__}: {e}") from e
    if not PACKAGES_CHECKER.get_packages_info()["has_long_ctx_attn"]:
        # xfuser sets this only when CUDA (or an NPU) is available and these yunchang names import;
        # without it there are no Ulysses/ring groups and sequence parallelism is refused.
        reason = "torch.cuda.is_available() is False"
        if torch.cuda.is_available():
            try:
                from yunchang import (  # noqa: F401
                    LongContextAttention,
                    LongContextAttentionQKVPacked,
                    UlyssesAttention,
                    ring_flash_attn_func,
                    set_seq_parallel_pg,
                )

                reason = "unknown (yunchang imports here)"
            except Exception as e:
                reason = f"yunchang does not import: {type(e).__name__}: {e}"
        raise RuntimeError(f"xfuser has no sequence-parallel support (has_long_ctx_attn=False): {reason}")
    return types.SimpleNamespace(
        xFuserArgs=xFuserArgs,
        ps=parallel_state,
        rs=runtime_state,
        Wrapper=xFuserFlux1Transformer2DWrapper,
        version=importlib.metadata.version("xfuser"),
    )


def _init_groups(xf: types.SimpleNamespace, ulysses: int, ring: int) -> None:
    """Steps 1 and 2 of the module docstring: xfuser's world and model-parallel groups."""
    ps = xf.ps
    backend = dist.get_backend()
    ps.init_distributed_environment(backend=backend)
    if ps.model_parallel_is_initialized():
        same = (
            ps.get_ulysses_parallel_world_size() == ulysses
            and ps.get_ring_parallel_world_size() == ring
            and ps.get_sequence_parallel_world_size() == ulysses * ring
        )
        if same:
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        data_parallel_degree=1,
        classifier_free_guidance_degree=1,
        sequence_parallel_degree=ulysses * ring,
        ulysses_degree=ulysses,
        ring_degree=ring,
        tensor_parallel_degree=1,
        pipeline_parallel_degree=1,
        backend=backend,
    )


def _image_size(img_ids: torch.Tensor, n_img: int) -> tuple[int, int]:
    """(height, width) in pixels from FLUX's image ids (rows in column 1, columns in column 2)."""
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if rows * cols != n_img:
        raise ValueError(
            f"img_ids describe a {rows}x{cols} grid but there are {n_img} image tokens; "
            "pass height= and width= explicitly"
        )
    return rows * FLUX_PIXELS_PER_TOKEN, cols * FLUX_PIXELS_PER_TOKEN


def _xfuser_model(xf: types.SimpleNamespace, transformer: torch.nn.Module) -> torch.nn.Module:
    """Step 4: xFuserFlux1Transformer2DWrapper with the caller's weights (shared, not copied)."""
    with torch.device("meta"):
        model = xf.Wrapper.from_config(transformer.config)
    model.load_state_dict(transformer.state_dict(), strict=True, assign=True)
    left = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"xFuserFlux1Transformer2DWrapper: tensors not filled from the model: {left[:5]}")
    return model.eval()


def run_xdit_flux(
    transformer,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    timestep: torch.Tensor,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    guidance: torch.Tensor | None,
    ulysses: int,
    ring: int,
    iters: int,
    warmup: int,
    time_fn: Callable[[Callable[[], torch.Tensor]], dict],
    attention_backend: str | None = None,
    height: int | None = None,
    width: int | None = None,
) -> dict:
    """Time one xDiT FLUX step on ``ulysses * ring`` ranks (the module docstring gives each step).

    ``transformer``: a diffusers ``FluxTransformer2DModel`` on this rank's device. Its weights are
    shared with xfuser's model, not copied or modified. Inputs: the full tensors of
    ``FluxTransformer2DModel.forward``, the same on every rank. ``time_fn(step)`` runs ``step`` (no
    arguments; returns the gathered output) ``warmup + iters`` times and returns timing stats.
    ``iters`` and ``warmup`` are not used here; they are recorded in the notes.
    ``attention_backend``: an xfuser ``AttentionBackendType`` name (e.g. ``"CUDNN"``, ``"FLASH"``,
    ``"SDPA_FLASH"``); None lets xfuser choose. ``height`` and ``width`` (pixels) default to the
    ones the grid in ``img_ids`` implies.

    Returns ``{"output": (B, image tokens, C) gathered output of the last step, "timing": time_fn's
    dict, "notes": str, "attention_backend": name, "xfuser": version}``. Raises (RuntimeError or
    ValueError, with the reason) if xfuser cannot run this configuration.
    """
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised (run under torchrun)")
    world, sp = dist.get_world_size(), ulysses * ring
    if ulysses < 1 or ring < 1 or sp != world:
        raise ValueError(f"ulysses ({ulysses}) x ring ({ring}) must equal the world size ({world})")
    batch, n_img, _ = hidden_states.shape
    n_txt = encoder_hidden_states.shape[1]
    heads = transformer.config.num_attention_heads
    if height is None or width is None:
        height, width = _image_size(img_ids, n_img)
    problems = []
    if n_img % sp:
        problems.append(
            f"image tokens ({n_img}) not divisible by ulysses*ring ({sp}); xfuser 0.7.0's padding path "
            "calls the missing method xFuserFlux1Transformer2DWrapper._pad_to_sp_divisible"
        )
    if (height // FLUX_PIXELS_PER_TOKEN) % sp:
        problems.append(
            f"latent height ({height // FLUX_PIXELS_PER_TOKEN} tokens) not divisible by ulysses*ring ({sp}); "
            "xfuser's runtime state refuses it"
        )
    if n_txt % sp:
        problems.append(
            f"text tokens ({n_txt}) not divisible by ulysses*ring ({sp}); with PipeFusion 1 each rank would "
            "keep all the text tokens and xfuser's attention would see each one once per SP rank"
        )
    if heads % ulysses:
        problems.append(f"attention heads ({heads}) not divisible by ulysses ({ulysses})")
    if problems:
        raise ValueError("xDiT cannot run this configuration: " + "; ".join(problems))

    xf = _import_xfuser()
    _init_groups(xf, ulysses, ring)
    engine_config, _ = xf.xFuserArgs(
        model=XFUSER_MODEL_NAME,
        ulysses_degree=ulysses,
        ring_degree=ring,
        height=height,
        width=width,
        max_sequence_length=n_txt,
        attention_backend=attention_backend,
    ).create_config()
    model = _xfuser_model(xf, transformer)
    pipeline = types.SimpleNamespace(transformer=model, vae_scale_factor=FLUX_PIXELS_PER_TOKEN)
    xf.rs.initialize_runtime_state(pipeline=pipeline, engine_config=engine_config)
    state = xf.rs.get_runtime_state()
    state.set_input_parameters(
        height=height,
        width=width,
        batch_size=batch,
        max_condition_sequence_length=n_txt,
        split_text_embed_in_sp=True,
    )

    kwargs = dict(
        hidden_states=hidden_states,
        encoder_hidden_states=encoder_hidden_states,
        pooled_projections=pooled_projections,
        timestep=timestep,
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=guidance,
        return_dict=False,
    )
    last: dict[str, torch.Tensor] = {}

    def step() -> torch.Tensor:
        with torch.no_grad():
            out = model(**kwargs)[0]
        last["output"] = out
        return out

    config = f"ulysses={ulysses} ring={ring} {height}x{width} batch={batch} txt={n_txt} img={n_img}"
    try:
        out = step()
    except Exception as e:
        raise RuntimeError(f"xfuser FLUX forward failed ({config}): {type(e).__name__}: {e}") from e
    if tuple(out.shape[:2]) != (batch, n_img):
        raise RuntimeError(f"xfuser FLUX output has shape {tuple(out.shape)}, expected ({batch}, {n_img}, C)")

    timing = time_fn(step)

    backend = state.attention_backend.name
    notes = (
        f"xfuser {xf.version} xFuserFlux1Transformer2DWrapper (the 0.7.0 runner's FLUX.1-dev model "
        f"without PipeFusion), {config}, attention backend {backend}, text split across SP ranks: "
        f"{state.split_text_embed_in_sp}; timed: the transformer forward only, with xfuser's own input "
        f"slicing and output all-gather; weights shared with the diffusers model; no torch.compile; "
        f"one untimed forward before time_fn (warmup={warmup}, iters={iters})"
    )
    return {
        "output": last["output"],
        "timing": timing,
        "notes": notes,
        "attention_backend": backend,
        "xfuser": xf.version,
    }
