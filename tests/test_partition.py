"""Partitioning by a node-to-part callback (ditpass.analysis.partition) on small hand-made graphs:
which nodes form which part, what each part reads and hands on, that the parts' graphs called in
order compute what the graph computes, and that size arithmetic is hoisted out of blocks."""
from __future__ import annotations

import operator

import torch
import torch.fx

from ditpass.analysis.partition import hoist_scalars, part_graph, partition
from ditpass.backend.regional import RegionalModule


def _label(node):
    return node.meta.get("ditpass_block")


def _labelled(module, labels: dict[str, str]) -> torch.fx.GraphModule:
    """``module`` traced, with ``meta["ditpass_block"]`` set by node name as the analysis would."""
    gm = torch.fx.symbolic_trace(module)
    for n in gm.graph.nodes:
        if n.name in labels:
            n.meta["ditpass_block"] = labels[n.name]
    return gm


def _run_parts(parts, gm, *args):
    """The graph's output computed part by part from each part's own graph."""
    graph = gm.graph
    env = dict(zip([n for n in graph.nodes if n.op == "placeholder"], args))
    for p in parts:
        fn = part_graph(p, gm)
        outs = fn(*[operator.attrgetter(w.target)(gm) for w in p.params], *[env[a] for a in p.inputs])
        env.update(zip(p.outputs, outs))
    return env[next(n for n in graph.nodes if n.op == "output").args[0]]


class _Blocks(torch.nn.Module):
    """glue, block b.0 (with an unlabelled op inside), b.1, glue, b.0 again, glue."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w0 = torch.nn.Parameter(torch.randn(4, 4, generator=g))
        self.w1 = torch.nn.Parameter(torch.randn(4, 4, generator=g))

    def forward(self, x):
        h = x * 2
        a = torch.matmul(h, self.w0)
        a = torch.relu(a)  # a pass's insertion: no label
        a = a + h
        c = torch.tanh(torch.matmul(a, self.w1))
        d = c - a  # no label, between b.1 and b.0: glue
        e = torch.matmul(d, self.w0)  # DiT's final modulation: b.0 entered again
        return e + 1


_LABELS = {"matmul": "b.0", "add": "b.0", "matmul_1": "b.1", "tanh": "b.1", "matmul_2": "b.0"}


def _names(nodes):
    return [n.name for n in nodes]


def test_runs_glue_and_reentry():
    gm = _labelled(_Blocks(), _LABELS)
    parts = partition(gm.graph, _label, gm)
    assert [(p.name, p.key, _names(p.nodes)) for p in parts] == [
        ("part_0", None, ["mul"]),
        ("part_1", "b.0", ["matmul", "relu", "add"]),  # relu joins the block around it
        ("part_2", "b.1", ["matmul_1", "tanh"]),
        ("part_3", None, ["sub"]),  # between two different blocks: glue
        ("part_4", "b.0", ["matmul_2"]),  # b.0 again, after b.1: a new part
        ("part_5", None, ["add_1"]),
    ]


def test_inputs_outputs_params():
    gm = _labelled(_Blocks(), _LABELS)
    parts = partition(gm.graph, _label, gm)
    got = [(_names(p.params), _names(p.inputs), _names(p.outputs), p.mods) for p in parts]
    assert got == [
        ([], ["x"], ["mul"], []),
        (["w0"], ["mul"], ["add"], []),  # relu and matmul stay inside
        (["w1"], ["add"], ["tanh"], []),
        ([], ["tanh", "add"], ["sub"], []),
        (["w0"], ["sub"], ["matmul_2"], []),
        ([], ["matmul_2"], ["add_1"], []),  # read by the graph's output
    ]


def test_part_graphs_in_order_compute_the_graph():
    gm = _labelled(_Blocks(), _LABELS)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    parts = partition(gm.graph, _label, gm)
    torch.testing.assert_close(_run_parts(parts, gm, x), gm(x), rtol=0, atol=0)
    code = part_graph(parts[1], gm).code
    assert "def forward(self, w0, x0)" in code and "return (add,)" in code


def test_integer_keys_and_a_callback_other_than_blocks():
    """PipeFusion's cut: stage index per block; stage 0 is a key like any other (not "no key")."""
    gm = _labelled(_Blocks(), _LABELS)
    stage = {"b.0": 0, "b.1": 1}
    parts = partition(gm.graph, lambda n: stage.get(_label(n)))
    assert [(p.key, _names(p.nodes)) for p in parts] == [
        (None, ["mul"]), (0, ["matmul", "relu", "add"]), (1, ["matmul_1", "tanh"]), (None, ["sub"]),
        (0, ["matmul_2"]), (None, ["add_1"])]
    assert _names(parts[1].params) == ["w0"]  # no root: every get_attr is a param


