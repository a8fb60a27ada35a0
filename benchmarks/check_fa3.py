"""GPU check of ``Plan(attention="fa3")`` (ditpass/runtime/fa3.py) on one Hopper GPU, FLUX.1 shapes, bf16.

1. environment: torch, GPU, whether ``fa3_fwd_interface`` imports, the dtypes the build runs, what "auto" picks;
2. numerics: ``ditpass::fa3_attention`` against SDPA's cuDNN kernel and a float32 reference (first queries),
   output and lse (natural log or log2?), in FA3's [B, S, H, D] layout and in ditpass's [B, H, S, D] views;
3. timing: median of CUDA-event timings, FA3 vs SDPA cuDNN / flash, and the lse kernels ring attention uses;
4. ring: K/V cut in two (even and uneven), partial results merged by ``seq.merge_lse``, against full attention;
5. torch.compile (mode="max-autotune-no-cudagraphs", fullgraph) of projections + FA3 + output projection;
6. CUDA graphs: the op captured by hand and replayed on new inputs, the ring merge captured, and
   torch.compile(mode="reduce-overhead").

    pip install --no-deps .whl/fa3_fwd-*.whl     # once
    python benchmarks/check_fa3.py               # from the repository root; needs no diffusers

Each section runs on its own (an error is printed and recorded, the rest goes on); prints Markdown tables at
the end, also written to $OUT/check_fa3.md when OUT is set. Exit status 0 unless no CUDA device is visible.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ditpass.runtime import fa3, seq  # noqa: E402

SHAPES = [(1, 4608, 24, 128), (1, 16896, 24, 128)]  # FLUX.1 at 1024x1024 and 2048x2048: [B, S, H, D]
DT = torch.bfloat16
ROWS: list[list[str]] = []   # | section | case | result | value | note |
TIMES: list[list[str]] = []  # | shape | kernel | ms | TFLOP/s |


def row(section, case, ok, value="", note=""):
    result = {True: "PASS", False: "FAIL", None: "info"}.get(ok, str(ok))
    ROWS.append([section, case, result, value, note])
    print(f"[{section}] {case}: {result} {value} {note}", flush=True)


def section(name):
    """Run the decorated function now; an exception becomes an ERROR row and the script goes on."""
    def run(fn):
        t0 = time.time()
        print(f"\n=== {name} ===", flush=True)
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report and carry on
            traceback.print_exc()
            row(name, "section", "ERROR", f"{type(e).__name__}: {e}"[:300])
        finally:
            try:
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - a sticky CUDA error: the later sections will say so too
                row(name, "synchronize", "ERROR", f"{type(e).__name__}: {e}"[:200])
            print(f"--- {name}: {time.time() - t0:.1f} s", flush=True)
        return fn
    return run


def qkv(B, S, H, D, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, S, H, D, device="cuda", dtype=DT, generator=g) for _ in range(3)]


def bhsd(*ts):
    return [t.transpose(1, 2) for t in ts]


def cudnn_sdpa(q, k, v):
    """SDPA's cuDNN kernel on [B, H, S, D] views."""
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def cudnn_lse(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]
    return out, lse.reshape(lse.shape[0], lse.shape[1], lse.shape[2])


