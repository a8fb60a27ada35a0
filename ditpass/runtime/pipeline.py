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

Stage ``s`` computes patch ``m`` while stage ``s + 1`` computes patch ``m - 1``. Outside a pipeline
(or with ``Plan(across_steps=False)``, or under dp / cfg) the pipeline fills and drains inside each
call (efficiency ``M / (M + N - 1)`` of the ideal). Inside a diffusers pipeline it runs **across
steps** (`ditpass.runtime.lazy`): the call returns lazy outputs at once on every rank; the last stage,
after each patch, runs the tail on what it has and sends the full-size output to stage 0; stage 0
evaluates the pipeline's recorded step code per patch and starts step ``t + 1`` on patch ``m`` as soon
as step ``t``'s patch ``m`` is back (no bubble with ``M >= N``). Nothing is broadcast until the pipeline
needs a value whole (the VAE). Shapes of what travels are exchanged once per graph.
"""
from __future__ import annotations

import operator
import time
import warnings

import torch
import torch.distributed as dist
import torch.fx

from ditpass.analysis.partition import _is_scalar_op

from . import lazy
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

    def __init__(self, full_gm, patch_gm, tail_gm, cut, patch, patch_outputs, plan, placement, state, compile_fn=None,
                 positions=None):
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
        # across steps: the position dims of each output (None for a non-tensor), what blocks it
        self.positions = positions
        self.across, self.across_why = self._across_steps(plan, positions)
        # inputs whose values (not only sizes) a stage after the first or the tail reads
        self.reads_values = _value_inputs([stage_graph(patch_gm, cut, s)[0] for s in range(1, self.N)] + [tail_gm])
        self.head_checked, self.head_local = False, True  # patch m's tokens need only fresh positions of m
        self.shared_steps: list = []  # the step at which each pipelined output was broadcast whole (needed)
        self.timeline: list = []  # (generation, step, patch, start, end) of this rank's patch computations
        self._sources: list = []  # this generation's lazy outputs (lazy.Source), in order
        self._out_sends: list = []  # the last stage's sends to stage 0 still in flight
        self._slots = None  # the last stage: every chunk of the patch outputs, the latest of each
        self._dummies: dict = {}

    # ---- one call ------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        flat = list(self.inputs(*args, **kwargs))
        step = self.state.step_index if self.state is not None else 0
        gen = self.state.generation if self.state is not None else 0
        counted = self.state is not None and self.state.steps_counted
        if step < self.plan.warmup_steps:
            outs = self._full(self._whole(flat))
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
            if self._seen_generation != gen:
                self.timeline.clear()
            if self.across and counted:
                outs = self._pipelined(flat, gen, step)
                self.last_mode = "pipelined"
            else:
                outs = self._patches(self._whole(flat))
                self.last_mode = "patches"
        self._seen_generation, self._last_step = gen, (gen, step)
        return self.out_codegen.process_outputs(list(outs))

    @staticmethod
    def _across_steps(plan, positions) -> tuple[bool, str]:
        if not plan.across_steps:
            return False, "Plan(across_steps=False)"
        if plan.dp * plan.cfg > 1:
            return False, "dp / cfg gather the batch after each call"
        if not positions or any(p is not None and not p for p in positions):
            return False, "an output has no dim sized by the visual tokens"
        return True, ""

    def _whole(self, flat):
        return [lazy.materialize(x) if isinstance(x, lazy.Lazy) else x for x in flat]

    def _dummy(self, x):
        """Stand-in for a lazy input on a stage that reads only its sizes."""
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._dummies:
            self._dummies[key] = torch.zeros(key[0], dtype=x.dtype, device=x.device)
        return self._dummies[key]

    @property
    def materialized(self) -> int:
        """Pipelined outputs broadcast whole so far (the pipeline needed their values)."""
        return len(self.shared_steps)

    def finish(self):
        """End of a generation (every rank): every lazy output shared, every send completed."""
        for src in self._sources:
            src.share()
        self._sources.clear()
        self._wait_sends()

    def _wait_sends(self):
        """Sends of the last pipelined call (to the next stage, and the last stage's to stage 0) completed."""
        for r in self._out_sends:
            r.wait()
        self._out_sends.clear()

    def _pipelined(self, flat, gen, step):
        """One step across steps (module docstring): returns lazy outputs on every rank."""
        lazy_idx = [i for i, x in enumerate(flat) if isinstance(x, lazy.Lazy)]
        if any(i in self.reads_values for i in lazy_idx):  # a later stage needs these whole: drain
            flat, lazy_idx = self._whole(flat), []
        if self.s > 0:  # sizes only (`_value_inputs`): the values are stage 0's business
            flat, lazy_idx = [self._dummy(x) if isinstance(x, lazy.Lazy) else x for x in flat], []
        self._wait_sends()
        pending, final = [], None
        nxt = self._post_recv("patch", self.n_recv_part) if self.prev is not None else None
        for m in range(self.M):
            self.patch.mode = "patch"
            self.patch.index.fill_(m * self.sp + self.sp_rank)
            recv = []
            if nxt is not None:
                recv = self._wait(nxt)
                nxt = self._post_recv("patch", self.n_recv_part) if m + 1 < self.M else None
            t0 = time.monotonic()
            if lazy_idx:
                out = self._first_stage_patch(flat, lazy_idx, m)
            else:
                out = self._run_part(*flat, *recv)
            if self.next is not None:
                pending += self._send("patch", out)
            else:
                final = self._tail_patch(flat, list(out), m)
            self.timeline.append((gen, step, m, t0, time.monotonic()))
        self._out_sends += pending  # waited before this stage sends again: the next step starts at once
        return self._lazy_outputs(final)

    def _first_stage_patch(self, flat, lazy_idx, m):
        """Stage 0, patch ``m`` of a step whose inputs are lazy: evaluated with the outputs after patch ``m``
        (checked once against the complete inputs; see `ditpass.runtime.lazy`)."""
        def inputs(v):
            return [lazy.value_at(x, v) if i in lazy_idx else x for i, x in enumerate(flat)]

        if not self.head_local:
            return self._run_part(*inputs(None))
        out = self._run_part(*inputs(m))
        if not self.head_checked:  # once: the same patch from the complete inputs (written last: it is exact)
            whole = self._run_part(*inputs(None))
            self.head_checked = True
            worst = max((float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)
                         for a, b in zip(out, whole) if isinstance(a, torch.Tensor) and a.is_floating_point()
                         and a.numel()), default=0.0)
            if worst > 1e-3:
                self.head_local = False
                warnings.warn(
                    f"PipeFusion across steps: patch 0's tokens computed from a latent whose other patches were "
                    f"not updated yet differ from those of the complete latent (relative {worst:.2e}): the ops "
                    f"before the first block or the pipeline's step code mix positions, so stage 0 waits for "
                    f"every patch of the previous step from now on (exact, with a bubble per step)",
                    RuntimeWarning, stacklevel=2)
            out = whole
        return out

    def _tail_patch(self, flat, out, m):
        """The last stage after patch ``m``: the tail on the latest chunk of every patch, sent to stage 0."""
        n_out = len(self.patch_outputs)
        mine = self._chunks([out[i] for i, _, _ in self.patch_outputs])
        if self._slots is None:
            self._slots = [[torch.zeros_like(mine[j * self.sp]) for _ in range(self.M * self.sp)] for j in range(n_out)]
        for j in range(n_out):
            self._slots[j][m * self.sp:(m + 1) * self.sp] = mine[j * self.sp:(j + 1) * self.sp]
        tail_in, extra = list(out[:self.n_tail_in]), self.n_tail_in
        for j, (i, dim, k) in enumerate(self.patch_outputs):
            lengths = out[extra:extra + k]
            extra += k
            tail_in[i] = assemble(self._slots[j], dim, lengths, self.M * self.sp)
        final = list(self._run_tail(*flat, *tail_in))
        for t in final:
            if isinstance(t, torch.Tensor):
                self._out_sends.append(dist.isend(t.contiguous(), dst=self.ranks[0]))
        return final

    def _lazy_outputs(self, final):
        key = ("patch", "out")
        if key not in self._shapes:  # once: the last stage tells the others what it returns
            box = [None if final is None else [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t
                                               for t in final]]
            dist.broadcast_object_list(box, src=self.last, group=self.group)
            self._shapes[key] = box[0]
        device = self._device()
        outs, sources = [], []
        for k, meta in enumerate(self._shapes[key]):
            if isinstance(meta, tuple) and len(meta) == 2 and isinstance(meta[1], torch.dtype):
                src = lazy.Source(self, meta[0], meta[1], device)
                sources.append(src)
                outs.append(lazy.from_source(src, self.positions[k]))
            else:
                outs.append(meta)
        if self.s == 0:  # after patch m the last stage sends each output: receive them in that order
            for src in sources:
                src.posted = []
            for _ in range(self.M):
                for src in sources:
                    buf = torch.empty(src.shape, dtype=src.dtype, device=device)
                    src.posted.append((buf, dist.irecv(buf, src=self.ranks[-1])))
        self._sources += sources
        return outs

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


_SIZE_OPS = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_stride.int, torch.ops.aten.sym_numel.default,
             torch.ops.aten.sym_storage_offset.default}


def _value_inputs(graphs) -> set[int]:
    """Positions of the graph inputs whose values (not only sizes) reach what some graph of ``graphs``
    returns or writes. A stage after the first computes the replicated embeddings again where the sizes
    it needs are read off them (``sym_size`` of the patch embedding's output): those read sizes only."""
    out: set[int] = set()
    for gm in graphs:
        for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
            seen, todo = {n}, [n]
            while todo and i not in out:
                for u in todo.pop().users:
                    if u in seen or (u.op == "call_function" and u.target in _SIZE_OPS):
                        continue
                    if u.op == "output" or (u.is_impure() and "assert" not in str(u.target)):  # not a check
                        out.add(i)
                        break
                    seen.add(u)
                    todo.append(u)
    return out


def _resolve(name: str):
    if not name or name.startswith("dry-run"):
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)
