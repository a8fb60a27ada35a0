"""PipeFusion's stage cut of full-size models, from a dry run on the meta device (no weights, no GPU).

    python benchmarks/pipefusion_cuts.py                      # -> benchmarks/results/pipefusion_cuts.md

For each model and stage count: the blocks of each stage, its parameters (what a GPU holds of the
blocks; the embeddings every stage needs are extra) and what it sends to the next stage per full step
and per patch (bf16, the default geometry of `ditpass.models.zoo`: FLUX 1024x1024 with 512 text tokens).
"""
from __future__ import annotations

import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "pipefusion_cuts.md")
MODELS = ["FluxTransformer2DModel", "SD3Transformer2DModel", "PixArtTransformer2DModel",
          "HunyuanVideoTransformer3DModel"]


def main(argv=None):
    import ditpass
    from ditpass.models import zoo
    from ditpass.tools.explain import dry_run

    names = (argv if argv is not None else sys.argv[1:]) or MODELS
    lines = ["# PipeFusion stage cuts of full-size models", "",
             "`python benchmarks/pipefusion_cuts.py`: a dry run (`ditpass.tools.explain.dry_run`) of each model's "
             "full-size config on the meta device, bf16, the zoo's default geometry; `patches = 2 x stages`. Params: "
             "the stage's blocks (the embeddings before the blocks are kept by every stage that needs them).", ""]
    for name in names:
        model = zoo.build(name, "full", device="meta", dtype=torch.bfloat16)
        inputs = zoo.make_inputs(name, "full", device="meta", dtype=torch.bfloat16)
        t = time.perf_counter()
        captured = ditpass.capture(model, **inputs)
        total = sum(p.numel() for p in model.parameters())
        for n in (2, 4):
            record = dry_run(captured, ditpass.Plan(pipefusion=n, patches=2 * n))
            res = next(r for r in record.results if r.name == "pipefusion")
            lines += [f"## {name}, {n} stages ({total / 1e9:.2f} B parameters in all)", "",
                      "| stage | blocks | count | params (B) | sends per full step | per patch |",
                      "| --- | --- | --- | --- | --- | --- |"]
            for row, params in zip(res.tables[0].rows, res.details["params"]):
                lines.append(f"| {row[0]} | {row[1]} | {row[2]} | {params / 1e9:.2f} | {row[5]} | {row[6]} |")
            lines.append("")
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
    lines.append(f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.")
    with open(OUT, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
