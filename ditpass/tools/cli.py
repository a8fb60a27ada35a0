"""The ``ditpass`` command (also ``python -m ditpass``).

    ditpass inspect --model FluxTransformer2DModel --size full --plan ulysses=2 --svg flux.svg

Subcommands (each an ``_add_<name>(subparsers)`` that sets ``func``; add one the same way):

- ``generate``: run a diffusers pipeline (the built-in digits model by default) under a plan built
  from xDiT's flags, save the pictures (`ditpass.tools.generate`).
- ``run``: under ``torchrun``, parallelize a zoo transformer with ``--plan``, run it next to the
  single-device forward, print the explanation and the max difference (`ditpass.tools.verify`).
- ``inspect``: build a zoo model (on the ``meta`` device by default: no weights, no memory),
  capture it with the zoo's symbolic dims, analyse it and print `ditpass.explain`. With
  ``--plan`` the transformer passes run once, in this process, as rank 0 of the plan's world:
  a dry run that shows the rewrite; the graph is not executed.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
import time

__all__ = ["main", "build_parser"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except _UsageError as e:
        parser.exit(2, f"ditpass {args.command}: error: {e}\n")
    except KeyboardInterrupt:
        return 130


class _UsageError(Exception):
    """A bad argument; printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditpass", description="Compiler passes that parallelize DiT inference.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_inspect(sub)
    _add_run(sub)
    _add_generate(sub)
    return parser


# ---- generate ---------------------------------------------------------------------------------


def _add_generate(sub) -> None:
    from . import generate

    p = sub.add_parser("generate", help="run a pipeline (default: the built-in digits model) under a plan, save images",
                       description=generate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_arguments(p)
    p.set_defaults(func=generate.run)


# ---- run --------------------------------------------------------------------------------------


def _add_run(sub) -> None:
    from . import verify

    p = sub.add_parser("run", help="parallelize a zoo transformer under torchrun, compare with one device, explain",
                       description=verify.__doc__)
    verify.add_arguments(p)
    p.set_defaults(func=verify.run)


# ---- inspect ----------------------------------------------------------------------------------


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="capture and analyse a zoo model, optionally dry-run a plan, and explain",
                       description="Capture a model of the zoo (ditpass.models), analyse it and print what ditpass "
                                   "sees; with --plan, run the passes as rank 0 of the plan's world (dry run: "
                                   "nothing is executed).")
    p.add_argument("--model", required=True, help="zoo class name, e.g. FluxTransformer2DModel")
    p.add_argument("--size", default="tiny", help="tiny (default), full, or another size the zoo has for the model")
    p.add_argument("--plan", help='degrees such as "ulysses=2,ring=2", or the path of a JSON plan')
    p.add_argument("--height", type=int, help="image height in pixels (default: the zoo's for this size)")
    p.add_argument("--width", type=int, help="image width in pixels")
    p.add_argument("--frames", type=int, help="video frames as decoded (video models)")
    p.add_argument("--text-len", type=int, help="text tokens")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of weights and inputs; sets the bytes per collective "
                        "(default: float32 for tiny, bfloat16 otherwise)")
    p.add_argument("--device", default="meta",
                   help="where the model is built: meta (default: no weights, nothing runs) or cpu")
    p.add_argument("--svg", metavar="OUT.svg", help="write a picture of the (rewritten) graph")
    p.add_argument("--json", metavar="OUT.json", help="write the explanation as JSON")
    p.add_argument("--graph", action="store_true", help="also print the rewritten graph's code")
    p.add_argument("--all-rows", action="store_true",
                   help="one row per attention site and collective (default: runs of equal blocks folded)")
    p.set_defaults(func=_inspect)


def _inspect(args) -> int:
    import torch

    from ditpass.capture import CaptureError, capture
    from ditpass.tools.explain import dry_run, explain
    from ditpass.models import NAMES, SIZES, build, dynamic_dims, make_inputs
    from ditpass.pass_base import PassError
    from ditpass.plan import Plan, PlanError

    if args.model not in NAMES:
        close = difflib.get_close_matches(args.model, NAMES, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise _UsageError(f"unknown model {args.model!r}{hint}; the zoo has: {', '.join(NAMES)}")
    if args.size not in SIZES[args.model]:
        raise _UsageError(f"{args.model} has sizes {', '.join(SIZES[args.model])}, not {args.size!r}")
    plan = None
    if args.plan:
        try:
            plan = Plan.parse(args.plan)
        except (PlanError, OSError) as e:
            raise _UsageError(f"--plan: {e}") from None
    dtype = getattr(torch, args.dtype or ("float32" if args.size == "tiny" else "bfloat16"))
    geometry = dict(height=args.height, width=args.width, frames=args.frames, text_len=args.text_len)
    timings: dict[str, float] = {}
    notes: list[str] = []

    t0 = time.perf_counter()
    try:
        model = build(args.model, args.size, device=args.device, dtype=dtype)
        inputs = make_inputs(args.model, args.size, device=args.device, dtype=dtype, **geometry)
    except ValueError as e:
        raise _UsageError(str(e)) from None
    try:
        spec = dynamic_dims(args.model, args.size, **geometry)
        notes.append("symbolic dims: the zoo's dynamic_dims")
    except Exception as e:  # noqa: BLE001 - any failure falls back to automatic dims, and says so
        spec = "auto"
        notes.append(f"symbolic dims: auto (the zoo's dynamic_dims failed: {type(e).__name__}: {e})")
    timings["build"] = time.perf_counter() - t0

    t = time.perf_counter()
    try:
        captured = capture(model, dynamic_shapes=spec, **inputs)
    except CaptureError as e:
        hint = " (on the meta device; try --device cpu)" if args.device == "meta" else ""
        print(f"ditpass inspect: capture failed{hint}:\n{e}", file=sys.stderr)
        return 1
    timings["capture"] = time.perf_counter() - t

    t = time.perf_counter()
    if plan is not None:
        try:
            result = dry_run(captured, plan)
        except PlanError as e:
            raise _UsageError(f"--plan: {e}") from None
        except PassError as e:  # the plan does not fit this model (a pass says why): one line, exit 2
            raise _UsageError(f"--plan {args.plan}: {e}") from None
        exp = explain(result, graph=args.graph)
        gm = result.graph_module
    else:
        exp = explain(captured, graph=args.graph)
        gm = captured.graph_module
    timings["analysis+passes"] = time.perf_counter() - t

    if args.svg:
        t = time.perf_counter()
        from ditpass.tools.render import to_svg

        what = f"{plan}, dry run as rank 0 of {plan.world_size}" if plan is not None else "captured graph"
        to_svg(gm, args.svg, title=f"{args.model} ({args.size}, {str(dtype).replace('torch.', '')}): {what}")
        timings["svg"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    exp.header["dtype"] = str(dtype).replace("torch.", "")
    exp.header["size"] = args.size
    exp.header["device"] = args.device
    exp.header["notes"] = notes + [
        "timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())]
    exp.header["timings"] = {k: round(v, 2) for k, v in timings.items()}
    print(exp.text(condense=not args.all_rows), end="")
    if args.svg:
        print(f"\nwrote {args.svg}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(exp.to_dict(), f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0
