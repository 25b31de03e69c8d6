"""Modified backward rules at rectifiers: guided backpropagation and the deconvnet.

Both methods are the input gradient with one change: at every rectifier the backward signal
``R_{l+1}`` (the gradient arriving from above) is replaced by

* ``guided`` (Springenberg et al. 2014, "Striving for Simplicity", sec. 3.4, fig. 1):
  ``R_l = f'(x) * relu(R_{l+1})`` -- the function's own derivative at the forward input times only
  the positive part of the upstream gradient. For ReLU that is the paper's
  ``(x > 0) * (R_{l+1} > 0) * R_{l+1}``; its natural extension to the other piecewise-linear
  rectifiers gates by where their derivative is non-zero and scales by it:
  ReLU6 ``0 < x < 6``; Hardtanh with ``min_val >= 0`` (a clamp) ``min_val < x < max_val``;
  LeakyReLU / PReLU 1 where ``x > 0`` and the slope elsewhere.
* ``deconvnet`` (Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks",
  sec. 2.1, "Rectification"): ``R_l = relu(R_{l+1})`` -- the reconstruction passes through a ReLU,
  *not* gated by the forward input's sign; for every rectifier above the same sign-rectified signal.

The rule holds for the duration of one call through a ``TorchFunctionMode`` that swaps every
rectifier *call* -- ``nn.ReLU``/``ReLU6``/``Hardtanh``/``LeakyReLU``/``PReLU`` modules (which call
``F.relu``, ``F.hardtanh``, ``F.leaky_relu``, ``torch.prelu``), the functional forms (``F.relu6``,
``torch.relu``, ``Tensor.relu``, ``torch._C._nn.hardtanh_`` ...), in-place or not -- for an
autograd Function with the rule's backward. The user's model is not modified: no module is
replaced and no hook is added. Rectifier-like activations that have no such rule (GELU, SiLU,
Hardswish, ELU, SELU, CELU, Mish, Softplus) keep the plain gradient; the mode counts them so the
caller can say so (Captum's ``GuidedBackprop`` / ``Deconvolution`` hook ``nn.ReLU`` modules only
and silently return the plain gradient everywhere else, e.g. at all 35 ReLU6 of a MobileNet-V2).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from cnnvis.errors import UnsupportedModelError, VisWarning
from cnnvis.vis.fused import gradient_copy
from cnnvis.vis.gradients import input_gradients
from cnnvis.vis.hooks import Targets

Rule = Literal["guided", "deconvnet"]
RULES: tuple[str, ...] = ("guided", "deconvnet")
#: how messages name each rule
TITLES = {"guided": "guided backprop", "deconvnet": "deconvnet"}


class _RectifierBackward(torch.autograd.Function):
    """``activation(x)`` forward; backward ``relu(grad) * gate`` (guided) or ``relu(grad)`` (deconvnet).

    ``gate`` is computed from the forward input and saved: a bool region (ReLU, ReLU6, clamps) or
    the local slope (LeakyReLU, PReLU); ``None`` for the deconvnet, which saves nothing.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, activation: Callable[[Tensor], Tensor],
                gate: Callable[[Tensor], Tensor] | None) -> Tensor:
        ctx.gated = gate is not None
        if gate is not None:
            ctx.save_for_backward(gate(x))
        return activation(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        out = grad.clamp(min=0)
        if ctx.gated:
            (gate,) = ctx.saved_tensors
            out.mul_(gate)
        return out, None, None


# --------------------------------------------------------------------------- what each call is
def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _clamp(lo: float, hi: float) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    return (lambda x: F.hardtanh(x, lo, hi)), (lambda x: (x > lo) & (x < hi))


def _leaky(slope: float | Tensor) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    def gate(x: Tensor) -> Tensor:
        s = torch.as_tensor(slope, dtype=x.dtype, device=x.device)
        if s.numel() > 1:  # PReLU: one slope per channel (dim 1)
            s = s.reshape(1, -1, *([1] * (x.ndim - 2)))
        return torch.where(x > 0, torch.ones((), dtype=x.dtype, device=x.device), s)

    if isinstance(slope, Tensor):
        return (lambda x: torch.prelu(x, slope)), gate
    return (lambda x: F.leaky_relu(x, slope)), gate


#: (name, x, inplace, activation, gate) for a rectifier call, or None if the call is no rectifier
Parsed = tuple[str, Tensor, bool, Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]
_RELU = ((lambda x: torch.relu(x)), (lambda x: x > 0))


def _relu(inplace: bool | None) -> Callable[[tuple, dict], Parsed]:
    def parse(a: tuple, k: dict) -> Parsed:
        flag = bool(_arg(a, k, 1, "inplace", False)) if inplace is None else inplace
        return ("ReLU", a[0], flag, *_RELU)
    return parse


def _relu6(inplace: bool | None) -> Callable[[tuple, dict], Parsed]:
    def parse(a: tuple, k: dict) -> Parsed:
        flag = bool(_arg(a, k, 1, "inplace", False)) if inplace is None else inplace
        return ("ReLU6", a[0], flag, *_clamp(0.0, 6.0))
    return parse


def _hardtanh(inplace: bool | None) -> Callable[[tuple, dict], Parsed | None]:
    def parse(a: tuple, k: dict) -> Parsed | None:
        lo, hi = float(_arg(a, k, 1, "min_val", -1.0)), float(_arg(a, k, 2, "max_val", 1.0))
        if lo < 0:  # a tanh-like saturation around 0, not a rectifier
            return None
        flag = bool(_arg(a, k, 3, "inplace", False)) if inplace is None else inplace
        return ("ReLU6" if (lo, hi) == (0.0, 6.0) else "Hardtanh", a[0], flag, *_clamp(lo, hi))
    return parse


def _leaky_relu(inplace: bool | None) -> Callable[[tuple, dict], Parsed]:
    def parse(a: tuple, k: dict) -> Parsed:
        slope = float(_arg(a, k, 1, "negative_slope", 0.01))
        flag = bool(_arg(a, k, 2, "inplace", False)) if inplace is None else inplace
        return ("LeakyReLU", a[0], flag, *_leaky(slope))
    return parse


def _prelu(a: tuple, k: dict) -> Parsed:
    return ("PReLU", a[0], False, *_leaky(_arg(a, k, 1, "weight", None).detach()))


# Every entry point a rectifier call can reach the mode through in torch 2.x: the nn modules call
# the F.* Python functions (F.relu, F.hardtanh for ReLU6 and Hardtanh, F.leaky_relu, torch.prelu);
# code may call the F.*, torch.* and Tensor.* forms or the torch._C._nn builtins directly. A call
# reaches the mode once, at its outermost entry point (inner calls run with the mode switched off).
_RECTIFIERS: dict[Any, Callable[[tuple, dict], Parsed | None]] = {
    F.relu: _relu(None), torch.relu: _relu(False), torch._C.TensorBase.relu: _relu(False),
    torch.relu_: _relu(True), torch._C.TensorBase.relu_: _relu(True),
    F.relu6: _relu6(None), torch._C._nn.relu6: _relu6(False), torch._C._nn.relu6_: _relu6(True),
    F.hardtanh: _hardtanh(None), torch._C._nn.hardtanh: _hardtanh(False), torch._C._nn.hardtanh_: _hardtanh(True),
    F.leaky_relu: _leaky_relu(None), torch._C._nn.leaky_relu: _leaky_relu(False),
    torch._C._nn.leaky_relu_: _leaky_relu(True),
    torch.prelu: _prelu, torch._C.TensorBase.prelu: _prelu,
}
#: rectifier-like activations without a guided / deconvnet rule: they keep the plain gradient
_PLAIN: dict[Any, str] = {
    torch._C._nn.gelu: "GELU", torch._C._nn.gelu_: "GELU",
    F.silu: "SiLU", torch._C._nn.silu: "SiLU", torch._C._nn.silu_: "SiLU",
    F.hardswish: "Hardswish", torch._C._nn.hardswish: "Hardswish", torch._C._nn.hardswish_: "Hardswish",
    F.elu: "ELU", torch._C._nn.elu: "ELU", torch._C._nn.elu_: "ELU",
    F.selu: "SELU", torch.selu: "SELU", torch.selu_: "SELU",
    F.celu: "CELU", torch.celu: "CELU", torch.celu_: "CELU",
    F.mish: "Mish", torch._C._nn.mish: "Mish", torch._C._nn.mish_: "Mish",
    torch._C._nn.softplus: "Softplus",
}
#: the rectifiers a rule applies to, for messages
RECTIFIER_NAMES = ("ReLU", "ReLU6", "Hardtanh (min_val >= 0)", "LeakyReLU", "PReLU")


class RectifierMode(TorchFunctionMode):
    """Routes every rectifier call through the backward ``rule``.

    ``applied`` counts the calls it rewrote by activation (``{"ReLU6": 35}``), ``plain`` the
    rectifier-like calls it could not (``{"GELU": 4}``), over everything run inside the mode.
    """

    def __init__(self, rule: Rule) -> None:
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        self.rule = rule
        self.applied: Counter[str] = Counter()
        self.plain: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        parse = _RECTIFIERS.get(func)
        parsed = parse(args, kwargs) if parse is not None else None
        if parsed is None:
            name = _PLAIN.get(func)
            if name is not None:
                self.plain[name] += 1
            return func(*args, **kwargs)
        name, x, inplace, activation, gate = parsed
        self.applied[name] += 1
        out = _RectifierBackward.apply(x, activation, gate if self.rule == "guided" else None)
        # keep in-place semantics for code that relies on the side effect (x.relu_(); use x)
        return x.copy_(out) if inplace else out


@contextmanager
def rectifier_rule(rule: Rule) -> Iterator[RectifierMode]:
    """Inside the body every rectifier call backpropagates with ``rule`` (``"guided"`` or ``"deconvnet"``)."""
    with RectifierMode(rule) as mode:
        yield mode


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{n} {name}" for name, n in counter.most_common())


def check_rule_applied(mode: RectifierMode, model: nn.Module) -> None:
    """After one forward pass inside ``mode``: raise if no rectifier was rewritten (the map would be
    a plain gradient); warn, naming them, if rectifier-like calls kept the plain gradient."""
    title = TITLES[mode.rule]
    if not mode.applied:
        found = f" (it calls {_counts(mode.plain)}, which have no {title} rule)" if mode.plain else ""
        raise UnsupportedModelError(
            f"{title} found no ReLU call (nor {', '.join(RECTIFIER_NAMES[1:])}) in {type(model).__name__}{found}; "
            "it would be a plain gradient. Use 'saliency' instead."
        )
    if mode.plain:
        applied, plain = sum(mode.applied.values()), sum(mode.plain.values())
        warnings.warn(
            f"{title} applied at {applied} {'/'.join(mode.applied)} call{'s' if applied > 1 else ''}; "
            f"{_counts(mode.plain)} call{'s pass' if plain > 1 else ' passes'} the plain gradient "
            f"(no {title} rule for them)",
            VisWarning, stacklevel=3,
        )


def rectified_gradients(model: nn.Module, images: Tensor, targets: Targets, rule: Rule) -> Tensor:
    """Input gradients ``[N, C, H, W]`` with ``rule`` at every rectifier (see the module docstring).

    Raises :class:`UnsupportedModelError` if the model calls no rectifier; warns (:class:`VisWarning`)
    if some of its activations keep the plain gradient.
    """
    fast, laid_out = gradient_copy(model, images)  # made before the mode is on: traced with plain rectifiers
    with rectifier_rule(rule) as mode:
        grads = input_gradients(fast, laid_out, targets)
    check_rule_applied(mode, model)
    return grads
