"""The model as the incremental occlusion engine sees it: a ``torch.fx`` graph whose nodes are
classified into the few operations whose changed region can be followed (Krypton: Nakandala,
Kumar & Papakonstantinou, "Incremental and Approximate Inference for Faster Occlusion-based Deep
CNN Explanations", SIGMOD 2019, sec. 3).

Kinds of node:

* ``window``: a sliding-window op (``Conv2d`` with eval-mode ``BatchNorm2d`` folded in,
  ``MaxPool2d``, ``AvgPool2d``); its output changes only where its window meets a changed input.
* ``pointwise``: activations, eval-mode BatchNorm not after a conv, Dropout/Identity in eval.
* ``add``: a residual sum; its changed region is the hull of both inputs' regions.
* ``gpool``: global average pooling (``AdaptiveAvgPool2d(1)``), updated from the changed sum.
* ``sink``: flatten, other adaptive pools, linear layers: the changed maps are materialised first.
* ``other``: anything else; fine after materialisation, unsupported on a changed region.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)
_SINK_MODULES = (nn.Flatten, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Linear)
_POINTWISE_FUNCTIONS: dict[Any, Callable[[Tensor], Tensor]] = {
    F.relu: F.relu, torch.relu: torch.relu, torch.tanh: torch.tanh, torch.sigmoid: torch.sigmoid,
    F.silu: F.silu, F.gelu: F.gelu,
}
_POINTWISE_METHODS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu, "relu_": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
}
_SINK_FUNCTIONS = (torch.flatten, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.linear)
_SINK_METHODS = ("flatten", "view", "reshape", "mean", "sum", "size", "dim")


class NotSupported(Exception):
    """The model has an operation the engine cannot follow; ``str()`` says which, for the sidecar."""


@dataclass
class Window:
    """A sliding-window op per axis: kernel, stride, padding, dilation; ``run`` takes the padding."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    pad_value: float  #: what lies outside the map: 0 for conv / avg pool, -inf for max pool
    run: Callable[[Tensor, tuple[int, int]], Tensor] = field(repr=False)
    macs_per_output: int = 1  #: multiply-adds per output pixel and sample (for the cost report)


@dataclass
class Op:
    node: fx.Node
    kind: str  #: window, pointwise, add, gpool, sink, other, input, output, alias
    name: str  #: the module's qualified name (or the function's), for messages
    inputs: list[fx.Node]
    window: Window | None = None
    fn: Callable[[Tensor], Tensor] | None = None  #: the pointwise function
    #: its in-place form, used on a batch's fresh tensors that nothing else reads (ReLU only)
    fn_: Callable[[Tensor], Tensor] | None = None


