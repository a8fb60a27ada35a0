"""DiTFastAttn at run time: the window kernel, each site's method per step, its caches, the calibration
run and the plan file.

Legend: ``B`` batch, ``H`` heads (``h`` this rank's after Ulysses' all-to-all), ``S`` tokens, ``D`` head
dim; ``half`` the window's half-width in tokens; ``R`` a site's cached residual.

Methods of one attention site at one diffusion step (the code is what explain's plan table prints):

    full      F   plain attention: the same SDPA (or sequence-parallel) call as without DiTFastAttn
    ast       S   attention sharing across timesteps: the site's output of the previous step; nothing
                  is computed (under Ulysses the return all-to-all is skipped too)
    wars      W   window attention with residual sharing: window(q, k, v) + R, where R = full - window
                  was cached at the last step that ran full attention (full or asc)
    wars+asc  WC  WA-RS on the first half of the batch, copied to the second half
    asc       C   attention sharing across CFG: full attention on the first half of the batch, copied
                  to the second (the guidance batch is [half A; half B], either order)

What is still computed: the projections. The graph computes q, k, v and the output projection at every
step; AST and ASC skip the attention (the op), not the linears around it, because an FX graph has no
per-step branch. The output projection of a shared output gives the shared projected output (a linear of
the same values), so the numbers are DiTFastAttn's; the savings are the attention's.

The step: ``RunState.step_index``, the scheduler steps the pipeline hook has counted in this generation
(`ditpass.components.Generation`), so step ``t``'s transformer call sees ``t``; for a model used without a
pipeline, the calls since the last reset (each call is a step). Under a pipeline that assumes one
transformer call per scheduler step (pipelines that batch the CFG halves: DiT, PixArt, SD3, FLUX.1-dev
without true CFG, ...); a second call at the same step with a method other than full raises, as it would
reuse one call's caches for the other.

Caches (`RunState.buffer`, zeroed by the reset at the start of every generation; step 0 is always full
attention, so nothing reads a zero cache): ``fastattn.<site>.out``, the site's last output ([B, S, H, D],
written only where the next step is AST), and ``fastattn.<site>.residual``, R (written at full steps only
where a WA-RS step follows before the next full one).

Parallel plans (the pass decides what each site may do; `FastAttnSite.methods`):

- Ulysses: after the all-to-all each rank holds the whole sequence for ``h`` heads, so the window is
  computed there (`seq.seq_attention`'s ``local`` hook) in global token order: the single-device window,
  exact. Ring attention (ring > 1) holds a slice of the keys: no halo exchange is built, so its sites get
  only full and AST.
- CFG parallel (cfg=2): each rank holds one half. ASC then computes on the cfg rank holding the first
  half and broadcasts the output (and R when it is refreshed) to its cfg peer, which computes nothing:
  equal to the single-device ASC, but no faster there (the peer waits). Data parallel without cfg (the
  halves split by rows over dp ranks) turns ASC off.
- A local batch that is odd has no halves: ASC falls back (asc -> full, wars+asc -> wars).

Calibration (`calibrate`): one pipeline run over ``Plan.fastattn_calib`` inputs. Step 0 is full. At
each later step the transformer call runs the model several times: once with full attention everywhere
(the reference), then for each site in order, with the methods already chosen at this step for the sites
before it, the candidates AST, WA-RS+ASC, WA-RS, ASC (those the site may use) until one keeps the error
``mean|y - y_ref| / mean|y_ref|`` of the transformer output under ``threshold * (i + 1) / sites``; else
full. The trial runs read the caches and write none; a last run with the chosen methods writes them and is
what the scheduler gets. Threshold 0 keeps full attention everywhere (the test is ``error < bound``).

The plan file (JSON, `save_plan` / `load_plan`): ``{"format": "ditpass.fastattn/1", "window", "threshold",
"n_calib", "steps", "sites": {"transformer_blocks.0.attn1": ["full", "ast", "wars", ...], ...}}``. Sites
are named by module path (``#k`` appended for a module's k-th site), which is stable across processes and
batch sizes; steps past a site's list run full attention.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from . import seq
from .state import RunState

__all__ = ["METHODS", "CODES", "CANDIDATES", "FastAttnSite", "FastAttnRun", "run_for", "attend", "window_attention",
           "half_width", "window_pairs", "step_flops", "calibrate", "save_plan", "load_plan", "check_plan", "window_kernel"]

METHODS = ("full", "ast", "wars", "wars+asc", "asc")
CODES = {"full": "F", "ast": "S", "wars": "W", "wars+asc": "WC", "asc": "C"}
CANDIDATES = ("ast", "wars+asc", "wars", "asc")  # the calibration's order (DiTFastAttn's)
FORMAT = "ditpass.fastattn/1"
_FULL_TYPE = ("full", "asc")  # methods that compute full attention (and can refresh R)
_WITHOUT_ASC = {"asc": "full", "wars+asc": "wars"}
_WITHOUT_WARS = {"wars": "full", "wars+asc": "asc"}


# ---- geometry -------------------------------------------------------------------------------------


def half_width(S: int, window: float) -> int:
    """Keys on each side of a query: the band covers ``window`` of the ``S`` tokens (at least one each side)."""
    return max(1, math.ceil(window * S / 2))


def window_pairs(S: int, half: int) -> int:
    """(query, key) pairs inside the band |i - j| <= half of an S x S attention."""
    if half >= S - 1:
        return S * S
    return S * (2 * half + 1) - half * (half + 1)


# ---- the window kernel ----------------------------------------------------------------------------

_KERNEL: dict[str, str] = {}  # device type -> the kernel the window ran with last ("blocked", "flex", "fa3: ...")


def window_kernel() -> dict[str, str]:
    """Which window kernel ran, per device type (for benchmarks' records)."""
    return dict(_KERNEL)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, half: int, scale=None) -> torch.Tensor:
    """Attention of every query ``i`` over the keys ``j`` with ``|i - j| <= half`` ([B, H, S, D] in and out).

    A kernel that skips the keys outside the band, not the full matrix masked: on CUDA FlexAttention with
    a block mask (compiled; only the 128 x 128 tiles the band touches run), or FlashAttention-3's sliding
    window where the ``fa3_fwd`` wheel has it (``DITPASS_WINDOW_KERNEL=fa3``, or ``auto`` on bf16); elsewhere
    `_blocked_window`, blocks of queries against the keys their band reaches."""
    S = q.shape[-2]
    if half >= S - 1:
        _KERNEL[q.device.type] = "full (the band covers every key)"
        return seq.attend(q, k, v, scale=scale)
    choice = os.environ.get("DITPASS_WINDOW_KERNEL", "auto")
    if q.device.type == "cuda" and choice != "blocked":
        if choice == "fa3" or (choice == "auto" and q.dtype == torch.bfloat16 and _fa3() is not None):
            out = _fa3_window(q, k, v, half, scale)
            if out is not None:
                return out
        _KERNEL["cuda"] = "flex"
        return _flex_window(q, k, v, half, scale)
    _KERNEL[q.device.type] = "blocked"
    return _blocked_window(q, k, v, half, scale)


