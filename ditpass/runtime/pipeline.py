"""PipeFusion's driver: this rank's pipeline stage, run whole (warm-up) or patch by patch.

    runner = PipeFusionRunner(full_gm, patch_gm, cut, patch, patch_outputs, plan, placement, state)
    out = runner(**inputs)        # what the transformer returns, on every rank

Two graphs, built by the pipefusion pass from one rewritten graph (so their attention sites are the
same sites, with the same K/V buffers): the *full* graph (the whole sequence, exact) and the *patch*
graph (one patch, `ditpass.runtime.patches`). Each is cut (`ditpass.analysis.stages.StageCut`) and only
this rank's stage is kept: its blocks, the replicated glue it needs (embeddings), and as inputs the
values the previous stage sends. Weights no kept graph reads are freed (`free_unused`).

One call, stage ``s`` of ``N``, as ranks of the ``pipefusion`` mesh axis:

- a warm-up step (``state.step_index < warmup_steps``): receive the boundary from ``s - 1``, run the full
  stage, send to ``s + 1``; the last stage's result is broadcast to the group;
- any other step: for patch ``m = 0..M-1``: set the patch index, receive patch ``m``'s boundary (posted
  before patch ``m - 1`` is computed, so it arrives during it), run the patch stage, send it on
  (asynchronously: the next patch starts at once); the last stage assembles the ``M`` patches and
  broadcasts the result.

Stage ``s`` computes patch ``m`` while stage ``s + 1`` computes patch ``m - 1``. The pipeline fills
and drains inside each call (efficiency ``M / (M + N - 1)`` of the ideal); pipelining across
diffusion steps (stage 0 starting step ``t + 1`` while the last stage finishes step ``t``) needs the
scheduler step per patch and is not built. Shapes of what travels are exchanged once per graph.
"""
from __future__ import annotations

import operator

import torch
import torch.distributed as dist
import torch.fx

from ditpass.analysis.partition import _is_scalar_op

from .patches import assemble

__all__ = ["stage_graph", "tail_graph", "PipeFusionRunner", "free_unused"]


def _sub_graph(gm, stage, received, keep, outputs, name) -> torch.fx.GraphModule:
    """``f(*graph inputs, *received) -> outputs`` over the nodes ``keep(node)`` accepts (and the sizes
    they need, computed again from what is here)."""
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = g.node_copy(n)
    for n in received:
        env[n] = g.placeholder(f"recv_{n.name}")
        env[n].meta = dict(n.meta)
    for n in gm.graph.nodes:
        if n in env or n.op in ("placeholder", "output"):
            continue
        if n.op == "get_attr" or (n.op == "call_function" and keep(n)):
            try:
                env[n] = g.node_copy(n, lambda a: env[a])
            except KeyError as e:
                raise ValueError(f"PipeFusion: `{n.name}` ({n.target}) reads `{e.args[0]}`, which neither this "
                                 f"part of the graph computes nor an earlier stage sends") from None
        elif n.op == "call_function" and _is_scalar_op(n) and all(a in env for a in n.all_input_nodes):
            env[n] = g.node_copy(n, lambda a: env[a])  # a size: computed again here, never sent
    g.output(tuple(torch.fx.node.map_arg(a, lambda x: env[x]) for a in outputs))
    g.eliminate_dead_code()
    g.lint()
    return torch.fx.GraphModule(gm, g, name)


def stage_graph(gm: torch.fx.GraphModule, cut, s: int) -> tuple[torch.fx.GraphModule, int]:
    """Stage ``s`` of ``gm``: ``f(*graph inputs, *received) -> (*sent,)`` (the last stage: ``gm``'s
    outputs). Returns the graph module and how many values it receives."""
    stage = cut.assign(gm.graph)
    received = cut.boundary(gm.graph, s - 1, stage) if s > 0 else []
    if s < cut.n - 1:
        outputs = cut.boundary(gm.graph, s, stage)
    else:
        outputs = list(next(iter(gm.graph.find_nodes(op="output"))).args[0])
    return _sub_graph(gm, stage, received, lambda n: stage[n] in (-1, s), outputs, f"Stage{s}"), len(received)


def tail_graph(gm: torch.fx.GraphModule, cut) -> tuple[torch.fx.GraphModule, list[str]]:
    """``f(*graph inputs, *tail inputs) -> gm's outputs``: the tail (`StageCut.tail`) on assembled patches.
    Returns it and the names of the tail inputs, in order."""
    stage = cut.assign(gm.graph)
    tail, inputs = cut.tail(gm.graph, stage)
    members = set(tail)
    outputs = list(next(iter(gm.graph.find_nodes(op="output"))).args[0])
    keep = lambda n: n in members or stage[n] == -1  # noqa: E731
    return _sub_graph(gm, stage, inputs, keep, outputs, "Tail"), [n.name for n in inputs]


