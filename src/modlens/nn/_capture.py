"""Capture a model once as one graph that every part of modlens shares.

:func:`capture` wraps the user's model so that it maps one input tensor to one logits tensor
(keyword input ``input_name=``, output chosen by ``output=`` or found as ``.logits``, the
single tensor of a tuple/dict/ModelOutput), then:

1. exports it with ``torch.export`` (non-strict) at the shape of the user's data, batch
   dimension dynamic; shape-dependent Python control flow (``if num_channels != ...``) is
   specialized away;
2. falls back to ``torch.fx`` symbolic tracing when export fails or when no example input
   is given (the adapter finds one from the model when the user gives none, so this is the last
   resort, or the user's explicit ``method="fx"``);
3. when both fail, raises :class:`ModelTraceError` naming the submodule, the source line and
   the workaround.

The exported ATen graph is rewritten so that weight layers and normalizations are
``call_module`` nodes of canonical torch modules (``nn.Linear``, ``nn.Conv2d``,
``nn.BatchNorm2d``, ``nn.LayerNorm``, ...) that *share* the user's parameters and buffers and
are named by the user's module paths (``layer3.1.conv2``). The user's model itself is never
modified: export runs in eval mode, and training flags are restored afterwards.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from modlens.nn._computed import _NORMS, computed_layers
from modlens.nn._decoder_capture import rewrite
from modlens.nn._fx import ModelTraceError, _user_frame, eval_mode, trace
from modlens.nn._split_linear import split_linears

aten = torch.ops.aten
_PREFIX = "model."
METHODS = ("auto", "export", "fx")


class CaptureWrapper(nn.Module):
    """``forward(x)`` = the logits tensor of ``model`` called on ``x`` (positionally or as
    ``input_name=x``), selected by ``output`` (None: ``.logits``, or the single tensor)."""

    def __init__(self, model: nn.Module, input_name: str | None = None, output=None, forward_kwargs=None):
        super().__init__()
        self.model = model
        self.input_name = input_name
        self.output = output
        self.forward_kwargs = dict(forward_kwargs or {})

    def forward(self, x):
        if self.input_name is None:
            out = self.model(x, **self.forward_kwargs)
        else:
            out = self.model(**{self.input_name: x}, **self.forward_kwargs)
        return select_output(out, self.output, type(self.model).__name__)


def select_output(out, output, name: str = "model"):
    """The logits tensor inside whatever the forward returned."""
    if callable(output) and not isinstance(output, (str, int)):
        return output(out)
    if isinstance(output, (str, int)):
        if isinstance(output, str) and hasattr(out, output) and not isinstance(out, dict):
            return getattr(out, output)
        try:
            return out[output]
        except (KeyError, IndexError, TypeError):
            raise ModelTraceError(f"{name}.forward returned {type(out).__name__} with no entry {output!r} "
                                  "(the output= selector)") from None
    if _is_tensor(out):
        return out
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if logits is not None:
        return logits
    values = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (tuple, list)) else []
    tensors = [v for v in values if _is_tensor(v)]
    if len(tensors) == 1:
        return tensors[0]
    raise ModelTraceError(
        f"{name}.forward returns {type(out).__name__} with {len(tensors)} tensors and no .logits; pass "
        "output= (a key, an index, or a function of the output) to say which one holds the class scores"
    )


def _is_tensor(v) -> bool:
    return isinstance(v, (torch.Tensor, fx.Proxy))


# ----- export --------------------------------------------------------------------------------------
def _export(wrapper: CaptureWrapper, example: torch.Tensor):
    from torch.export import Dim, export

    return export(wrapper, (example,), dynamic_shapes=({0: Dim.AUTO},), strict=False)


def _path(fqn: str) -> str:
    return fqn[len(_PREFIX):] if fqn.startswith(_PREFIX) else fqn


def _module_path(node: fx.Node) -> str:
    """The user's module path a node of an exported graph was produced in ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return _path(list(stack.values())[-1][0])


def where(node: fx.Node) -> str:
    """'op name' in module 'path' (for error messages)."""
    target = node.target
    op = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    path = _module_path(node) or (node.target if node.op == "call_module" else "")
    return f"operation '{op}'" + (f" in module '{path}'" if path else "")