def ref32(q, k, v, n=256):
    """float32 attention and lse ([B, H, n, D], [B, H, n]) of the first n queries ([B, H, S, D] in)."""
    s = (q[:, :, :n].float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = s.logsumexp(-1)
    return torch.softmax(s, -1) @ v.float(), lse


def diff(a, b):
    d = (a.float() - b.float()).abs()
    return float(d.max()), float(d.mean())


def cuda_ms(fn, warmup=5, iters=25):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def shape_name(shape):
    return "[" + ", ".join(map(str, shape)) + "]"


# ---- 1. environment --------------------------------------------------------------------------------------

if not torch.cuda.is_available():
    print("no CUDA device visible: nothing to check")
    sys.exit(1)

DEV = torch.device("cuda")


@section("environment")
def _():
    cap = torch.cuda.get_device_capability()
    row("environment", "torch", None, torch.__version__,
        f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    row("environment", "GPU", None, torch.cuda.get_device_name(), f"compute capability {cap[0]}.{cap[1]}")
    try:
        from importlib.metadata import version
        ver = version("fa3_fwd")
    except Exception as e:  # noqa: BLE001
        ver = f"? ({type(e).__name__})"
    row("environment", "fa3_fwd imports", fa3.available(), f"version {ver}")
    if not fa3.available():
        try:
            import fa3_fwd_interface  # noqa: F401 - for the error message
        except Exception as e:  # noqa: BLE001
            row("environment", "import error", None, f"{type(e).__name__}: {e}"[:300])
    row("environment", "dtypes of the build", None, ", ".join(sorted(str(d) for d in fa3.dtypes())))
    row("environment", "device_ok (Hopper)", fa3.device_ok(DEV))
    q, k, v = bhsd(*qkv(1, 256, 24, 128))
    with seq.sdpa_backend("auto"):
        row("environment", "auto picks fa3 (bf16, no mask)", seq._use_fa3(q, k, v))
        row("environment", "auto skips fp16 (build without fp16)",
            not seq._use_fa3(q.half(), k.half(), v.half()) if torch.float16 not in fa3.dtypes() else None)
        row("environment", "auto skips a mask", not seq._use_fa3(q, k, v, torch.ones(1, 1, 256, 256, device=DEV,
                                                                                         dtype=torch.bool)))
    try:
        fa3.require(DEV)
        row("environment", "fa3.require(cuda)", True)
    except Exception as e:  # noqa: BLE001
        row("environment", "fa3.require(cuda)", False, str(e)[:300])
    if torch.float16 not in fa3.dtypes():  # confirm the build really refuses fp16 (else dtypes() is too strict)
        try:
            torch.ops.ditpass.fa3_attention(*[t.half() for t in qkv(1, 256, 24, 128)], None)
            row("environment", "fp16 refused by the build", False, "fp16 ran: fa3.dtypes() could allow it")
        except Exception as e:  # noqa: BLE001
            row("environment", "fp16 refused by the build", True, f"{type(e).__name__}: {e}"[:120])


if not fa3.available():
    print("\nfa3_fwd_interface does not import: install it with pip install --no-deps .whl/fa3_fwd-*.whl")


# ---- 2. numerics -----------------------------------------------------------------------------------------

for SHAPE in SHAPES:
    @section(f"numerics {shape_name(SHAPE)}")
    def _(SHAPE=SHAPE):
        name = f"numerics {shape_name(SHAPE)}"
        q, k, v = qkv(*SHAPE)
        out, lse = torch.ops.ditpass.fa3_attention(q, k, v, None)
        row(name, "op out: shape, contiguous", tuple(out.shape) == SHAPE and out.is_contiguous(),
            f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
        row(name, "op lse: [B, H, S] float32", tuple(lse.shape) == (SHAPE[0], SHAPE[2], SHAPE[1])
            and lse.dtype == torch.float32 and lse.is_contiguous(), f"{tuple(lse.shape)} {lse.dtype}")
        qb, kb, vb = bhsd(q, k, v)
        ref = cudnn_sdpa(qb, kb, vb).transpose(1, 2)
        mx, mean = diff(out, ref)
        row(name, "out vs SDPA cuDNN", mx < 2e-2 and mean < 1e-3, f"max {mx:.2e} mean {mean:.2e}",
            "issue measured max 1e-3")
        o32, l32 = ref32(qb, kb, vb)
        e_fa3, e_cudnn = diff(out.transpose(1, 2)[:, :, :256], o32), diff(ref.transpose(1, 2)[:, :, :256], o32)
        row(name, "out vs float32 (first 256 queries)", e_fa3[0] < 2e-2,
            f"fa3 max {e_fa3[0]:.2e} mean {e_fa3[1]:.2e}", f"cuDNN max {e_cudnn[0]:.2e} mean {e_cudnn[1]:.2e}")
        nat = float((lse[:, :, :256] - l32).abs().max())
        log2 = float((lse[:, :, :256] - l32 / math.log(2)).abs().max())
        row(name, "lse natural log (vs float32)", nat < 1e-2, f"max {nat:.2e}", f"as log2: max {log2:.2e}")
        _, lse_c = cudnn_lse(qb, kb, vb)
        mx, _ = diff(lse, lse_c)
        row(name, "lse vs cuDNN's lse", mx < 1e-2, f"max {mx:.2e}")
        # ditpass's layout: [B, H, S, D] views of [B, S, H, D] memory in, the same out, no copy
        ob, lb = fa3.attention(qb, kb, vb)
        row(name, "fa3.attention on [B, H, S, D] views", torch.equal(ob.transpose(1, 2), out) and torch.equal(lb, lse)
            and ob.transpose(1, 2).is_contiguous(), f"strides {ob.stride()}")
        # [B, H, S, D]-contiguous memory (FA3 then reads strided [B, S, H, D])
        qc, kc, vc = (t.contiguous() for t in (qb, kb, vb))
        oc, _ = fa3.attention(qc, kc, vc)
        mx = diff(oc, ob)[0]
        row(name, "fa3.attention on [B, H, S, D]-contiguous", mx < 1e-2, f"max {mx:.2e}",
            "bitwise equal" if torch.equal(oc, ob) else "")
        with seq.sdpa_backend("fa3"):
            used = seq._use_fa3(qb, kb, vb)
            o2 = seq.attend(qb, kb, vb)
        row(name, "seq.attend under 'fa3' uses it", used and torch.equal(o2, ob))


def _sdpa_flash(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def _lse_under(name, q, k, v):
    with seq.sdpa_backend(name):
        return seq.sdpa_lse(q, k, v)


# ---- 3. timing -------------------------------------------------------------------------------------------

for SHAPE in SHAPES:
    @section(f"timing {shape_name(SHAPE)}")
    def _(SHAPE=SHAPE):
        B, S, H, D = SHAPE
        flops = 4.0 * B * H * S * S * D
        q, k, v = qkv(*SHAPE)
        qb, kb, vb = bhsd(q, k, v)
        qc, kc, vc = (t.contiguous() for t in (qb, kb, vb))
        cases = [
            ("fa3 op, [B, S, H, D] contiguous", lambda: torch.ops.ditpass.fa3_attention(q, k, v, None)),
            ("fa3 via ditpass views (fa3.attention)", lambda: fa3.attention(qb, kb, vb)),
            ("fa3 on [B, H, S, D]-contiguous", lambda: fa3.attention(qc, kc, vc)),
            ("SDPA cuDNN", lambda: cudnn_sdpa(qb, kb, vb)),
            ("SDPA cuDNN, [B, H, S, D]-contiguous", lambda: cudnn_sdpa(qc, kc, vc)),
            ("SDPA flash (FA2)", lambda: _sdpa_flash(qb, kb, vb)),
            ("ring kernel: seq.sdpa_lse, 'cudnn'", lambda: _lse_under("cudnn", qb, kb, vb)),
            ("ring kernel: seq.sdpa_lse, 'fa3'", lambda: _lse_under("fa3", qb, kb, vb)),
        ]
        for label, fn in cases:
            try:
                ms = cuda_ms(fn)
                TIMES.append([shape_name(SHAPE), label, f"{ms:.3f}", f"{flops / ms / 1e9:.0f}"])
                print(f"{label}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
            except Exception as e:  # noqa: BLE001
                TIMES.append([shape_name(SHAPE), label, "error", f"{type(e).__name__}: {e}"[:120]])
                print(f"{label}: {type(e).__name__}: {e}", flush=True)


# ---- 4. ring: partial attentions merged by lse -----------------------------------------------------------

def ring_merge(qb, kb, vb, cut):
    """Attention over keys [0, cut) and [cut, S) separately (`seq.sdpa_lse`), merged (`seq.merge_lse`)."""
    acc, lse = None, None
    for lo, hi in ((0, cut), (cut, kb.shape[2])):
        o, l = seq.sdpa_lse(qb, kb[:, :, lo:hi], vb[:, :, lo:hi])
        acc, lse = seq.merge_lse(acc, lse, o, l)
    return acc.to(qb.dtype), lse


for SHAPE in SHAPES:
    @section(f"ring {shape_name(SHAPE)}")
    def _(SHAPE=SHAPE):
        name = f"ring {shape_name(SHAPE)}"
        q, k, v = qkv(*SHAPE)
        qb, kb, vb = bhsd(q, k, v)
        full, full_lse = fa3.attention(qb, kb, vb)
        ref = cudnn_sdpa(qb, kb, vb)
        S = SHAPE[1]
        for cut, what in ((S // 2, "halves"), (S // 3 + 5, "uneven (S/3 + 5)")):
            with seq.sdpa_backend("fa3"):
                used = seq._use_fa3(qb, kb[:, :, :cut], vb[:, :, :cut])
                merged, lse = ring_merge(qb, kb, vb, cut)
            with seq.sdpa_backend("cudnn"):
                merged_c, _ = ring_merge(qb, kb, vb, cut)
            mf, mm = diff(merged, full)
            row(name, f"{what}: merged vs full fa3", used and mf < 2e-2 and mm < 1e-3, f"max {mf:.2e} mean {mm:.2e}",
                f"fa3 used: {used}")
            ml = float((lse - full_lse).abs().max())
            row(name, f"{what}: merged lse vs full lse", ml < 1e-3, f"max {ml:.2e}")
            mr, mrm = diff(merged, ref)
            mc, mcm = diff(merged_c, ref)
            row(name, f"{what}: merged vs full SDPA cuDNN", mr < 2e-2, f"max {mr:.2e} mean {mrm:.2e}",
                f"cuDNN ring merge: max {mc:.2e} mean {mcm:.2e}")


# ---- 5. torch.compile ------------------------------------------------------------------------------------

class Block(torch.nn.Module):
    """q/k/v projection, attention through ditpass's FA3 path, output projection: what inductor sees around it."""

    def __init__(self, H=24, D=128):
        super().__init__()
        self.H, self.D = H, D
        self.qkv = torch.nn.Linear(H * D, 3 * H * D, bias=False)
        self.out = torch.nn.Linear(H * D, H * D, bias=False)

    def forward(self, x):  # x [B, S, H*D]
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.H, self.D).unbind(2)
        o, lse = fa3.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out(o.transpose(1, 2).reshape(B, S, self.H * self.D)), lse


def block_inputs(S=4608, H=24, D=128):
    torch.manual_seed(0)
    blk = Block(H, D).to(DEV, DT).eval()
    x = torch.randn(1, S, H * D, device=DEV, dtype=DT)
    return blk, x


@section("torch.compile max-autotune-no-cudagraphs")
def _():
    name = "compile max-autotune-no-cudagraphs"
    from torch._inductor.utils import run_and_get_code

    blk, x = block_inputs()
    with torch.no_grad():
        eager_out, eager_lse = blk(x)
        torch._dynamo.reset()
        comp = torch.compile(blk, mode="max-autotune-no-cudagraphs", fullgraph=True)
        t0 = time.time()
        (out, lse), codes = run_and_get_code(comp, x)
        row(name, "compiles (fullgraph)", True, f"{time.time() - t0:.0f} s first call")
        n_op = sum(c.count("ditpass.fa3_attention") for c in codes)
        row(name, "fa3 op kept as one call in the code", n_op >= 1, f"{n_op} mention(s) in the generated code")
        mx, mean = diff(out, eager_out)
        scale = float(eager_out.float().abs().max())
        row(name, "out vs eager", mx <= 3e-2 * scale, f"max {mx:.2e} mean {mean:.2e}", f"eager's max abs {scale:.2f}")
        ml = float((lse - eager_lse).abs().max())
        row(name, "lse vs eager", ml < 5e-2, f"max {ml:.2e}")
        ms_e, ms_c = cuda_ms(lambda: blk(x)), cuda_ms(lambda: comp(x))
        row(name, "block time (eager / compiled)", None, f"{ms_e:.3f} / {ms_c:.3f} ms")


# ---- 6. CUDA graphs --------------------------------------------------------------------------------------

def capture(fn):
    """``fn()`` captured in a CUDA graph (warmed up on a side stream first); returns (graph, static outputs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = fn()
    return g, outs


def _probe_raw_capture(name, q, k, v):
    """Where capturing the op fails: does FA3's C++ kernel alone capture (then the Python wrapper is to blame)?"""
    try:
        torch.cuda.synchronize()
        fwd = torch.ops.fa3_fwd._flash_attn_forward
        capture(lambda: fwd(q, k, v, softmax_scale=q.shape[-1] ** -0.5)[:2])
        row(name, "fa3_fwd::_flash_attn_forward alone captures", True, "", "the failure is in the wrapper above it")
    except Exception as e:  # noqa: BLE001
        row(name, "fa3_fwd::_flash_attn_forward alone captures", False, f"{type(e).__name__}: {e}"[:200])


@section("CUDA graphs: the op")
def _():
    name = "CUDA graph: op"
    q, k, v = qkv(*SHAPES[0])
    try:
        g, (out, lse) = capture(lambda: torch.ops.ditpass.fa3_attention(q, k, v, None))
    except Exception:
        _probe_raw_capture(name, q, k, v)
        raise
    row(name, "captures", True)
    for i, seed in enumerate((1, 2)):
        for t, new in zip((q, k, v), qkv(*SHAPES[0], seed=seed)):
            t.copy_(new)
        g.replay()
        torch.cuda.synchronize()
        e_out, e_lse = torch.ops.ditpass.fa3_attention(q, k, v, None)
        mx, ml = diff(out, e_out)[0], float((lse - e_lse).abs().max())
        row(name, f"replay {i + 1} on new inputs vs eager", mx < 1e-3 and ml < 1e-4, f"max {mx:.2e}, lse max {ml:.2e}",
            "bitwise equal" if torch.equal(out, e_out) and torch.equal(lse, e_lse) else "")
    ms_g = cuda_ms(g.replay)
    row(name, "replay time", None, f"{ms_g:.3f} ms", shape_name(SHAPES[0]))


@section("CUDA graphs: ring merge")
def _():
    name = "CUDA graph: ring merge"
    q, k, v = qkv(*SHAPES[0])
    qb, kb, vb = bhsd(q, k, v)
    S = SHAPES[0][1]

    def step():
        with seq.sdpa_backend("fa3"):
            return ring_merge(qb, kb, vb, S // 3 + 5)

    g, (out, lse) = capture(step)
    row(name, "captures", True)
    for t, new in zip((q, k, v), qkv(*SHAPES[0], seed=3)):
        t.copy_(new)
    g.replay()
    torch.cuda.synchronize()
    e_out, e_lse = step()
    mx, ml = diff(out, e_out)[0], float((lse - e_lse).abs().max())
    row(name, "replay on new inputs vs eager", mx < 1e-3 and ml < 1e-4, f"max {mx:.2e}, lse max {ml:.2e}",
        "bitwise equal" if torch.equal(out, e_out) and torch.equal(lse, e_lse) else "")


@section("CUDA graphs: torch.compile reduce-overhead")
def _():
    name = "compile reduce-overhead"
    from torch._dynamo.utils import counters

    blk, x = block_inputs()
    with torch.no_grad():
        eager_out, _ = blk(x)
        torch._dynamo.reset()
        counters.clear()
        comp = torch.compile(blk, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # cudagraph trees record on the 2nd or 3rd call
            out, _ = comp(x)
        out = out.clone()
        skips = dict(counters["inductor"])
        skipped = {k: v for k, v in skips.items() if "cudagraph_skip" in k}
        row(name, "cudagraphs not skipped", not skipped, str(skipped) if skipped else "no cudagraph_skips counted")
        mx, mean = diff(out, eager_out)
        scale = float(eager_out.float().abs().max())
        row(name, "out vs eager", mx <= 3e-2 * scale, f"max {mx:.2e} mean {mean:.2e}")
        x2 = torch.randn_like(x)
        out2 = comp(x2)[0].clone()
        e2 = blk(x2)[0]
        mx2, _ = diff(out2, e2)
        row(name, "new input vs eager", mx2 <= 3e-2 * float(e2.float().abs().max()), f"max {mx2:.2e}")
        ms_c = cuda_ms(lambda: comp(x))
        row(name, "block time (graphed)", None, f"{ms_c:.3f} ms")


# ---- report ----------------------------------------------------------------------------------------------

def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in r) + " |" for r in rows]
    return "\n".join(lines)


report = "\n\n".join([
    "## check_fa3: Plan(attention=\"fa3\") on " + torch.cuda.get_device_name(),
    table(["section", "check", "result", "value", "note"], ROWS),
    "### timing (median of 25 CUDA-event timings; TFLOP/s = 4 B H S^2 D / t)",
    table(["shape [B, S, H, D]", "kernel", "ms", "TFLOP/s"], TIMES),
    f"{sum(r[2] == 'PASS' for r in ROWS)} PASS, {sum(r[2] == 'FAIL' for r in ROWS)} FAIL, "
    f"{sum(r[2] == 'ERROR' for r in ROWS)} ERROR",
])
print("\n" + report)
if os.environ.get("OUT"):
    (Path(os.environ["OUT"]) / "check_fa3.md").write_text(report + "\n")