def free_unused(module: torch.nn.Module, keep: list[torch.fx.GraphModule]) -> tuple[int, int]:
    """Replace every parameter / buffer of ``module`` that no graph in ``keep`` reads by an empty tensor
    (same dtype and device, no storage); returns (tensors freed, bytes freed)."""
    used: set[int] = set()
    for gm in keep:
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                t = operator.attrgetter(n.target)(gm)
                if isinstance(t, torch.Tensor):
                    used.add(id(t))
                    used.add(t.untyped_storage().data_ptr() if t.numel() else -1)
    freed, nbytes = 0, 0
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) in used or t.numel() == 0 or t.untyped_storage().data_ptr() in used:
                continue
            nbytes += t.numel() * t.element_size()
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
            freed += 1
    return freed, nbytes


def _flat_inputs(gm: torch.fx.GraphModule):
    """``f(*args, **kwargs) -> [graph inputs]`` with the captured graph's own argument handling."""
    g = torch.fx.Graph()
    phs = [g.node_copy(n) for n in gm.graph.nodes if n.op == "placeholder"]
    g.output(tuple(phs))
    info = gm.graph._codegen.pytree_info
    g._codegen = torch.fx.graph._PyTreeCodeGen(torch.fx.graph._PyTreeInfo(info.orig_args, info.in_spec, None))
    return torch.fx.GraphModule(torch.nn.Module(), g, "Inputs")


