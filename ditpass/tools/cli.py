"""The ``ditpass`` command (also ``python -m ditpass``).

    ditpass inspect --model FluxTransformer2DModel --size full --plan ulysses=2 --svg flux.svg

Subcommands (each an ``_add_<name>(subparsers)`` that sets ``func``; add one the same way):

- ``generate``: run a diffusers pipeline (the built-in digits model by default) under a plan built
  from xDiT's flags, save the pictures (`ditpass.tools.generate`).
- ``serve``: an HTTP service (FastAPI on rank 0) that generates each request on every rank together under a
  plan (`ditpass.tools.serve`).
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
import os
import sys
import time

__all__ = ["main", "build_parser"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a user's mistake is one line and exit status 2; anything else is a bug: traceback
        if not isinstance(e, _user_errors()):
            raise
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        _shutdown_distributed()
        _tell_launcher(e)
        parser.exit(2, f"ditpass {args.command}{where}: error: {e}\n")


class _UsageError(Exception):
    """A bad argument; printed as one line, exit status 2."""


def _user_errors() -> tuple[type, ...]:
    """The exception classes that mean "the input is wrong", from the modules that the command imported (none
    is imported here: ``ditpass --help`` stays instant)."""
    found = [_UsageError]
    for module, name in (("ditpass.tools.generate", "GenerateError"), ("ditpass.errors", "PlanError"),
                         ("ditpass.errors", "InputMismatchError"), ("ditpass.errors", "DistributedTimeout"),
                         ("ditpass.pass_base", "PassError"), ("ditpass.capture", "CaptureError")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            found.append(cls)
    return tuple(found)


def _tell_launcher(e: Exception) -> None:
    """Under torchrun, leave the one line in the worker's error file (torch.distributed.elastic's format): the
    launcher's failure report then shows it as the root cause instead of "To enable traceback see ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        line = f"{type(e).__name__}: {e}"
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                  "timestamp": str(int(time.time()))}}}, f)


def _shutdown_distributed() -> None:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditpass", description="Compiler passes that parallelize DiT inference.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_inspect(sub)
    _add_run(sub)
    _add_generate(sub)
    _add_serve(sub)
    return parser


# ---- generate ---------------------------------------------------------------------------------