def _apply(mod, x):
    return mod(x)


def test_submodules_are_mods_and_stay_attributes():
    root = torch.nn.Module()
    root.lin = torch.nn.Linear(4, 4)
    g = torch.fx.Graph()
    x = g.placeholder("x")
    sub = g.get_attr("lin")
    y = g.call_function(_apply, (sub, x))
    y.meta["ditpass_block"] = "b.0"
    z = g.call_function(torch.sigmoid, (y,))
    g.output(z)
    gm = torch.fx.GraphModule(root, g)
    parts = partition(gm.graph, _label, gm)
    assert [(p.key, _names(p.mods), _names(p.params), _names(p.outputs)) for p in parts] == [
        ("b.0", ["lin"], [], ["_apply"]), (None, [], [], ["sigmoid"])]
    body = part_graph(parts[0], gm)
    assert body.sub0 is root.lin
    x0 = torch.randn(2, 4)
    torch.testing.assert_close(_run_parts(parts, gm, x0), gm(x0), rtol=0, atol=0)


def add(a, b):  # named like operator.add, but not one: never taken for size arithmetic
    return a + b


def test_hoist_scalars_moves_size_arithmetic_out_of_the_block():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(3, 4)
    relu = g.call_function(torch.relu, (x,))
    size = g.call_function(torch.ops.aten.sym_size.int, (x, 0))
    plus = g.call_function(operator.add, (size, 1))
    fake = g.call_function(add, (size, 1))
    biggest = g.call_function(torch.sym_max, (plus, 2))
    scaled = g.call_function(torch.mul, (relu, biggest))
    out = g.call_function(torch.mul, (scaled, fake))
    for n, v in [(relu, torch.empty(3, 4)), (size, 3), (plus, None), (fake, 4), (biggest, 4),
                 (scaled, torch.empty(3, 4)), (out, torch.empty(3, 4))]:
        if v is not None:  # plus has no meta["val"], as a pass's inserted size arithmetic
            n.meta["val"] = v
        n.meta["ditpass_block"] = "b.0"
    g.output(out)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    x0 = torch.randn(3, 4)
    before = gm(x0)
    assert [p.key for p in partition(g, _label)] == ["b.0"]

    assert hoist_scalars(g) == 3
    g.lint()
    assert _names(n for n in g.nodes if n.op == "call_function") == [
        "sym_size_int", "add", "sym_max", "relu", "add_1", "mul", "mul_1"]  # the test's add stays put
    assert "ditpass_block" not in plus.meta and fake.meta["ditpass_block"] == "b.0"
    parts = partition(g, _label)
    assert [(p.key, _names(p.nodes)) for p in parts] == [
        (None, ["sym_size_int", "add", "sym_max"]), ("b.0", ["relu", "add_1", "mul", "mul_1"])]
    assert _names(parts[1].inputs) == ["x", "sym_size_int", "sym_max"]
    gm.recompile()
    torch.testing.assert_close(gm(x0), before, rtol=0, atol=0)
    assert hoist_scalars(g) == 0  # already in place


class _Sites(torch.nn.Module):
    """Two blocks of one structure; each reads its own weight and its attention site's scalar."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w0 = torch.nn.Parameter(torch.randn(4, 4, generator=g))
        self.w1 = torch.nn.Parameter(torch.randn(4, 4, generator=g))
        self.site_0 = torch.tensor(2.0)
        self.site_1 = torch.tensor(3.0)

    def forward(self, x):
        h = torch.matmul(x, self.w0) * self.site_0
        h = torch.matmul(h, self.w1) * self.site_1
        return h - 1


def test_site_scalars_are_params_and_blocks_share_one_template():
    gm = _labelled(_Sites(), {"matmul": "b.0", "mul": "b.0", "matmul_1": "b.1", "mul_1": "b.1"})
    parts = partition(gm.graph, _label, gm)
    assert [_names(p.params) for p in parts] == [["w0", "site_0"], ["w1", "site_1"], []]
    ops = [[(n.op, n.target) for n in part_graph(p, gm).graph.nodes] for p in parts[:2]]
    assert ops[0] == ops[1] and ("placeholder", "w1") in ops[0]  # site_0 / site_1 are both w1
    compiled = []
    rm = RegionalModule(gm, lambda graph: compiled.append(graph) or graph)
    assert len(compiled) == 1 and [r.template for r in rm.regions] == ["b_0", "b_0", "glue_1"]
    x = torch.randn(3, 4)
    torch.testing.assert_close(rm(x), gm(x), rtol=0, atol=0)
