"""What rewritten graphs call: the ``torch.ops.ditpass`` custom ops (`ops`) and their bodies (`seq`:
shard, gather, Ulysses / ring / USP attention), the per-site attention table (`sites`), the state
kept across the calls of one generation (`state`), and the batch split of CFG / data parallelism
(`batch`). Nothing here reads a `Plan`: passes and the build turn the plan into op arguments, site
entries and placements first."""
from . import ops  # noqa: F401  (registers the torch.ops.ditpass namespace)