def _add_generate(sub) -> None:
    from . import generate

    p = sub.add_parser("generate", help="run a pipeline (default: the built-in digits model) under a plan, save images",
                       description=generate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_arguments(p)
    p.set_defaults(func=generate.run)


# ---- serve -----------------------------------------------------------------------------------


def _add_serve(sub) -> None:
    from . import serve

    p = sub.add_parser("serve", help="an HTTP service that generates under a plan (rank 0 answers, every rank works)",
                       description=serve.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_arguments(p)
    p.set_defaults(func=serve.run)


# ---- run --------------------------------------------------------------------------------------


def _add_run(sub) -> None:
    from . import verify

    p = sub.add_parser("run", help="parallelize a zoo transformer under torchrun, compare with one device, explain",
                       description=verify.__doc__)
    verify.add_arguments(p)
    p.set_defaults(func=verify.run)


# ---- inspect ----------------------------------------------------------------------------------


class _ZooHelp(argparse.HelpFormatter):
    """``inspect --help`` lists the zoo's names (imported only when that help is shown)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "--model" in action.option_strings:
            from ditpass.models.zoo import NAMES

            text += "; the zoo: " + ", ".join(NAMES)
        return text


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="capture and analyse a model (the zoo's or your own), optionally dry-run a "
                                       "plan, and explain", formatter_class=_ZooHelp,
                       description="Capture a model, analyse it and print what ditpass sees; with --plan, run the "
                                   "passes as rank 0 of the plan's world (dry run: nothing is executed).")
    p.add_argument("--model", required=True,
                   help="a zoo class name (e.g. FluxTransformer2DModel), a saved diffusers model or pipeline folder "
                        "(its transformer/ subfolder is used), or module:Class (with --config, and --inputs for a "
                        "class the zoo has no input builder for)")
    p.add_argument("--config", metavar="CONFIG.json", help="init config of a module:Class model (default: its defaults)")
    p.add_argument("--inputs", metavar="module:function",
                   help="builds the forward's keyword inputs of a model the zoo does not know: "
                        "function(model, device=, dtype=, height=, width=, frames=, text_len=) -> dict "
                        "(the sizes given on the command line only)")
    p.add_argument("--size", default="tiny", help="zoo models: tiny (default), full, or another size the zoo has")
    p.add_argument("--plan", help='degrees such as "ulysses=2,ring=2", or the path of a JSON plan (or last_run.json)')
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


def _check_inspect_args(args) -> None:
    from ditpass.tools.generate import require_positive

    require_positive(args, ("height", "width", "frames", "text_len"), dashes=True)
    if args.device not in ("meta", "cpu"):
        raise _UsageError(f"--device {args.device!r}: use meta (nothing runs) or cpu")
    for flag, path in (("--svg", args.svg), ("--json", args.json)):  # a bad output path fails now, not after the work
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            raise _UsageError(f"{flag} {path}: the folder {folder} does not exist or is not writable")


def _user_model(args, dtype, geometry):
    """``--model`` as a folder or ``module:Class``: (model, inputs, dynamic_shapes, notes, size label)."""
    import importlib

    import torch

    from ditpass.models import zoo

    notes: list[str] = []
    if os.path.isdir(args.model):
        folder = args.model
        sub = os.path.join(folder, "transformer")
        if os.path.isfile(os.path.join(sub, "config.json")):
            folder = sub
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise _UsageError(f"--model {args.model}: no config.json there (nor in its transformer/ subfolder)")
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
        name = cfg.get("_class_name")
        import diffusers

        cls = getattr(diffusers, name or "", None)
        if cls is None:
            raise _UsageError(f"--model {args.model}: config.json names class {name!r}, which diffusers "
                              f"{diffusers.__version__} does not have")
        notes.append(f"model: {name} from {folder}")
    else:
        module_name, _, class_name = args.model.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as e:
            raise _UsageError(f"--model {args.model}: cannot import it ({e}); give module:Class") from None
        cfg = {}
        if args.config:
            with open(args.config) as f:
                cfg = json.load(f)
        folder, name = None, cls.__name__
        notes.append(f"model: {args.model}" + (f" with {args.config}" if args.config else " with its default config"))
    init = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if args.device == "meta":
        with torch.device("meta"):
            model = cls.from_config(init) if hasattr(cls, "from_config") else cls(**init)
        notes.append("weights: none (meta device)")
    elif folder is not None and any(f.endswith((".safetensors", ".bin")) for f in os.listdir(folder)):
        model = cls.from_pretrained(folder, torch_dtype=dtype)
        notes.append("weights: the folder's")
    else:
        model = cls.from_config(init) if hasattr(cls, "from_config") else cls(**init)
        notes.append("weights: random (none saved)")
    model = torch.nn.Module.to(model, dtype=dtype).eval()  # (diffusers' own .to warns about fp32 modules here)
    if args.inputs:
        module_name, _, fn_name = args.inputs.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise _UsageError(f"--inputs {args.inputs}: cannot import it ({e}); give module:function") from None
        given = {k: v for k, v in geometry.items() if v is not None}
        inputs = fn(model, device=args.device, dtype=dtype, **given)
        return model, inputs, "auto", notes + [f"inputs: {args.inputs}", "symbolic dims: auto"], "custom"
    if name not in zoo.NAMES:
        raise _UsageError(f"--model {args.model}: {name} has no input builder in the zoo; give --inputs "
                          f"module:function that returns its forward's keyword inputs")
    label = "user"
    zoo.add_size(name, label, init)
    inputs = zoo.make_inputs(name, label, device=args.device, dtype=dtype, **geometry)
    try:
        spec = zoo.dynamic_dims(name, label, **geometry)
        notes.append("inputs and symbolic dims: the zoo's builders for " + name)
    except Exception as e:  # noqa: BLE001 - falls back to automatic dims, and says so
        spec = "auto"
        notes.append(f"symbolic dims: auto (the zoo's dynamic_dims failed: {type(e).__name__}: {e})")
    return model, inputs, spec, notes, label


def _inspect(args) -> int:
    import torch

    from ditpass.capture import CaptureError, capture
    from ditpass.tools.explain import dry_run, explain
    from ditpass.models import NAMES, SIZES, build, dynamic_dims, make_inputs
    from ditpass.pass_base import PassError
    from ditpass.plan import PlanError
    from ditpass.tools.generate import parse_plan

    _check_inspect_args(args)
    zoo_model = args.model in NAMES
    if not zoo_model and not os.path.isdir(args.model) and ":" not in args.model:
        close = difflib.get_close_matches(args.model, NAMES, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise _UsageError(f"unknown model {args.model!r}{hint}: give a zoo name ({', '.join(NAMES)}), a saved "
                          "diffusers folder, or module:Class")
    if zoo_model and args.size not in SIZES[args.model]:
        raise _UsageError(f"{args.model} has sizes {', '.join(SIZES[args.model])}, not {args.size!r}")
    plan = None
    if args.plan:
        try:
            plan = parse_plan(args.plan)
        except (PlanError, OSError) as e:
            raise _UsageError(f"--plan: {e}") from None
    tiny = zoo_model and args.size == "tiny"
    dtype = getattr(torch, args.dtype or ("float32" if tiny or args.device == "cpu" else "bfloat16"))
    geometry = dict(height=args.height, width=args.width, frames=args.frames, text_len=args.text_len)
    timings: dict[str, float] = {}
    notes: list[str] = []

    t0 = time.perf_counter()
    try:
        if zoo_model:
            model = build(args.model, args.size, device=args.device, dtype=dtype)
            inputs = make_inputs(args.model, args.size, device=args.device, dtype=dtype, **geometry)
            size = args.size
            try:
                spec = dynamic_dims(args.model, args.size, **geometry)
                notes.append("symbolic dims: the zoo's dynamic_dims")
            except Exception as e:  # noqa: BLE001 - any failure falls back to automatic dims, and says so
                spec = "auto"
                notes.append(f"symbolic dims: auto (the zoo's dynamic_dims failed: {type(e).__name__}: {e})")
        else:
            model, inputs, spec, more, size = _user_model(args, dtype, geometry)
            notes += more
    except ValueError as e:
        raise _UsageError(str(e)) from None
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
        to_svg(gm, args.svg, title=f"{type(model).__name__} ({size}, {str(dtype).replace('torch.', '')}): {what}")
        timings["svg"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    exp.header["dtype"] = str(dtype).replace("torch.", "")
    exp.header["size"] = size
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
