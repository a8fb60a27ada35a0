"""FlashAttention-3 (the ``fa3-fwd`` package: forward only, Hopper) as the kernel of ``Plan(attention="fa3")``.

Legend: ``B`` batch, ``S`` query tokens, ``Sk`` key tokens, ``H`` heads, ``D`` head dim.

    out_BSHD, lse_BHS = torch.ops.ditpass.fa3_attention(q_BSHD, k_BSkHD, v_BSkHD, scale)

One custom op with a fake, so that ``torch.compile`` (inductor) and CUDA graphs see one opaque kernel with
true shapes and strides; its body imports ``fa3_fwd_interface`` only when it runs, so ditpass imports and
compiles without the package.

Layout: FA3 takes token-major [B, S, H, D] tensors and needs only the last dim contiguous (any other
strides); ditpass's attention tensors are [B, H, S, D] values, mostly in [B, S, H, D] memory (the
projections' output, the Ulysses all-to-all buffer), so `attention`'s transposes on the way in are views,
no copy. FA3's output is a fresh contiguous [B, S, H, D]: transposed back, it is exactly the layout that
``ditpass::attention`` promises ([B, H, S, D] values in [B, S, H, D] memory, `ditpass.runtime.ops`), again
no copy. The lse is float32 [B, H, S] in natural log, like the SDPA kernels' (`seq.merge_lse` takes it).

The fa3-fwd 0.0.3 wheel is built without fp16 (``FLASHATTENTION_DISABLE_FP16``, read from its
``fa3_fwd_config``), so bf16 only there; head dims up to 256 in multiples of 8.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from ..errors import PlanError

__all__ = ["fa3_attention", "attention", "available", "dtypes", "device_ok", "runs", "require", "INSTALL"]

INSTALL = ("pip install 'ditpass[fa3]' (the fa3-fwd package: FlashAttention-3 forward, built for Hopper), "
           "or its wheel: pip install --no-deps fa3_fwd-0.0.3-*.whl")
_AUTO = " (FA3 where it runs, else SDPA's choice)"  # what the errors' alternative, attention='auto', does
_import_error = ""  # why ``fa3_fwd_interface`` did not import, for `require`'s message


@functools.lru_cache(maxsize=None)
def _interface():
    """The ``fa3_fwd_interface`` module, or None where it does not import (imported once)."""
    global _import_error
    try:
        import fa3_fwd_interface
    except Exception as e:  # noqa: BLE001 - any failure (missing, a CUDA or torch ABI mismatch) means: not available
        _import_error = f"{type(e).__name__}: {e}"[:300]
        return None
    return fa3_fwd_interface


def available() -> bool:
    """Whether ``fa3_fwd_interface`` imports here."""
    return _interface() is not None


@functools.lru_cache(maxsize=None)
def dtypes() -> frozenset:
    """The dtypes the installed build runs: bf16, and fp16 unless its config says it was built without."""
    try:
        from fa3_fwd_config import CONFIG
        fp16 = not CONFIG["build_flags"].get("FLASHATTENTION_DISABLE_FP16", False)
    except Exception:  # noqa: BLE001 - no readable config: assume the published wheel's (no fp16)
        fp16 = False
    return frozenset({torch.bfloat16, torch.float16} if fp16 else {torch.bfloat16})


@functools.lru_cache(maxsize=None)
def device_ok(device: torch.device) -> bool:
    """Whether FA3 runs on ``device``: a CUDA GPU of compute capability 9.x (Hopper: H100, H200, H20)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def runs(q, k, v, mask=None, dropout_p: float = 0.0, is_causal: bool = False, enable_gqa: bool = False) -> bool:
    """Whether FA3 computes exactly this SDPA call (``q, k, v`` [B, H, S, D]), device aside: no mask, no
    dropout, not causal (FA3 aligns the causal mask bottom-right, SDPA top-left), a dtype of this build,
    one head dim of at most 256 in multiples of 8, key heads equal to the query heads (or dividing them
    with ``enable_gqa``, grouped as SDPA groups them)."""
    if mask is not None or dropout_p != 0.0 or is_causal or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in dtypes():
        return False
    B, H, S, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    if v.shape[-1] != D or D % 8 or D > 256 or min(B, S, Sk, Hk) == 0:
        return False
    return Hk == H or (enable_gqa and H % Hk == 0)


def require(device: Optional[torch.device] = None) -> None:
    """Raise `PlanError` where ``Plan(attention="fa3")`` cannot run: the package does not import, or
    ``device`` (where given) is not a Hopper GPU."""
    if not available():
        raise PlanError(f"attention='fa3' needs FlashAttention-3's fa3_fwd_interface, which does not import here "
                        f"({_import_error}): {INSTALL}; or use attention='auto'{_AUTO}")
    if device is not None and not device_ok(device):
        what = (f"{torch.cuda.get_device_name(device)} (compute capability "
                f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))})" if device.type == "cuda"
                else f"device {device}")
        raise PlanError(f"attention='fa3': FlashAttention-3 runs on Hopper GPUs (CUDA compute capability 9.x) only, "
                        f"and this attention runs on {what}: use attention='auto'{_AUTO}")


@torch.library.custom_op("ditpass::fa3_attention", mutates_args=())
def fa3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-3 of ``q`` [B, S, H, D] over ``k, v`` [B, Sk, Hk, D]: (out [B, S, H, D] contiguous,
    lse float32 [B, H, S] contiguous, natural log); ``scale`` None = 1 / sqrt(D)."""
    interface = _interface()
    if interface is None:
        require()  # raises, naming the fix
    out, lse = interface.flash_attn_func(q, k, v, softmax_scale=scale, return_attn_probs=True)[:2]
    # the fake promises contiguous results; FA3 allocates them so (a no-op), but a copy beats a wrong stride
    return out.contiguous(), lse.contiguous()


@fa3_attention.register_fake
def _(q, k, v, scale=None):
    B, S, H, _ = q.shape
    return q.new_empty((B, S, H, v.shape[-1])), q.new_empty((B, H, S), dtype=torch.float32)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """FA3 in ditpass's layout: ``q, k, v`` [B, H, S, D] in, (out [B, H, S, D] in [B, S, H, D] memory,
    lse float32 [B, H, S]) out; every transpose a view."""
    out, lse = torch.ops.ditpass.fa3_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
    return out.transpose(1, 2), lse