def _block_size(half: int) -> int:
    return max(16, min(128, 2 * half))


def _blocked_window(q, k, v, half: int, scale=None, block: Optional[int] = None) -> torch.Tensor:
    """The band as blocks: queries in blocks of ``block``, each against the ``block + 2 * half`` keys around
    it (an unfolded view of the padded keys), corners and pad keys masked. Work per head: S x (block + 2 half)
    instead of S x S."""
    B, H, S, D = q.shape
    block = block or _block_size(half)
    nb = -(-S // block)
    Sp = nb * block
    L = block + 2 * half
    qb = F.pad(q, (0, 0, 0, Sp - S)).reshape(B, H * nb, block, D) if Sp != S else q.reshape(B, H * nb, block, D)
    pad = (0, 0, half, Sp - S + half)
    kb = F.pad(k, pad).unfold(2, L, block).transpose(-1, -2).reshape(B, H * nb, L, D)  # [B, H*nb, L, D]
    vb = F.pad(v, pad).unfold(2, L, block).transpose(-1, -2).reshape(B, H * nb, L, D)
    mask = _block_mask(S, half, block, str(q.device))  # [nb, block, L]
    mask = mask.unsqueeze(0).expand(H, nb, block, L).reshape(1, H * nb, block, L)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
    return out.reshape(B, H, Sp, D)[:, :, :S]


@functools.lru_cache(maxsize=32)
def _block_mask(S: int, half: int, block: int, device: str) -> torch.Tensor:
    """[nb, block, L] bool: query ``b * block + a`` may see key ``b * block - half + c``."""
    nb = -(-S // block)
    L = block + 2 * half
    a = torch.arange(block).view(1, block, 1)
    c = torch.arange(L).view(1, 1, L)
    b = torch.arange(nb).view(nb, 1, 1)
    key = b * block - half + c
    real_key = (key >= 0) & (key < S)
    band = ((c - half - a).abs() <= half) & real_key
    pad_query = (b * block + a) >= S  # rows cut off after; give them a finite softmax
    return (band | (pad_query & real_key)).to(device)


_FLEX: dict[str, Any] = {}


def _flex_window(q, k, v, half: int, scale=None) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    S = q.shape[-2]
    key = (S, half, str(q.device))
    mask = _FLEX.get(key)
    if mask is None:
        def band(b, h, q_idx, kv_idx):
            return (q_idx - kv_idx).abs() <= half

        mask = _FLEX[key] = create_block_mask(band, None, None, S, S, device=q.device)
    return _FLEX["fn"](q, k, v, block_mask=mask, scale=scale)


@functools.lru_cache(maxsize=1)
def _fa3():
    try:
        from fa3_fwd_interface import flash_attn_func
    except Exception as e:  # noqa: BLE001 - any import failure means: not available
        _KERNEL["fa3"] = f"unavailable: {type(e).__name__}: {e}"[:300]
        return None
    return flash_attn_func


def _fa3_window(q, k, v, half: int, scale=None):
    """FlashAttention-3's sliding window ([B, S, H, D] layout), or None (and flex from then on) where the wheel
    refuses it: ``fa3_fwd`` 0.0.3 is built with ``FLASHATTENTION_DISABLE_LOCAL``."""
    fn = _fa3()
    if fn is None or _KERNEL.get("fa3", "").startswith("failed"):
        return None
    try:
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                 window_size=(half, half))
    except Exception as e:  # noqa: BLE001 - the wheel's refusal, whatever it raises
        _KERNEL["fa3"] = f"failed: {type(e).__name__}: {e}"[:300]
        return None
    out = out[0] if isinstance(out, (tuple, list)) else out
    _KERNEL["cuda"] = "fa3"
    return out.transpose(1, 2)


def step_flops(f: "FastAttnSite", method: str, refresh: bool) -> tuple[float, float]:
    """(full attention's FLOPs, the method's) of one site at one step, whole model: QK^T and PV, 2 each per
    (query, key, head dim) multiply-add; WA-RS counts the band's pairs (the kernels compute whole tiles)."""
    B, H, Sq, Sk, D = f.geometry
    full = 4.0 * B * H * Sq * Sk * D
    win = 4.0 * B * H * window_pairs(Sq, half_width(Sq, f.window)) * D if Sq == Sk else full
    used = {"full": full, "ast": 0.0, "wars": win, "wars+asc": win / 2, "asc": full / 2}[method]
    if refresh:
        used += win / 2 if method == "asc" else win
    return full, used


# ---- the site's strategy and the model's run ------------------------------------------------------


@dataclass(frozen=True)
class FastAttnSite:
    """DiTFastAttn's part of one site's entry (`ditpass.runtime.sites.SiteStrategy.fast`)."""

    key: str  # how a plan file names the site: its module path ("#k" for a module's k-th site)
    index: int  # its position among the graph's sites: the calibration's bound is threshold * (index+1) / count
    count: int
    window: float  # the band's share of the sequence (`half_width`)
    methods: tuple[str, ...]  # the methods other than full this site may use here (see the module doc)
    geometry: tuple[int, int, int, int, int]  # B, H, Sq, Sk, D of the whole model at the captured sizes (FLOPs)
    cfg_group: str = ""  # ASC over the cfg ranks: their group ("" = both halves are in the local batch)
    cfg_rank: int = 0
    run: Any = field(default=None, compare=False, repr=False)  # the model's `FastAttnRun`

    def allowed(self, method: str) -> str:
        """``method`` as this site can run it (ASC or WA-RS dropped where the layout has no place for them)."""
        if method == "full" or method in self.methods:
            return method
        if method in _WITHOUT_ASC and _WITHOUT_ASC[method] in ("full",) + self.methods:
            return _WITHOUT_ASC[method]
        if method in _WITHOUT_WARS and _WITHOUT_WARS[method] in ("full",) + self.methods:
            return _WITHOUT_WARS[method]
        return "full"

    def plan(self) -> list[str]:
        """Its method at each step of the run's plan (empty before calibration)."""
        methods = (self.run.plan or {}).get(self.key, []) if self.run is not None else []
        return [self.allowed(m) for m in methods]

    def describe(self) -> str:
        """``fastattn 12W 4S 3F`` (methods counted over the steps), or what is still missing."""
        if self.run is None or self.run.plan is None:
            return "fastattn: not calibrated"
        counts: dict[str, int] = {}
        for m in self.plan():
            counts[CODES[m]] = counts.get(CODES[m], 0) + 1
        return "fastattn " + " ".join(f"{n}{c}" for c, n in counts.items())


class FastAttnRun:
    """DiTFastAttn's state of one model: the compression plan, the calibration in progress, and what the
    passes' reports show. One per `RunState` (`run_for`)."""

    def __init__(self, state: RunState, threshold: float, window: float, n_calib: int, source: str):
        self.state = state
        self.threshold, self.window, self.n_calib = threshold, window, n_calib
        self.source = source  # "calibrate" or the path the plan was loaded from
        self.plan: dict[str, list[str]] | None = None  # site key -> method per step
        self.keys: list[str] = []  # the sites in graph order (the first build's)
        self.site_methods: dict[str, tuple[str, ...]] = {}  # key -> what the site may use (the calibration's candidates)
        self.trial: dict[str, str] | None = None  # calibration: the methods of the forward being run (missing: full)
        self.writing = True  # whether this forward writes the caches (not during a calibration's trials)
        self.listeners: list[Callable[[], None]] = []  # refresh the passes' reports when the plan changes
        self._needs: dict[str, tuple[list[bool], list[bool]]] = {}  # key -> (write out at t, write R at t)
        self._last: dict[int, tuple[int, int]] = {}  # site id -> (generation, step) it last ran at

    # the plan ---------------------------------------------------------------------------------------

    def set_plan(self, plan: dict[str, list[str]]) -> None:
        check_plan(plan)
        self.plan = {k: list(v) for k, v in plan.items()}
        self._needs = {}
        for key, methods in self.plan.items():
            out = [t + 1 < len(methods) and methods[t + 1] == "ast" for t in range(len(methods))]
            res = []
            for t, m in enumerate(methods):
                need = False
                if m in _FULL_TYPE:
                    for later in methods[t + 1:]:
                        if later in _FULL_TYPE:
                            break
                        if later.startswith("wars"):
                            need = True
                            break
                res.append(need)
            self._needs[key] = (out, res)
        for refresh in self.listeners:
            refresh()

    @property
    def steps(self) -> int:
        return max((len(v) for v in (self.plan or {}).values()), default=0)

    def register(self, keys: list[str], methods: dict[str, tuple[str, ...]]) -> None:
        """The sites of one build; every build of a model has the same ones (another batch size, same paths)."""
        if not self.keys:
            self.keys = list(keys)
        self.site_methods.update(methods)

    def method(self, site: FastAttnSite, step: int) -> str:
        if self.trial is not None:
            return site.allowed(self.trial.get(site.key, "full"))
        if self.plan is None:
            raise RuntimeError(
                "Plan(fastattn=True) has no compression plan yet: run "
                "ditpass.runtime.fastattn.calibrate(pipe, inputs) before generating (or give fastattn='plan.json', "
                "a plan saved by an earlier calibration)")
        methods = self.plan.get(site.key)
        if methods is None or step >= len(methods):
            return "full"
        return site.allowed(methods[step])

    def needs(self, key: str, step: int) -> tuple[bool, bool]:
        """(write the output cache, refresh R) in this forward, at this step."""
        if not self.writing:
            return False, False
        if self.trial is not None:  # the calibration's committing forward: later steps are not chosen yet
            return True, True
        return self.plan_needs(key, step)

    def plan_needs(self, key: str, step: int) -> tuple[bool, bool]:
        """What the plan needs at this step: (the next step is AST, a WA-RS step follows before the next full one)."""
        out, res = self._needs.get(key, ((), ()))
        return (step < len(out) and out[step]), (step < len(res) and res[step])

    def guard(self, site: int, step: int, method: str) -> None:
        """One transformer call per scheduler step: a second one would reuse the first one's caches."""
        if self.trial is not None:
            return
        now = (self.state.generation, step)
        if method != "full" and self._last.get(site) == now:
            raise RuntimeError(
                f"DiTFastAttn: attention site {site} ran twice at step {step} of one generation; it needs one "
                f"transformer call per scheduler step (a pipeline that calls the transformer twice per step, e.g. "
                f"true CFG, can't use it)")
        self._last[site] = now


_RUNS: "weakref.WeakKeyDictionary[RunState, FastAttnRun]" = weakref.WeakKeyDictionary()


def run_for(state: RunState | None, plan) -> FastAttnRun:
    """The `FastAttnRun` of the model whose state is ``state`` (made on first use; a saved plan is loaded
    then). ``state`` None (a dry run): a run of its own, which never steps."""
    run = _RUNS.get(state) if state is not None else None
    if run is None:
        source = plan.fastattn if isinstance(plan.fastattn, str) else "calibrate"
        run = FastAttnRun(state if state is not None else RunState(), plan.fastattn_threshold, plan.fastattn_window,
                          plan.fastattn_calib, source)
        if isinstance(plan.fastattn, str):
            data = load_plan(plan.fastattn)
            if data["window"] != plan.fastattn_window and plan.fastattn_window != _default_window():
                from ditpass.errors import PlanError

                raise PlanError(
                    f"fastattn_window={plan.fastattn_window}: the saved plan {plan.fastattn!r} was calibrated with "
                    f"window {data['window']}; drop fastattn_window (the file's is used) or calibrate again")
            run.window, run.threshold, run.n_calib = data["window"], data["threshold"], data["n_calib"]
            run.set_plan(data["sites"])
        if state is not None:
            _RUNS[state] = run
    return run


def _default_window() -> float:
    from ditpass.plan import Plan

    return Plan.__dataclass_fields__["fastattn_window"].default


# ---- the op body ----------------------------------------------------------------------------------

_c10d = torch.ops._c10d_functional


def attend(s, q, k, v, attn_mask=None, sent=None, lengths=(), dropout_p=0.0, is_causal=False, scale=None,
           enable_gqa=False) -> torch.Tensor:
    """``ditpass::attention`` of a site with a DiTFastAttn strategy (``s.fast``): [B, H, S, D] out."""
    f: FastAttnSite = s.fast
    run: FastAttnRun = f.run
    state = run.state
    step = state.step_index
    method = run.method(f, step)
    if method in _WITHOUT_ASC and not f.cfg_group and q.shape[0] % 2:
        method = _WITHOUT_ASC[method]  # an odd batch has no halves
    run.guard(s.site, step, method)
    write_out, refresh = run.needs(f.key, step)
    refresh = refresh and method in _FULL_TYPE and "wars" in f.methods
    if method == "ast":
        if sent is not None:
            _c10d.wait_tensor(sent)  # the graph started the q/k/v all-to-all; finish it, use nothing
        out = _buffer(state, f"fastattn.{s.site}.out", _out_shape(q, v), q).clone().transpose(1, 2)
    elif method == "full" and not refresh:
        # the call the op makes without DiTFastAttn: bit-identical
        if s.seq is None:
            out = seq.attend(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        else:
            out = seq.seq_attention(q, k, v, scale, list(lengths), s.seq, mask=attn_mask, sent=sent)
    elif f.cfg_group and method in _WITHOUT_ASC:
        out = _asc_over_cfg(s, f, state, method, q, k, v, attn_mask, sent, lengths, scale, refresh)
    else:
        out = _run(s, f, state, method, q, k, v, attn_mask, sent, lengths, scale, refresh)
    if write_out:
        _buffer(state, f"fastattn.{s.site}.out", _out_shape(q, v), q).copy_(out.transpose(1, 2))
    return out


def _buffer(state: RunState, name: str, shape, ref: torch.Tensor) -> torch.Tensor:
    """`RunState.buffer` by shape (``ref``: dtype and device), without allocating once it exists. Allocated
    outside inference mode, so that the reset of a later generation may zero it wherever it runs."""
    buf = state.buffers.get(name)
    if buf is not None and tuple(buf.shape) == tuple(shape) and buf.dtype == ref.dtype and buf.device == ref.device:
        return buf
    with torch.inference_mode(False):
        return state.buffer(name, torch.empty(shape, dtype=ref.dtype, device=ref.device))


def _out_shape(q, v):
    """The output cache's shape: [B, S, H, Dv], the memory layout of the op's output."""
    B, H, S, _ = q.shape
    return (B, S, H, v.shape[-1])


def _run(s, f, state, method, q, k, v, mask, sent, lengths, scale, refresh):
    """A method other than AST on this rank: locally, or inside Ulysses' all-to-alls (r == 1: the whole
    sequence of h heads), where the window is computed in global token order."""
    res_name = f"fastattn.{s.site}.residual"
    if s.seq is None:
        return _compute(method, q, k, v, mask, scale, f.window, state, res_name, refresh)
    windowed = method.startswith("wars") or refresh

    def local(qh, kh, vh, m, lengths_, n, srcs):
        def fn(a, b, c):
            return _compute(method, a, b, c, m, scale, f.window, state, res_name, refresh)

        # full attention does not care about the keys' order; the band does (it is never masked: the pass)
        return _in_global_order(qh, kh, vh, lengths_, n, srcs, fn) if windowed else fn(qh, kh, vh)

    return seq.seq_attention(q, k, v, scale, list(lengths), s.seq, mask=mask, sent=sent, local=local)


def _rows(t, b):
    """The first ``b`` rows of a per-sample tensor (a mask may broadcast over the batch)."""
    return t if t is None or t.shape[0] == 1 else t[:b]


def _compute(method, q, k, v, mask, scale, window, state, res_name, refresh):
    """full / wars / asc / wars+asc over [B, h, S, D] (the whole sequence, in global order for the window)."""
    asc = method in _WITHOUT_ASC
    base = _WITHOUT_ASC.get(method, method)
    B = q.shape[0]
    if asc:
        b = B // 2
        q, k, v, mask = q[:b], k[:b], v[:b], _rows(mask, b)
    half = half_width(q.shape[-2], window)
    r = None
    if base == "full":
        out = seq.attend(q, k, v, mask, scale=scale)
        if refresh:
            r = out - window_attention(q, k, v, half, scale)
    else:
        R = _buffer(state, res_name, (B, *q.shape[1:]), q)
        out = window_attention(q, k, v, half, scale) + (R[: q.shape[0]] if asc else R)
    if asc:
        out = torch.cat([out, out])
        r = torch.cat([r, r]) if r is not None else None
    if r is not None:
        _buffer(state, res_name, r.shape, r).copy_(r)
    return out


@functools.lru_cache(maxsize=64)
def _order(lengths: tuple, n: int, srcs: tuple):
    """(slot of each global position, global position of each slot, order of the compacted keys) of the
    Ulysses layout, or None where the layout is already global order (one segment, nothing padded)."""
    q_pos = seq._positions(list(lengths), n, list(srcs), False, "cpu")
    total = sum(lengths)
    if q_pos.numel() == total and torch.equal(q_pos, torch.arange(total)):
        return None
    # the first slot of each position holds its real token (pad slots, later, repeat a segment's last token)
    first = torch.full((total,), q_pos.numel(), dtype=torch.long)
    first.scatter_reduce_(0, q_pos, torch.arange(q_pos.numel()), reduce="amin")
    k_pos = seq._positions(list(lengths), n, list(srcs), True, "cpu")
    return first, q_pos, torch.argsort(k_pos)


def _in_global_order(q, k, v, lengths, n, srcs, fn):
    """``fn`` on q, k, v ([B, h, ., D] in the Ulysses layout: q with pad slots, k/v compacted) put in global
    token order; its result put back into q's slots."""
    order = _order(tuple(int(x) for x in lengths), n, tuple(srcs))
    if order is None:
        return fn(q, k, v)
    first, q_pos, k_sort = (t.to(q.device) for t in order)
    out = fn(q.index_select(2, first), k.index_select(2, k_sort), v.index_select(2, k_sort))
    return out.index_select(2, q_pos)


def _asc_over_cfg(s, f, state, method, q, k, v, mask, sent, lengths, scale, refresh):
    """ASC when the two halves are on two cfg ranks: the first half's rank runs the method without ASC and
    broadcasts its output, and R where R is refreshed; the other rank computes nothing."""
    base = _WITHOUT_ASC[method]
    res_name = f"fastattn.{s.site}.residual"
    if f.cfg_rank == 0:
        out = _run(s, f, state, base, q, k, v, mask, sent, lengths, scale, refresh)
    else:
        if sent is not None:
            _c10d.wait_tensor(sent)
        out = q.new_empty(_out_shape(q, v)).transpose(1, 2)
    out = _broadcast(out.transpose(1, 2), f.cfg_group).transpose(1, 2)  # sent as [B, S, H, D] memory
    if refresh:
        R = state.buffers[res_name] if f.cfg_rank == 0 else _buffer(state, res_name, _residual_shape(s, q, lengths), q)
        R.copy_(_broadcast(R, f.cfg_group))
    return out


def _residual_shape(s, q, lengths):
    """R's shape on this rank: q's, or after Ulysses' all-to-all [B, h, S (global), D]."""
    if s.seq is None:
        return tuple(q.shape)
    B, H, _, D = q.shape
    return (B, seq.chunk_len(H, s.seq.u), sum(int(x) for x in lengths), D)


def _broadcast(t: torch.Tensor, group: str) -> torch.Tensor:
    """cfg rank 0's ``t`` on both cfg ranks (``src`` counts in the group)."""
    return _c10d.wait_tensor(_c10d.broadcast(t.contiguous(), 0, group))


# ---- calibration ----------------------------------------------------------------------------------


def _first_tensor(out) -> torch.Tensor:
    from torch.utils import _pytree as pytree

    return next(x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor))


def _error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """mean|y - ref| / mean|ref|, the same on every rank (the largest)."""
    err = ((y.float() - ref.float()).abs().mean() / ref.float().abs().mean().clamp_min(1e-12)).reshape(1)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
    return float(err)


def _calibrating_forward(run: FastAttnRun, forward, steps: list[dict[str, str]], log):
    """What the model's forward does while the calibration runs (see the module doc)."""

    def calibrated(*args, **kwargs):
        step = run.state.step_index
        run.trial, run.writing = {}, False  # the reference (and, on the first call, the build: keys known after)
        ref = forward(*args, **kwargs)
        if step == 0:
            chosen = {key: "full" for key in run.keys}
        else:
            ref_y = _first_tensor(ref)
            chosen = {}
            n = len(run.keys)
            for i, key in enumerate(run.keys):
                bound = run.threshold * (i + 1) / n
                chosen[key] = "full"
                for m in CANDIDATES:
                    if m not in run.site_methods.get(key, ()):
                        continue
                    run.trial = {**chosen, key: m}
                    err = _error(_first_tensor(forward(*args, **kwargs)), ref_y)
                    if err < bound:
                        chosen[key] = m
                        break
        while len(steps) < step:  # a step whose call we did not see: full attention
            steps.append({key: "full" for key in run.keys})
        run.trial, run.writing = chosen, True
        out = forward(*args, **kwargs)  # the chosen methods, writing the caches: what the scheduler gets
        if len(steps) == step:
            steps.append(chosen)
        log(f"fastattn calibration step {step}: " + " ".join(CODES[chosen[k]] for k in run.keys))
        return out

    return calibrated


def calibrate(pipe, inputs, *, save: str | os.PathLike | None = None, log: Callable[[str], None] | None = None,
              **call_kwargs) -> dict[str, list[str]]:
    """Choose the compression plan of every transformer of ``pipe`` parallelized with ``Plan(fastattn=True)``:
    one run of ``pipe(**call_kwargs)`` over ``n_calib`` of ``inputs`` (prompts, or class labels where the
    pipeline takes ``class_labels``; cycled to ``Plan.fastattn_calib`` of them). ``call_kwargs``: the
    generation's other settings (steps, guidance, generator), which the plan is for. Saves the plan to
    ``save`` (rank 0) and returns it (site key -> method per step)."""
    log = log or (lambda line: None)
    models = [m for name, m in pipe.components.items()
              if name.startswith("transformer") and getattr(getattr(m, "plan", None), "fastattn", None) is True]
    if not models:
        raise ValueError("calibrate: no transformer of this pipeline was parallelized with Plan(fastattn=True)")
    runs = [run_for(m.ditpass_state, m.plan) for m in models]
    params = inspect.signature(pipe.__call__).parameters
    arg = "class_labels" if "class_labels" in params else "prompt"
    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    call_kwargs = dict(call_kwargs)
    call_kwargs[arg] = [inputs[i % len(inputs)] for i in range(runs[0].n_calib)]
    chosen: list[list[dict[str, str]]] = [[] for _ in models]
    for m, run, steps in zip(models, runs, chosen):
        m.forward = _calibrating_forward(run, m.forward, steps, log)  # an instance attribute: removed below
    try:
        with torch.no_grad():
            pipe(**call_kwargs)
    finally:
        for m, run in zip(models, runs):
            m.__dict__.pop("forward", None)
            run.trial, run.writing = None, True
    plan: dict[str, list[str]] = {}
    for run, steps in zip(runs, chosen):
        if not steps:
            raise RuntimeError("calibrate: the pipeline never called the transformer")
        mine = {key: [s.get(key, "full") for s in steps] for key in run.keys}
        run.set_plan(mine)
        plan.update(mine)
    if save is not None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            save_plan(save, runs[0])
    return plan


# ---- the plan file --------------------------------------------------------------------------------


def check_plan(plan: dict) -> None:
    """A plan's methods: known names, full attention at step 0, every WA-RS after a full step (its R)."""
    from ditpass.errors import PlanError

    if not isinstance(plan, dict) or not plan:
        raise PlanError("fastattn plan: 'sites' must map site names to lists of methods, and name at least one")
    for key, methods in plan.items():
        if not isinstance(methods, list) or not methods:
            raise PlanError(f"fastattn plan: site {key!r}: give a list of methods, one per step")
        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise PlanError(f"fastattn plan: site {key!r}: unknown method(s) {bad}; methods: {', '.join(METHODS)}")
        if methods[0] != "full":
            raise PlanError(f"fastattn plan: site {key!r} starts with {methods[0]!r}: step 0 must be 'full' "
                            f"(the caches of AST and WA-RS are filled there)")


def save_plan(path, run: FastAttnRun) -> None:
    """The run's plan as a JSON file: its settings, then one line per site (method per step)."""
    head = {"format": FORMAT, "window": run.window, "threshold": run.threshold, "n_calib": run.n_calib,
            "steps": run.steps}
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in (run.plan or {}).items()]
    with open(path, "w") as f:
        f.write(json.dumps(head)[:-1] + ', "sites": {\n' + ",\n".join(lines) + "\n}}\n")


def load_plan(path) -> dict:
    """A saved plan file as a dict (validated); `PlanError` names what is wrong with it."""
    from ditpass.errors import PlanError

    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise PlanError(f"fastattn={str(path)!r}: cannot read the plan file: {e}") from None
    except json.JSONDecodeError as e:
        raise PlanError(f"fastattn={str(path)!r}: the plan file is not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PlanError(f"fastattn={str(path)!r}: not a DiTFastAttn plan (format {FORMAT!r}); save one with "
                        f"ditpass generate --use_fast_attn or calibrate(..., save=path)")
    check_plan(data.get("sites"))
    for name in ("window", "threshold", "n_calib"):
        if name not in data:
            raise PlanError(f"fastattn={str(path)!r}: the plan file has no {name!r}")
    return data
