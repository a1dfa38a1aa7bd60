"""Capture rewrites for decoder language models (issue 18; docs/language-models.md, section 1).

:func:`rewrite` runs on the graph :mod:`modlens.nn._capture` built from ``torch.export`` and
replaces operation patterns that decoder families write out by nodes the operation registry
follows (:mod:`modlens.nn._decoder_ops`). Each rewrite is exact: it reuses the model's
parameters (shared, never copied) and, where it replaces several operations by one module, that
module runs the captured operations themselves.

1. **Linear maps written as** ``addmm`` / ``mm`` with a parameter (GPT-2's ``Conv1D``,
   ``addmm(b, x, W)`` with ``W`` of shape ``(in, out)``) become ``nn.Linear`` calls whose weight
   is a view of ``W.T``.
2. **Written-out RMS normalizations** (Llama, Qwen2, Mistral, Gemma:
   ``x * rsqrt(mean(x^2, -1, keepdim) + eps) * w`` with casts; Gemma's scale ``1 + w``) become
   one :class:`~modlens.nn._decoder_ops.WrittenNorm` each.
3. **Element-wise closures**: a value whose users branch into element-wise operations that join
   again into one value, with no other data input (``gelu_new``, ``x * sigmoid(x)``), becomes one
   :class:`~modlens.nn._decoder_ops.Elementwise`. A product of two different values (a GLU's
   ``act(gate(x)) * up(x)``) is not a closure and stays a gate.
4. **Merged rows** (OPT's MLP, and the ``Conv1D`` of 1): a ``(B, T, d)`` value reshaped to
   ``(B*T, d)``, passed through row-wise operations only (Linear, layer/RMS norm over the last
   dimension, element-wise operations, sums of such rows) and reshaped back to ``(B, T, d')``:
   both reshapes are dropped and the section runs on the 3-D value (the same numbers: every
   operation in it acts on each row alone).
5. **Last-token reads**: ``v[arange(B), idx]`` (``index.Tensor``, Hugging Face sequence
   classifiers) becomes :func:`~modlens.nn._decoder_ops.take_tokens`.

Graphs without these patterns come out unchanged. Rewrites 2 and 3 are in
:mod:`modlens.nn._decoder_closures`, the graph they all work on in :mod:`modlens.nn._decoder_graph`.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from modlens.nn._decoder_closures import closures, ew_operands, written_norms
from modlens.nn._decoder_graph import ASSERTS, RESHAPES, _attr, _Graph, _val
from modlens.nn._decoder_ops import Elementwise, WrittenNorm, take_tokens

aten = torch.ops.aten
# ----- 1. linear maps written as addmm / mm ------------------------------------------------------------
def _linear_maps(g: _Graph) -> None:
    for node in list(g.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.addmm.default, aten.mm.default):
            continue
        if any(k in node.kwargs and node.kwargs[k] != 1 for k in ("beta", "alpha")):
            continue
        if node.target is aten.addmm.default:
            bias_node, x, w_node = node.args[:3]
        else:
            bias_node, (x, w_node) = None, node.args[:2]
        w = g.tensor(w_node)
        b = g.tensor(bias_node) if bias_node is not None else None
        if w is None or w.dim() != 2 or x not in g.dynamic or (bias_node is not None and (b is None or b.dim() != 1)):
            continue
        lin = nn.Linear(w.shape[0], w.shape[1], bias=b is not None, device="meta")
        with torch.no_grad():
            weight = w.t()  # a view of the parameter (the layer shares it, never copies it)
        _share(lin, weight=weight, bias=b)
        base = w_node.target[: -len(".weight")] if w_node.target.endswith(".weight") else w_node.target
        g.add_module(g.name(base, node.name), lin, (x,), node)
    g.graph.eliminate_dead_code()
    g.refresh()


def _share(m: nn.Module, **tensors) -> None:
    for k, v in tensors.items():
        m._parameters.pop(k, None)
        if isinstance(v, nn.Parameter):
            setattr(m, k, v)
        else:
            setattr(m, k, v)

# ----- 4. merged rows --------------------------------------------------------------------------------
_ROW_MODULES = (nn.Linear, Elementwise, WrittenNorm, nn.LayerNorm, nn.RMSNorm)


def _row_module(g: _Graph, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    m = g.gm.get_submodule(node.target)
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        return len(m.normalized_shape) == 1
    return isinstance(m, _ROW_MODULES)


def _merged_rows(g: _Graph) -> None:
    for r in list(g.graph.nodes):
        if r.op != "call_function" or r.target not in RESHAPES or r not in g.live:
            continue
        src, out = _val(r.args[0]), _val(r)
        if src is None or out is None or src.dim() != 3 or out.dim() != 2 or str(out.shape[1]) != str(src.shape[2]):
            continue
        if str(out.shape[0]) != str(src.shape[0] * src.shape[1]):
            continue
        rows = (str(src.shape[0]), str(src.shape[1]))
        members, region, backs = {r}, [], []
        ok = True
        pending = len(g.users(r))  # uses of member values not yet met
        for node in g.after(r):
            if pending == 0:
                break
            if not (set(node.all_input_nodes) & members):
                continue
            pending -= sum(1 for a in node.all_input_nodes if a in members)
            val = _val(node)
            if node.op == "call_function" and node.target in RESHAPES and val is not None and val.dim() == 3 \
                    and (str(val.shape[0]), str(val.shape[1])) == rows:
                backs.append(node)
                continue
            dyn_outside = [a for a in node.all_input_nodes if a in g.dynamic and a not in members]
            if dyn_outside or val is None or val.dim() != 2 or not (_row_module(g, node) or ew_operands(
                    g, node, members, str(val.shape[1]))):
                ok = False
                break
            members.add(node)
            region.append(node)
            pending += len(g.users(node))
        if not ok or not backs or not region:
            continue
        b_sym, t_sym = src.shape[0], src.shape[1]
        for node in region:
            v = _val(node)
            node.meta["val"] = v.view(b_sym, t_sym, *v.shape[1:])
        r.replace_all_uses_with(r.args[0])
        for back in backs:
            back.replace_all_uses_with(back.args[0])
        g.graph.eliminate_dead_code()
        g.refresh()


# ----- 5. last-token reads ---------------------------------------------------------------------------
def _token_reads(g: _Graph) -> None:
    for node in list(g.graph.nodes):
        if node.op != "call_function" or node.target is not aten.index.Tensor:
            continue
        v, index = node.args[0], node.args[1]
        val = _val(v)
        if val is None or val.dim() < 2 or not isinstance(index, (list, tuple)) or len(index) != 2:
            continue
        rows, pos = index
        rows_val, pos_val = _val(rows), _val(pos)
        if rows_val is None or pos_val is None or pos_val.dim() != 1 or rows_val.dim() != 1:
            continue
        if not str(getattr(rows.target, "__name__", "")).startswith("arange"):
            continue
        if str(rows_val.shape[0]) != str(val.shape[0]) or str(pos_val.shape[0]) != str(val.shape[0]):
            continue
        with g.graph.inserting_after(node):
            new = g.graph.call_function(take_tokens, (v, pos))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
    g.graph.eliminate_dead_code()
    g.refresh()


# ----- the pass ----------------------------------------------------------------------------------------
def rewrite(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with the patterns of the module docstring replaced (a new GraphModule sharing the
    model's parameters; ``gm`` itself unchanged only where nothing matched)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in ASSERTS and not node.users:
            gm.graph.erase_node(node)
    g = _Graph(gm)
    if g.input is None:
        return gm
    _linear_maps(g)
    written_norms(g)
    closures(g)
    _merged_rows(g)
    _token_reads(g)
    graph = g.graph
    graph.eliminate_dead_code()
    used = [n for n in graph.nodes if n.op in ("get_attr", "call_module")]
    root = {}
    for node in used:
        if node.op == "call_module" and node.target in g.new:
            name, module = g.new[node.target]
            # a new module must not sit where a parameter still in use lives
            while any(o.target.startswith(name + ".") for o in used if o.target not in g.new):
                name = name + "_fn"
            node.target = name
            root[name] = module
        else:
            root[node.target] = gm.get_submodule(node.target) if node.op == "call_module" else _attr(gm, node.target)
    out = fx.GraphModule(root, graph, type(gm).__name__)
    out.graph.lint()
    return out


__all__ = ["rewrite"]