_INPLACE = {
    aten.add_.Tensor: aten.add.Tensor, aten.mul_.Tensor: aten.mul.Tensor, aten.relu_.default: aten.relu.default,
    aten.hardtanh_.default: aten.hardtanh.default, aten.dropout_.default: aten.dropout.default,
    aten.silu_.default: aten.silu.default, aten.hardswish_.default: aten.hardswish.default,
    aten.hardsigmoid_.default: aten.hardsigmoid.default, aten.sigmoid_.default: aten.sigmoid.default,
    aten.tanh_.default: aten.tanh.default, aten.leaky_relu_.default: aten.leaky_relu.default,
    aten.gelu_.default: aten.gelu.default, aten.sub_.Tensor: aten.sub.Tensor,
}


#: Aliases of one operation, read as that operation: ``swapaxes``/``swapdims`` are ``transpose``
#: (torchvision's MaxViT swaps axes back after its grid attention).
_ALIASES = {op: aten.transpose.int for op in (getattr(getattr(aten, n, None), "default", None)
                                              for n in ("swapaxes", "swapdims")) if op is not None}


def _functionalize(graph: fx.Graph) -> None:
    """Replace in-place ops by their out-of-place versions where nothing reads the mutated value later,
    and aliases by the operation they name (:data:`_ALIASES`)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ALIASES:
            node.target = _ALIASES[node.target]
            continue
        if node.op == "call_function" and node.target in _INPLACE and isinstance(node.args[0], fx.Node):
            later = [u for u in node.args[0].users if u is not node and order[u] > order[node]]
            if not later:
                node.target = _INPLACE[node.target]


_POOL_WITH_INDICES = {aten.adaptive_max_pool1d.default: F.adaptive_max_pool1d,
                      aten.adaptive_max_pool2d.default: F.adaptive_max_pool2d}


def _pool_values(graph: fx.Graph) -> None:
    """``getitem(adaptive_max_pool(x), 0)`` (export returns values and indices) -> the pooling
    function returning the values only, as torch.fx and the operation registry see it."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _POOL_WITH_INDICES:
            continue
        users = list(node.users)
        if any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in users):
            continue      # the indices are used: left as it is (and refused where it matters)
        with graph.inserting_before(node):
            values = graph.call_function(_POOL_WITH_INDICES[node.target], tuple(node.args[:2]))
        values.meta = dict(node.meta)
        if isinstance(values.meta.get("val"), (tuple, list)):
            values.meta["val"] = values.meta["val"][0]
        for u in users:
            u.replace_all_uses_with(values)
            graph.erase_node(u)
        graph.erase_node(node)


_WEIGHT_OPS = (aten.linear.default, aten.conv1d.default, aten.conv2d.default, aten.conv1d.padding,
               aten.conv2d.padding)
_AUTOCAST = getattr(torch.ops.higher_order, "wrap_with_autocast", None)
_GRAD = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
# higher-order ops that wrap their body in a mode, and the index of the body among their arguments
_MODE_WRAPPERS = {op: at for op, at in ((_AUTOCAST, 4), (_GRAD, 1)) if op is not None}


