"""Shared plumbing for every method: layer lookup, target normalisation, model state and hooks.

Everything that touches a user's model goes through :func:`model_state` (eval mode for the call,
gradients switched on only where needed, every flag restored afterwards) and :func:`capture`
(forward hooks that are always removed).

Gradients of a layer are taken with ``torch.autograd.grad`` against the layer output's
*gradient edge*, recorded inside the forward hook at the moment the layer produced it
(``torch.autograd.graph.get_gradient_edge``). That is what a tensor hook registered there would
see: the gradient with respect to the value the layer returned, even if a later in-place op
(``nn.ReLU(inplace=True)``, ResNet's ``out += identity``) rewrites that tensor. Full module
backward hooks are never used; they break on exactly those in-place ops. ``.grad`` fields of the
user's parameters are never written.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, Union

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils.hooks import RemovableHandle

from cnnvis.device import eval_mode
from cnnvis.errors import LayerNotFoundError, UnsupportedModelError, VisError

#: What ``targets`` may be: ``"pred"`` (the model's argmax), one class index for every image,
#: or one class index per image (list / tuple / 1-D integer tensor).
Targets = Union[str, int, Sequence[int], Tensor]

# Modules that act element-wise (or per channel) on a conv output; the default layer walks over them
# so that it lands on "the last conv's activation" rather than on the raw convolution.
_ELEMENTWISE = (
    nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.Identity,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
)


# --------------------------------------------------------------------------- layers
def layer_names(model: nn.Module) -> list[str]:
    """Every submodule name ``get_layer`` accepts, in registration order."""
    return [name for name, _ in model.named_modules() if name]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (dotted path, e.g. ``"layer4.1.conv2"``, ``"features.13"``)."""
    if not isinstance(name, str) or not name:
        raise LayerNotFoundError(f"layer must be a non-empty submodule name, got {name!r}; "
                                 f"valid layer names: {', '.join(layer_names(model))}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise LayerNotFoundError(
            f"no layer {name!r} in {type(model).__name__}; valid layer names: {', '.join(layer_names(model))}"
        ) from None


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _is_flat_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and all(not any(True for _ in c.children()) for c in module.children())


def default_layer(model: nn.Module) -> str:
    """The layer CAM-family methods and ``activations`` use when none is given.

    Rule: take the model's last direct child (in registration order) that contains an ``nn.Conv2d``.
    If that child is a flat ``nn.Sequential`` of plain layers (a conv stack such as
    ``MnistCNN.features``) look inside it the same way; if the pick is a ``Conv2d`` itself, step
    forward over the element-wise modules registered right after it (BatchNorm, ReLU, Tanh ...),
    so the result is the last conv's activation. A child with nested blocks is returned whole.
    Results: ``layer4`` for torchvision ResNets, ``features.13`` (last ReLU) for ``mnist_cnn``,
    ``features.6`` (last Tanh) for ``mnist_classic``.
    """
    container, prefix = model, ""
    while True:
        children = list(container.named_children())
        conv_idx = [i for i, (_, child) in enumerate(children) if _has_conv(child)]
        if not conv_idx:
            raise UnsupportedModelError(f"{type(model).__name__} has no nn.Conv2d layer; pass a layer name explicitly")
        i = conv_idx[-1]
        name, child = children[i]
        if isinstance(child, nn.Conv2d):
            while i + 1 < len(children) and isinstance(children[i + 1][1], _ELEMENTWISE):
                i += 1
            return prefix + children[i][0]
        if not _is_flat_sequential(child):
            return prefix + name
        container, prefix = child, f"{prefix}{name}."