class PipeFusionRunner:
    """Runs this rank's stage of a PipeFusion plan (see the module docstring)."""

    def __init__(self, full_gm, patch_gm, tail_gm, cut, patch, patch_outputs, plan, placement, state, compile_fn=None):
        from ditpass.mesh import ParallelDims

        self.plan, self.state, self.patch, self.cut = plan, state, patch, cut
        self.s, self.N, self.M = placement.coord("pipefusion"), plan.pipefusion, plan.num_patches
        self.full, self.n_recv_full = stage_graph(full_gm, cut, self.s)
        self.part, self.n_recv_part = stage_graph(patch_gm, cut, self.s)
        self.patch_outputs = patch_outputs  # (patch output index, token dim, how many lengths follow)
        self.graphs = [self.full, self.part]
        self.tail = None
        if self.s == self.N - 1:
            self.tail = tail_gm
            self.graphs.append(self.tail)
            self.n_tail_in = sum(1 for n in tail_gm.graph.nodes if n.op == "placeholder") - len(
                [n for n in full_gm.graph.nodes if n.op == "placeholder"])
        run = compile_fn or (lambda g: g)
        self._run_full, self._run_part = run(self.full), run(self.part)
        self._run_tail = run(self.tail) if self.tail is not None else None
        self.inputs = _flat_inputs(full_gm)
        self.out_codegen = full_gm.graph._codegen
        ranks = ParallelDims(plan, placement.world_size).ranks_of("pipefusion", placement.rank)
        self.ranks = ranks
        self.prev = ranks[self.s - 1] if self.s > 0 else None
        self.next = ranks[self.s + 1] if self.s < self.N - 1 else None
        self.last = ranks[-1]
        self.group = _resolve(placement.group("pipefusion"))
        self.sp, self.sp_rank = placement.degree("sp"), placement.coord("sp")  # ring x ulysses, ring-major
        self.sp_group = _resolve(placement.group("sp"))
        self._shapes: dict = {}  # (mode, "recv" | "out") -> [(shape, dtype)]
        self._seen_generation = None
        self._last_step = None  # (generation, step) of the last call
        self.last_mode = None

    # ---- one call ------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        flat = list(self.inputs(*args, **kwargs))
        step = self.state.step_index if self.state is not None else 0
        gen = self.state.generation if self.state is not None else 0
        counted = self.state is not None and self.state.steps_counted
        if step < self.plan.warmup_steps:
            outs = self._full(flat)
            self.last_mode = "full"
        elif counted and self._last_step == (gen, step):
            from ditpass.errors import PlanError

            raise PlanError(
                f"the pipeline called the transformer twice in diffusion step {step} (true CFG with a negative "
                f"prompt, or two denoisers on one state): PipeFusion keeps one K/V buffer per attention site, "
                f"which the second call would read as the first's; run these steps whole "
                f"(warmup_steps >= num_inference_steps) or use cfg / dp / ulysses for this pipeline")
        else:
            # the first patch step of a generation with no full step before it: no stale K/V yet
            self.patch.partial = self._seen_generation != gen
            outs = self._patches(flat)
            self.last_mode = "patches"
        self._seen_generation, self._last_step = gen, (gen, step)
        return self.out_codegen.process_outputs(list(outs))

    def _full(self, flat):
        recv = self._recv("full", self.n_recv_full) if self.prev is not None else []
        self.patch.mode = "full"
        out = self._run_full(*flat, *recv)
        if self.next is not None:
            for r in self._send("full", out):
                r.wait()
            out = None
        return self._bcast("full", None if out is None else list(out))

    def _patches(self, flat):
        pending, done = [], []
        nxt = self._post_recv("patch", self.n_recv_part) if self.prev is not None else None
        for m in range(self.M):
            self.patch.mode = "patch"
            self.patch.index.fill_(m * self.sp + self.sp_rank)  # this rank's chunk of patch m
            recv = []
            if nxt is not None:
                recv = self._wait(nxt)
                nxt = self._post_recv("patch", self.n_recv_part) if m + 1 < self.M else None
            out = self._run_part(*flat, *recv)
            if self.next is not None:
                pending += self._send("patch", out)
            else:
                done.append(list(out))
        for r in pending:
            r.wait()
        final = None
        if self.next is None:  # the last stage: assemble what the tail reads, run the tail once
            tail_in = list(done[0][:self.n_tail_in])
            extra = self.n_tail_in
            for i, dim, k in self.patch_outputs:
                lengths = done[0][extra:extra + k]
                extra += k
                tail_in[i] = assemble(self._chunks([d[i] for d in done]), dim, lengths, self.M * self.sp)
            final = list(self._run_tail(*flat, *tail_in))
        return self._bcast("patch", final)

    def _chunks(self, mine: list) -> list:
        """Every chunk in order from this rank's chunk of each patch: under sequence parallelism, patch m's
        chunks are all-gathered from the stage's sequence ranks (ring-major, as the chunks are numbered)."""
        if self.sp == 1:
            return mine
        out = []
        for x in mine:
            x = x.contiguous()
            parts = [torch.empty_like(x) for _ in range(self.sp)]
            dist.all_gather(parts, x, group=self.sp_group)
            out.extend(parts)
        return out

    # ---- point to point ------------------------------------------------------------------
    def _send(self, mode, tensors):
        tensors = [t.contiguous() for t in tensors]
        key = (mode, "send")
        if key not in self._shapes:
            self._shapes[key] = [(tuple(t.shape), t.dtype) for t in tensors]
            dist.send_object_list([self._shapes[key]], dst=self.next)
        return [dist.isend(t, dst=self.next) for t in tensors]

    def _post_recv(self, mode, n):
        key = (mode, "recv")
        if key not in self._shapes:
            box = [None]
            dist.recv_object_list(box, src=self.prev)
            self._shapes[key] = box[0]
        device = self._device()
        bufs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in self._shapes[key]]
        if len(bufs) != n:
            raise RuntimeError(f"PipeFusion stage {self.s}: {len(bufs)} tensors announced, {n} expected")
        return bufs, [dist.irecv(b, src=self.prev) for b in bufs]

    def _recv(self, mode, n):
        return self._wait(self._post_recv(mode, n))

    @staticmethod
    def _wait(posted):
        bufs, reqs = posted
        for r in reqs:
            r.wait()
        return bufs

    def _bcast(self, mode, outs):
        """The last stage's outputs on every rank of the pipeline."""
        if self.N == 1:
            return outs
        key = (mode, "out")
        if key not in self._shapes:
            box = [None if outs is None else [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t
                                              for t in outs]]
            dist.broadcast_object_list(box, src=self.last, group=self.group)
            self._shapes[key] = box[0]
        metas = self._shapes[key]
        if outs is None:
            device = self._device()
            outs = [torch.empty(m[0], dtype=m[1], device=device) if isinstance(m, tuple) and len(m) == 2
                    and isinstance(m[1], torch.dtype) else m for m in metas]
        outs = [t.contiguous() if isinstance(t, torch.Tensor) else t for t in outs]
        for t in outs:
            if isinstance(t, torch.Tensor):
                dist.broadcast(t, src=self.last, group=self.group)
        return outs

    def _device(self):
        """Where this stage's weights are (what it receives is put there); found once."""
        if getattr(self, "_dev", None) is None:
            self._dev = torch.device("cpu")
            for n in self.full.graph.nodes:
                if n.op == "get_attr":
                    t = operator.attrgetter(n.target)(self.full)
                    if isinstance(t, torch.Tensor) and t.dim() > 0:
                        self._dev = t.device
                        break
        return self._dev


def _resolve(name: str):
    if not name or name.startswith("dry-run"):
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)