class _Builder:
    """Copies an exported graph, turning parameters into attributes and layers into modules."""

    def __init__(self, ep, wrapper: nn.Module):
        self.ep = ep
        self.wrapper = wrapper
        self.graph = fx.Graph()
        self.root: dict[str, object] = {}
        self.env: dict[fx.Node, fx.Node] = {}
        self.tensors: dict[fx.Node, str] = {}   # placeholder -> parameter/buffer path
        self.calls: dict[str, int] = {}
        self.dynamic: set[fx.Node] = set()      # nodes of the exported graph that depend on the input
        self.inlined: dict[fx.Node, list] = {}  # higher-order op -> its body's output nodes

    def tensor_of(self, node) -> torch.Tensor | None:
        if not isinstance(node, fx.Node) or node not in self.tensors:
            return None
        return self.root[self.tensors[node]]

    def build(self) -> fx.GraphModule:
        sig = self.ep.graph_signature
        specs = {s.arg.name: s for s in sig.input_specs}
        state = dict(self.wrapper.named_parameters(remove_duplicate=False))
        state.update(dict(self.wrapper.named_buffers(remove_duplicate=False)))
        n_const = 0
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                spec = specs[node.name]
                kind = spec.kind.name
                if kind == "USER_INPUT":
                    self.dynamic.add(node)
                    self.env[node] = self.graph.placeholder("x")
                    self.env[node].meta = dict(node.meta)
                    continue
                if kind in ("PARAMETER", "BUFFER"):
                    value, name = state[spec.target], _path(spec.target)
                else:  # lifted constants
                    value, name = self.ep.constants[spec.target], f"_modlens_const_{n_const}"
                    n_const += 1
                self.root[name] = value
                self.tensors[node] = name
                self.env[node] = self.graph.get_attr(name)
                self.env[node].meta = dict(node.meta)
            elif node.op == "output":
                outs = [o for o in sig.output_specs]
                if len(outs) != 1 or outs[0].kind.name != "USER_OUTPUT":
                    raise ModelTraceError("the exported model has more than the logits as output (buffer "
                                          "mutations in eval mode?); modlens needs a forward without side effects")
                self.graph.output(self.env[node.args[0][0]])
            else:
                self._copy(node)
        name = type(self.wrapper.model).__name__
        gm = fx.GraphModule(self.root, self.graph, name)
        _functionalize(gm.graph)
        _pool_values(gm.graph)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
        # decoder patterns (addmm linear maps, written-out norms and activations, merged rows, last-token reads)
        return rewrite(fx.GraphModule({k: v for k, v in self.root.items() if k in used}, gm.graph, name))

    def _copy(self, node: fx.Node) -> None:
        if node.op == "get_attr" and isinstance(getattr(self.ep.graph_module, node.target, None), fx.GraphModule):
            return   # the body of a higher-order op, inlined where the op is called
        if node.target in _MODE_WRAPPERS:
            self._inline(node)
            return
        if node.target is operator.getitem and node.args[0] in self.inlined:
            inner = self.inlined[node.args[0]][node.args[1]]
            self.env[node] = self.env[inner]
            if inner in self.dynamic:
                self.dynamic.add(node)
            return
        if any(a in self.dynamic for a in node.all_input_nodes):
            self.dynamic.add(node)
        new = self._layer(node)
        if new is None:
            new = self.graph.node_copy(node, lambda a: self.env[a])
        new.meta = dict(node.meta)
        self.env[node] = new

    def _inline(self, node: fx.Node) -> None:
        """Copy the body of a higher-order op that only sets a mode around it (``torch.autocast``
        disabled, ``torch.set_grad_enabled``) in its place: the operations in it are followed like
        any other (EfficientViT computes its attention under ``autocast(enabled=False)``)."""
        at = _MODE_WRAPPERS[node.target]
        if node.target is _AUTOCAST and node.args[2]:
            raise ModelTraceError(
                f"{where(node)} runs under torch.autocast(dtype={node.args[1]}, enabled=True); modlens analyses a "
                "model in one precision: disable autocast in forward or convert the model to that dtype"
            )
        body = getattr(self.ep.graph_module, node.args[at].target)
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        for inner, outer in zip(placeholders, node.args[at + 1:], strict=True):
            self.env[inner] = self.env[outer]
            if outer in self.tensors:
                self.tensors[inner] = self.tensors[outer]
            if outer in self.dynamic:
                self.dynamic.add(inner)
        outs = ()
        for inner in body.graph.nodes:
            if inner.op == "output":
                outs = inner.args[0] if isinstance(inner.args[0], (tuple, list)) else (inner.args[0],)
            elif inner.op != "placeholder":
                self._copy(inner)
        self.inlined[node] = list(outs)

    # ----- weight layers and normalizations as modules ---------------------------------------------------
    def _name(self, node: fx.Node, weight) -> str:
        if weight is not None and weight in self.tensors and self.tensors[weight].endswith(".weight"):
            base = self.tensors[weight][: -len(".weight")]
        else:
            base = _module_path(node) or node.name
        self.calls[base] = self.calls.get(base, 0) + 1
        return base if self.calls[base] == 1 else f"{base}_call{self.calls[base]}"

    def _param(self, node, what: str, owner: fx.Node, required: bool = True):
        if node is None and not required:
            return None
        t = self.tensor_of(node)
        if t is None:
            raise ModelTraceError(
                f"{where(owner)}: its {what} is computed in forward, not a parameter; modlens reads layer weights "
                "from parameters (remove weight normalization or parametrizations before analysing)")
        return t

    def _computed(self, node) -> bool:
        """A value computed from parameters, buffers and constants only (not the input)."""
        return isinstance(node, fx.Node) and node not in self.tensors and node not in self.dynamic

    def _layer(self, node: fx.Node) -> fx.Node | None:
        t = node.target
        args = list(node.args) + [None] * 10
        x = self.env.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        computed_bias = None
        if t in _WEIGHT_OPS and (self._computed(args[1]) or self._computed(args[2])) and (
                t is not aten.linear.default or self._computed(args[1])):
            return None   # a weight computed from parameters: a layer with that weight (modlens.nn._computed)
        if t in _NORMS and any(self._computed(args[i]) for i in _NORMS[t]):
            return None   # a norm scale computed from parameters (weight.float(), 1 + weight): modlens.nn._computed
        if t is aten.linear.default:
            w = self._param(args[1], "weight", node)
            if isinstance(args[2], fx.Node) and args[2] not in self.tensors and args[2] not in self.dynamic:
                # a bias computed from parameters (BEiT's cat(q_bias, zeros, v_bias)): a Linear without
                # bias, then the computed bias added (a per-channel shift, recomputed in lesions)
                computed_bias, b = self.env[args[2]], None
            else:
                b = self._param(args[2], "bias", node, required=False)
            m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
            _share(m, weight=w, bias=b)
        elif t in (aten.conv1d.default, aten.conv2d.default, aten.conv1d.padding, aten.conv2d.padding):
            w = self._param(args[1], "weight", node)
            b = self._param(args[2], "bias", node, required=False)
            d = w.dim() - 2
            stride, padding, dilation = (args[3] or [1] * d), (args[4] if args[4] is not None else [0] * d), (args[5] or [1] * d)
            groups = args[6] or 1
            cls = nn.Conv2d if d == 2 else nn.Conv1d
            m = cls(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride, padding=padding,
                    dilation=dilation, groups=groups, bias=b is not None, device="meta")
            _share(m, weight=w, bias=b)
        elif t is aten.batch_norm.default:
            w, b = self._param(args[1], "weight", node, False), self._param(args[2], "bias", node, False)
            rm, rv = self.tensor_of(args[3]), self.tensor_of(args[4])
            if rm is None or rv is None or args[5]:
                return None  # batch statistics: not a foldable batch norm (mixes samples, left as is)
            ndim = _ndim(node)
            cls = nn.BatchNorm1d if ndim in (2, 3) else nn.BatchNorm2d if ndim == 4 else nn.BatchNorm3d
            m = cls(rm.shape[0], eps=float(args[7]), affine=w is not None, device="meta")
            _share(m, weight=w, bias=b)
            m.running_mean, m.running_var = rm, rv
            m.num_batches_tracked = torch.zeros((), dtype=torch.long)
            m.eval()
        elif t is aten.layer_norm.default:
            w, b = self._param(args[2], "weight", node, False), self._param(args[3], "bias", node, False)
            m = nn.LayerNorm(list(args[1]), eps=float(args[4] if args[4] is not None else 1e-5),
                             elementwise_affine=w is not None, bias=b is not None, device="meta")
            _share(m, weight=w, bias=b)
        elif t is aten.group_norm.default:
            w, b = self._param(args[2], "weight", node, False), self._param(args[3], "bias", node, False)
            channels = node.args[0].meta["val"].shape[1]
            m = nn.GroupNorm(int(args[1]), int(channels), eps=float(args[4] if args[4] is not None else 1e-5),
                             affine=w is not None, device="meta")
            _share(m, weight=w, bias=b)
        elif t is aten.rms_norm.default:
            w = self._param(args[2], "weight", node, False)
            m = nn.RMSNorm(list(args[1]), eps=args[3], elementwise_affine=w is not None, device="meta")
            _share(m, weight=w)
        else:
            return None
        name = self._name(node, node.args[1] if t not in (aten.layer_norm.default, aten.group_norm.default,
                                                          aten.rms_norm.default) else node.args[2] if len(node.args) > 2 else None)
        self.root[name] = m
        out = self.graph.call_module(name, (x,))
        if computed_bias is None:
            return out
        out.meta = dict(node.meta)
        return self.graph.call_function(aten.add.Tensor, (out, computed_bias))