# --------------------------------------------------------------------------- targets and inputs
def resolve_targets(targets: Targets, logits: Tensor) -> Tensor:
    """Normalise ``targets`` once to a ``LongTensor[N]`` on the logits' device, validated against them."""
    if logits.ndim != 2:
        raise UnsupportedModelError(f"model output has shape {tuple(logits.shape)}; expected [N, classes] logits")
    n, k = logits.shape
    if isinstance(targets, str):
        if targets != "pred":
            raise VisError(f"targets must be 'pred', a class index or a list of class indices, got {targets!r}")
        return logits.detach().argmax(dim=1)
    if isinstance(targets, bool):
        raise VisError(f"targets must be 'pred', a class index or a list of class indices, got {targets!r}")
    t = torch.as_tensor(targets, device=logits.device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise VisError(f"targets must be integer class indices, got dtype {t.dtype}")
    t = t.long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise VisError(f"got {t.numel()} targets for {n} images; give one per image, one for all, or 'pred'")
    bad = (t < 0) | (t >= k)
    if bool(bad.any()):
        raise VisError(f"target class {int(t[bad][0])} out of range; the model has {k} classes (0..{k - 1})")
    return t.clone()


def check_images(model: nn.Module, images: Tensor) -> None:
    """Raise a clear error unless ``images`` is a float ``[N, C, H, W]`` batch on the model's device."""
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise VisError(f"images must be a float tensor [N, C, H, W], got {shape}")
    if images.shape[0] == 0:
        raise VisError("images is an empty batch")
    param = next(model.parameters(), None)
    if param is not None and param.device != images.device:
        raise VisError(f"images are on {images.device} but the model is on {param.device}; move one of them")


def predict(model: nn.Module, images: Tensor) -> Tensor:
    """Logits for ``images`` with no autograd graph (call inside :func:`model_state`)."""
    with torch.no_grad():
        return model(images)


def target_scores(logits: Tensor, targets: Tensor) -> Tensor:
    """``logits[i, targets[i]]`` for every row."""
    return logits.gather(1, targets[:, None]).squeeze(1)


# --------------------------------------------------------------------------- model state
@contextmanager
def model_state(model: nn.Module, *, grad: bool) -> Iterator[None]:
    """Run the body with the model in eval mode, then restore every submodule and parameter flag.

    With ``grad=True`` autograd is switched on (also under a caller's ``torch.no_grad()`` or
    ``torch.inference_mode()``) and the parameters are temporarily frozen: the methods only need
    gradients with respect to inputs and activations, so callers make the *input* require grad.
    With ``grad=False`` the body runs under ``torch.no_grad()``. Restoration happens even if the
    body raises; BatchNorm running statistics are never updated because the model is in eval mode.
    """
    requires = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with eval_mode(model):
            if grad:
                for p, _ in requires:
                    p.requires_grad_(False)
            with torch.inference_mode(False), torch.set_grad_enabled(grad):
                yield
    finally:
        for p, flag in requires:
            p.requires_grad_(flag)


def as_input(images: Tensor, requires_grad: bool) -> Tensor:
    """A private copy of ``images`` (a normal tensor even if made under inference mode)."""
    with torch.inference_mode(False):
        x = images.detach().clone()
    return x.requires_grad_(True) if requires_grad else x


@contextmanager
def temporary_hooks(register: Sequence[Callable[[], RemovableHandle]]) -> Iterator[None]:
    """Call each ``register()`` and remove every returned handle on exit, even on error."""
    handles: list[RemovableHandle] = []
    try:
        for fn in register:
            handles.append(fn())
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- capture
class Capture:
    """What the forward hooks of :func:`capture` recorded during one forward pass.

    ``values[name]`` is a snapshot of the layer's output (or input, for ``where="input"``) taken
    when the layer ran: detached, or a differentiable copy with ``live=True``. With ``grads=True``
    :meth:`gradients` returns d(score)/d(that tensor). If a layer runs several times per forward
    (a reused module) the last call counts and a warning says so.
    """

    def __init__(self, names: Sequence[str], grads: bool, live: bool) -> None:
        self.names = list(names)
        self._grads = grads
        self._live = live
        self.values: dict[str, Tensor] = {}
        self._edges: dict[str, GradientEdge] = {}
        self._calls: Counter[str] = Counter()
        self._warned: set[str] = set()

    def _new_pass(self) -> None:
        """Called by a pre-hook on the model at the start of every forward pass."""
        self._calls.clear()
        self.values.clear()
        self._edges.clear()

    def _record(self, name: str, tensor: object) -> None:
        if not isinstance(tensor, Tensor):
            raise UnsupportedModelError(f"layer {name!r} produced a {type(tensor).__name__}, not a tensor")
        self._calls[name] += 1
        self.values[name] = tensor.clone() if self._live else tensor.detach().clone()
        if self._grads and tensor.requires_grad:
            self._edges[name] = get_gradient_edge(tensor)

    def value(self, name: str) -> Tensor:
        if name not in self.values:
            raise VisError(f"layer {name!r} did not run during the forward pass")
        if self._calls[name] > 1 and name not in self._warned:
            self._warned.add(name)
            warnings.warn(f"layer {name!r} ran {self._calls[name]} times in one forward pass; using its last call",
                          stacklevel=3)
        return self.values[name]

    def gradients(self, score: Tensor) -> dict[str, Tensor]:
        """d score / d layer tensor for every captured layer (``score`` is a scalar)."""
        return self.gradients_with(score, ())[0]

    def gradients_with(self, score: Tensor, inputs: Sequence[Tensor]) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
        """:meth:`gradients`, and in the same backward pass d score / d each of ``inputs`` (the image, ...)."""
        for name in self.names:
            self.value(name)
            if name not in self._edges:
                raise VisError(f"the output of layer {name!r} does not depend on the input image")
        grads = torch.autograd.grad(score, [*(self._edges[n] for n in self.names), *inputs], allow_unused=True)
        extra = grads[len(self.names):]
        if any(g is None for g in extra):
            raise VisError("the target score does not depend on the input")
        out = {}
        for name, g in zip(self.names, grads[:len(self.names)]):
            if g is None:
                raise VisError(f"the target score does not depend on layer {name!r}; pick a layer before the output")
            out[name] = g
        return out, tuple(extra)

    def clear(self) -> None:
        self.values.clear()
        self._edges.clear()


@contextmanager
def capture(
    model: nn.Module,
    layers: str | Sequence[str],
    *,
    grads: bool = False,
    where: Literal["output", "input"] = "output",
    live: bool = False,
) -> Iterator[Capture]:
    """Record the output (or first input) of ``layers`` during forward passes inside the body.

    Wraps :func:`model_state` (eval mode, autograd on iff ``grads`` or ``live``), validates the names
    before touching the model, and removes its hooks and drops every recorded tensor on exit.
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    modules = [get_layer(model, n) for n in names]
    cap = Capture(names, grads=grads, live=live)

    def output_hook(name: str) -> Callable[[nn.Module, tuple, object], None]:
        return lambda _m, _args, out: cap._record(name, out)

    def input_hook(name: str) -> Callable[[nn.Module, tuple], None]:
        return lambda _m, args: cap._record(name, args[0] if args else None)

    register: list[Callable[[], RemovableHandle]] = [lambda: model.register_forward_pre_hook(lambda *_: cap._new_pass())]
    for name, module in zip(names, modules):
        if where == "output":
            register.append(lambda m=module, n=name: m.register_forward_hook(output_hook(n)))
        else:
            register.append(lambda m=module, n=name: m.register_forward_pre_hook(input_hook(n)))
    try:
        with model_state(model, grad=grads or live), temporary_hooks(register):
            yield cap
    finally:
        cap.clear()