def _ints(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> Window:
    """``conv`` (and the eval-mode ``bn`` after it) as one convolution with a bias."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise NotSupported(f"Conv2d with padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=weight.dtype,
                                                                         device=weight.device)
    if bn is not None:  # y = (conv(x) - mean) * gamma / sqrt(var + eps) + beta
        scale = bn.running_var.detach().add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.detach()
        shift = -bn.running_mean.detach() * scale + (bn.bias.detach() if bn.bias is not None else 0.0)
        weight = weight * scale.view(-1, 1, 1, 1)
        bias = bias * scale + shift
    stride, dilation, groups = _ints(conv.stride), _ints(conv.dilation), conv.groups
    kernel = _ints(conv.kernel_size)

    def run(x: Tensor, padding: tuple[int, int]) -> Tensor:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    macs = conv.in_channels // groups * kernel[0] * kernel[1] * conv.out_channels
    return Window(kernel, stride, _ints(conv.padding), dilation, 0.0, run, macs)


def _pool(module: nn.Module) -> Window:
    if module.ceil_mode:
        raise NotSupported(f"{type(module).__name__} with ceil_mode=True")
    kernel, stride = _ints(module.kernel_size), _ints(module.stride or module.kernel_size)
    padding = _ints(module.padding)
    if isinstance(module, nn.MaxPool2d):
        if module.return_indices:
            raise NotSupported("MaxPool2d with return_indices=True")
        dilation = _ints(module.dilation)
        return Window(kernel, stride, padding, dilation, float("-inf"),
                      lambda x, p: F.max_pool2d(x, kernel, stride, p, dilation))
    if module.divisor_override is not None or (not module.count_include_pad and padding != (0, 0)):
        raise NotSupported("AvgPool2d with divisor_override or count_include_pad=False and padding")
    # zeros outside the map and count_include_pad=True divide by the full kernel, with or without padding
    return Window(kernel, stride, padding, (1, 1), 0.0,
                  lambda x, p: F.avg_pool2d(x, kernel, stride, p, count_include_pad=True))


def _is_eval_bn(module: nn.Module) -> bool:
    return (isinstance(module, nn.BatchNorm2d) and not module.training and module.running_mean is not None
            and module.running_var is not None)


def _pointwise_module(module: nn.Module) -> Callable[[Tensor], Tensor]:
    if getattr(module, "inplace", False):
        # cached activations are shared between positions and branches: never write into them
        module = copy.copy(module)
        module.inplace = False
    return module


def trace(model: nn.Module) -> tuple[fx.GraphModule, list[Op]]:
    """Trace ``model`` and classify every node; raises :class:`NotSupported` when it cannot be traced."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 -- any tracing failure (control flow on values, ...): full forward
        raise NotSupported(f"the model cannot be traced with torch.fx ({type(exc).__name__})") from None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise NotSupported(f"the model takes {len(placeholders)} inputs; one image batch expected")
    ops: list[Op] = []
    folded: set[fx.Node] = set()
    for node in gm.graph.nodes:
        inputs = [a for a in node.all_input_nodes]
        if node in folded:
            ops.append(Op(node, "alias", str(node.target), inputs))
            continue
        op = Op(node, "other", str(node.target), inputs)
        if node.op in ("placeholder", "output"):
            op.kind = "input" if node.op == "placeholder" else "output"
            if node.op == "output" and not isinstance(node.args[0], fx.Node):
                raise NotSupported("the model returns more than one tensor")
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, nn.Conv2d):
                users = list(node.users)
                bn = None
                if len(users) == 1 and users[0].op == "call_module":
                    follower = gm.get_submodule(users[0].target)
                    if _is_eval_bn(follower):
                        bn = follower
                        folded.add(users[0])
                op.kind, op.window = "window", _folded_conv(module, bn)
            elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
                op.kind, op.window = "window", _pool(module)
            elif isinstance(module, _POINTWISE_MODULES) or _is_eval_bn(module):
                op.kind, op.fn = "pointwise", _pointwise_module(module)
                if type(module) is nn.ReLU:
                    op.fn_ = torch.relu_
            elif isinstance(module, _IDENTITY_MODULES):
                op.kind, op.fn = "pointwise", (lambda t: t)
            elif isinstance(module, nn.AdaptiveAvgPool2d) and _ints(module.output_size) == (1, 1):
                op.kind = "gpool"
            elif isinstance(module, _SINK_MODULES):
                op.kind = "sink"
            op.name = f"{node.target} ({type(module).__name__})"
        elif node.op == "call_function":
            tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
            if node.target in (operator.add, operator.iadd, torch.add) and len(tensor_args) == 2 \
                    and len(node.args) == 2 and not node.kwargs:
                op.kind = "add"
            elif node.target in _POINTWISE_FUNCTIONS and len(tensor_args) == 1:
                op.kind, op.fn = "pointwise", _POINTWISE_FUNCTIONS[node.target]
                if node.target in (F.relu, torch.relu):
                    op.fn_ = torch.relu_
            elif node.target in _SINK_FUNCTIONS:
                op.kind = "sink"
            op.name = getattr(node.target, "__name__", str(node.target))
        elif node.op == "call_method":
            if node.target in _POINTWISE_METHODS and len(node.args) == 1 and not node.kwargs:
                op.kind, op.fn = "pointwise", _POINTWISE_METHODS[node.target]
                if node.target in ("relu", "relu_"):
                    op.fn_ = torch.relu_
            elif node.target in _SINK_METHODS:
                op.kind = "sink"
            op.name = f".{node.target}()"
        ops.append(op)
    return gm, ops


def run_node(gm: fx.GraphModule, op: Op, env: dict[fx.Node, Any], inplace: bool = False) -> Any:
    """Run one node on whole maps: the engine's own ops for the kinds it knows, the model's otherwise.

    ``inplace``: the pointwise input is a fresh tensor no other node reads, so it may be overwritten.
    """
    node = op.node
    if op.kind == "alias":
        return env[op.inputs[0]]
    if op.kind == "window":
        assert op.window is not None
        return op.window.run(env[op.inputs[0]], op.window.padding)
    if op.kind == "pointwise":
        assert op.fn is not None
        return (op.fn_ if inplace and op.fn_ is not None else op.fn)(env[op.inputs[0]])
    if op.kind == "add":
        return env[op.inputs[0]] + env[op.inputs[1]]  # never in place: the operands may be cached
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "get_attr":
        target: Any = gm
        for part in str(node.target).split("."):
            target = getattr(target, part)
        return target
    raise NotSupported(f"graph node {node.op} {node.target}")