def _ndim(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else 4


def _share(m: nn.Module, **tensors) -> None:
    for k, v in tensors.items():
        if v is None:
            setattr(m, k, None)
        elif isinstance(v, nn.Parameter):
            setattr(m, k, v)
        else:
            m._parameters.pop(k, None)
            setattr(m, k, v)


# ----- fx fallback -----------------------------------------------------------------------------------
def _fx_capture(wrapper: CaptureWrapper, leaf_modules) -> fx.GraphModule:
    leaves = tuple(_PREFIX + l if isinstance(l, str) else l for l in leaf_modules)
    gm = trace(wrapper, leaves, name=type(wrapper.model).__name__)
    root: dict[str, object] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            obj = gm.get_submodule(node.target) if node.op == "call_module" else _get_attr(gm, node.target)
            node.target = _path(node.target)
            root[node.target] = obj
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.target = "x"
            node._rename("x")
        elif node.name.startswith("model_"):
            node._rename(node.name[len("model_"):])
    return fx.GraphModule(root, gm.graph, type(wrapper.model).__name__)


def _get_attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ----- the entry point --------------------------------------------------------------------------------
def capture(model: nn.Module, example: torch.Tensor | None = None, *, input_name: str | None = None,
            output=None, forward_kwargs=None, leaf_modules=(), method: str = "auto") -> tuple[fx.GraphModule, str]:
    """(graph module, ``"export"`` or ``"fx"``) for ``model``; see the module docstring.

    ``method``: ``"auto"`` (export when an example is given, fx only as the last resort: without
    an example or when export fails; the export error is kept in ``gm.meta["export_error"]``),
    ``"export"`` or ``"fx"``. Callers find an example when the user gives none
    (:mod:`modlens.nn._example`)."""
    if method not in METHODS:
        raise ValueError(f"capture method must be 'auto', 'export' or 'fx', got {method!r}")
    wrapper = CaptureWrapper(model, input_name, output, forward_kwargs)
    export_error = None
    if method != "fx" and example is not None and not leaf_modules:
        try:
            with eval_mode(model), torch.no_grad():
                ep = _export(wrapper, example)
            batch = [n for n in ep.graph.nodes if n.op == "placeholder"][-1].meta["val"].shape[0]
            if isinstance(batch, int):
                raise ModelTraceError("torch.export specialized the batch dimension; the graph would accept "
                                      f"only batches of {batch}")
            return split_linears(computed_layers(_Builder(ep, wrapper).build())), "export"
        except ModelTraceError as exc:
            export_error = exc
            if method == "export":
                raise
        except Exception as exc:  # export raises many types
            export_error = exc
            if method == "export":
                raise ModelTraceError(f"torch.export could not capture {type(model).__name__}: "
                                      f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    try:
        gm = split_linears(computed_layers(_fx_capture(wrapper, leaf_modules)))
        if export_error is not None:
            gm.meta["export_error"] = _first_line(export_error)
        return gm, "fx"
    except ModelTraceError as exc:
        if export_error is not None:   # fx was the fallback: the export error comes first
            raise ModelTraceError(f"modlens could not capture {type(model).__name__}: torch.export failed"
                                  f"{_export_where(model, export_error)}: {_first_line(export_error)}; the "
                                  f"torch.fx fallback failed too: {exc}") from exc
        raise


def _export_where(model: nn.Module, exc: BaseException) -> str:
    """' inside submodule 'path' (Type), at file:line in f(): `source`' of an export failure: the
    innermost submodule of ``model`` and user source line in its traceback (non-strict export runs
    the model's own Python code)."""
    names = {id(m): n for n, m in model.named_modules() if n}
    inner, tb = None, exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if id(owner) in names:
            inner = owner
        tb = tb.tb_next
    where = f" inside submodule '{names[id(inner)]}' ({type(inner).__name__})" if inner is not None else ""
    return where + _user_frame(exc)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:limit]


__all__ = ["capture", "CaptureWrapper", "select_output", "where", "ModelTraceError", "METHODS"]
