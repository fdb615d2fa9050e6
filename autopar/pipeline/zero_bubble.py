"""Backward split into the input gradient (``B``) and the deferred weight gradient (``W``).

Works on the autograd graph, so it needs no knowledge of the layers: a node is *mixed* when it
leads both to a stage input and to a parameter (the ``addmm`` of a Linear), *weight-only* when
it leads only to parameters (the ``t()`` of the weight, a bias, a whole embedding).

* ``B`` runs ``autograd.grad`` towards the stage inputs only. Autograd then skips every
  weight-only branch (a mixed node computes only the outputs that lead to inputs), and a
  pre-hook on each mixed node that has weight-only children keeps the gradient arriving there.
* ``W`` replays those mixed nodes one at a time, asking only for their weight-only outputs,
  then runs one backward from all of them into the parameters. Each piece of the graph runs
  exactly once over ``B`` + ``W``, so the cost is that of one ordinary backward and gradients
  accumulate into ``.grad`` through the usual ``AccumulateGrad`` path (hooks included).

On the first stage there are no stage inputs: ``B`` is empty and ``W`` is the whole backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.autograd.graph import GradientEdge


def _classify(roots: Sequence[Any], inputs: set[int], params: set[int]
              ) -> tuple[dict[Any, tuple[bool, bool]], dict[Any, int]]:
    """For each node reachable from ``roots``: (leads to a stage input, leads to a parameter),
    and how many edges point to it."""
    reach: dict[Any, tuple[bool, bool]] = {}
    parents: dict[Any, int] = {}
    stack = [(n, False) for n in roots]
    while stack:
        node, expanded = stack.pop()
        if node in reach:
            continue
        children = [c for c, _ in node.next_functions if c is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in reach)
            continue
        for c in children:
            parents[c] = parents.get(c, 0) + 1
        var = getattr(node, "variable", None)
        to_in, to_param = (id(var) in inputs, id(var) in params) if var is not None else (False, False)
        for c in children:
            a, p = reach[c]
            to_in, to_param = to_in or a, to_param or p
        reach[node] = (to_in, to_param)
    return reach, parents


@dataclass
class Deferred:
    """Everything ``W`` needs for one microbatch of one chunk."""
    mixed: list[tuple[Any, tuple]]          # (node, gradients that arrived at it during B)
    roots: list[tuple[GradientEdge, torch.Tensor]]  # weight-only roots and their gradients
    reach: dict[Any, tuple[bool, bool]]
    parents: dict[Any, int]
    params: list[torch.Tensor]


def backward_input(outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
                   ) -> tuple[list[torch.Tensor | None], Deferred]:
    roots = [t.grad_fn for t in outputs]
    reach, parents = _classify([r for r in roots if r is not None], {id(t) for t in inputs},
                               {id(p) for p in params})
    weight_only = {n for n, (a, p) in reach.items() if p and not a}
    captured: list[tuple[Any, tuple]] = []
    hooks = []
    for node, (a, p) in reach.items():
        if a and p and any(c in weight_only for c, _ in node.next_functions):
            hooks.append(node.register_prehook(lambda g, node=node: captured.append((node, g))))
    deferred_roots = [(GradientEdge(t.grad_fn, t.output_nr), g) for t, g in zip(outputs, grads)
                      if t.grad_fn in weight_only]
    input_grads: list[torch.Tensor | None] = []
    try:
        if inputs:
            pairs = [(t, g) for t, g in zip(outputs, grads) if t.grad_fn is None or reach[t.grad_fn][0]]
            input_grads = list(torch.autograd.grad([t for t, _ in pairs], list(inputs), [g for _, g in pairs],
                                                   retain_graph=True, allow_unused=True))
    finally:
        for h in hooks:
            h.remove()
    return input_grads, Deferred(captured, deferred_roots, reach, parents, list(params))


def backward_weight(d: Deferred) -> None:
    edges: list[GradientEdge] = [e for e, _ in d.roots]
    grads: list[torch.Tensor] = [g for _, g in d.roots]
    for node, arrived in d.mixed:
        kids = [GradientEdge(c, nr) for c, nr in node.next_functions if c is not None and d.reach[c] == (False, True)]
        if all(g is None for g in arrived):
            continue
        if all(d.parents[e.node] == 1 for e in kids):
            outs = [(GradientEdge(node, k), g) for k, g in enumerate(arrived) if g is not None]
            kid_grads = torch.autograd.grad([e for e, _ in outs], kids, [g for _, g in outs], allow_unused=True)
        else:
            # A weight-only child with several parents may also be reached through another
            # child of this node; autograd would then run that child again. Calling the node
            # itself costs its input gradient once more but touches nothing else.
            every = node(*arrived)
            every = every if isinstance(every, tuple) else (every,)
            kid_grads = [None if g is None else g.sum_to_size(tuple(c._input_metadata[nr].shape))
                         for (c, nr), g in zip(node.next_functions, every)
                         if c is not None and d.reach[c] == (False, True)]
        for e, g in zip(kids, kid_grads):
            if g is not None:
                edges.append(e)
                grads.append(g)
    if edges:
        used = [p for p in d.params if p.requires_grad]
        torch.autograd.backward(edges, grads, inputs=used)
