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
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils.hooks import RemovableHandle

from cnnvis.device import eval_mode
from cnnvis.errors import (
    LayerNotFoundError,
    UnsupportedModelError,
    VisError,
    did_you_mean,
)
from cnnvis.vis.layer_rule import Call, choose_layer
from cnnvis.vis.layouts import Layout, infer_layout

#: What ``targets`` may be: ``"pred"`` (the model's argmax), one class index for every image,
#: or one class index per image (list / tuple / 1-D integer tensor).
Targets = Union[str, int, Sequence[int], Tensor]

# Modules that act element-wise (or per channel) on a conv output: ``stage_layers`` walks over them
# so that it lands on "a conv's activation" rather than on the raw convolution.
_ELEMENTWISE = (
    nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.Identity,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
)
_SHOWN_NAMES = 40  #: an unknown layer lists every name of a model with at most this many


# --------------------------------------------------------------------------- layers
def layer_names(model: nn.Module) -> list[str]:
    """Every submodule name ``get_layer`` accepts, in registration order."""
    return [name for name, _ in model.named_modules() if name]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (dotted path, e.g. ``"layer4.1.conv2"``, ``"features.13"``).

    An unknown name raises :class:`LayerNotFoundError` naming the closest valid names first."""
    if not isinstance(name, str) or not name:
        raise LayerNotFoundError(f"layer must be a non-empty submodule name, got {name!r}; "
                                 f"{_listing(layer_names(model))}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = layer_names(model)
        raise LayerNotFoundError(f"no layer {name!r} in {type(model).__name__}; {did_you_mean(name, names)}"
                                 f"{_listing(names)}") from None


def _listing(names: list[str]) -> str:
    if len(names) <= _SHOWN_NAMES:
        return f"valid layer names: {', '.join(names)}"
    return f"{len(names)} layer names in all (cnnvis.vis.layer_names(model) or `cnnvis summary` lists them)"


def _probe(model: nn.Module, sample: Tensor) -> list[Call]:
    """Every module call of one forward pass of ``sample``, in the order the calls ended."""
    clock, ended, open_calls = [0], [], {}

    def pre(name: str, module: nn.Module) -> Callable[[nn.Module, tuple, dict], None]:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            # attention is often called by keyword (query=x); its first tensor tells tokens from maps
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
            call = Call(name, module, clock[0], input_shape=tuple(first.shape) if first is not None else None)
            open_calls.setdefault(name, []).append(call)
            clock[0] += 1
        return hook

    def post(name: str) -> Callable[[nn.Module, tuple, object], None]:
        def hook(_m: nn.Module, _args: tuple, out: object) -> None:
            call = open_calls[name].pop()
            call.end, clock[0] = clock[0], clock[0] + 1
            call.output = out if isinstance(out, Tensor) else None
            ended.append(call)
        return hook

    named = [(n, m) for n, m in model.named_modules() if n]
    register = [lambda n=n, m=m: m.register_forward_pre_hook(pre(n, m), with_kwargs=True) for n, m in named]
    register += [lambda n=n, m=m: m.register_forward_hook(post(n)) for n, m in named]
    with model_state(model, grad=False), temporary_hooks(register):
        model(as_input(sample, requires_grad=False))
    return ended


def _sample_input(model: nn.Module) -> Tensor:
    """One zero image of the size the model declares (``model.image_size`` as in a torchvision ViT, timm's
    ``patch_embed.img_size`` or ``pretrained_cfg``), else 224 x 224, with the first convolution's channels."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no nn.Conv2d layer to tell its input; "
                                    "pass images or a layer name")
    cfg = getattr(model, "pretrained_cfg", None)
    declared = (getattr(model, "image_size", None), getattr(getattr(model, "patch_embed", None), "img_size", None),
                cfg.get("input_size", (None,))[1:] if isinstance(cfg, dict) else None)
    size = next((s for s in declared if s), 224)
    side = (size, size) if isinstance(size, int) else tuple(size)
    return torch.zeros(1, conv.in_channels, *side, device=conv.weight.device)


_DEFAULTS: WeakKeyDictionary[nn.Module, dict[tuple, str]] = WeakKeyDictionary()


def default_layer(model: nn.Module, images: Tensor | None = None) -> str:
    """The layer CAM-family methods, ``activations`` and the trust checks use when none is given.

    Found by one probing forward pass of ``images[:1]`` (without ``images``: a zero image of the
    size the model declares, else 224 x 224) that notes every module call in execution order:

    * **Transformers** (a module called ``*Attention*`` or ``nn.MultiheadAttention`` run on tokens
      ``[N, T, C]`` or on a channels-last map): the output that feeds the *last* attention, i.e. the
      last block's first norm (``encoder.layers[-1].ln_1`` in a torchvision ViT, ``blocks[-1].norm1``
      in timm, ``layers[-1].blocks[-1].norm1`` in a timm Swin), as pytorch-grad-cam recommends. Later
      outputs do not work in a ViT: only the class token reaches the head after the last attention,
      so the gradient on every patch token of the last block's output or the final norm is zero and
      Grad-CAM would be blank; the last attention is where patch tokens still feed the class token.
    * **CNNs**: the last output in execution order that is a spatial map ``[N, C, h, w]`` with
      ``h, w > 1`` (``>= 1`` if there is none), not made by a pooling layer -- the features right
      before the pooling and flatten that feed the head. Of the modules that return that same tensor
      the outermost is named (a whole stage: ``layer4`` of a ResNet, ``features`` of MobileNet or
      DenseNet, whose final ReLU is functional), unless it is a flat ``nn.Sequential`` of plain
      layers; then the layer inside is named (``features.13`` of ``mnist_cnn``, the last ReLU of VGG).

    Token and channels-last outputs are read as maps by :mod:`cnnvis.vis.layouts`. The answer is
    cached per model, input shape and module structure.
    """
    sample = (images[:1] if images is not None else _sample_input(model)).detach()
    key = (tuple(sample.shape[1:]), sample.dtype, sample.device, tuple(map(id, model.modules())))
    cached = _DEFAULTS.setdefault(model, {})
    if key not in cached:
        try:
            calls = _probe(model, sample)
        except Exception as exc:
            if images is not None:
                raise  # the model fails on the caller's own images: its error, as it is
            raise UnsupportedModelError(f"{type(model).__name__} cannot run a {list(sample.shape)} sample input "
                                        f"({type(exc).__name__}: {exc}); pass images or a layer name") from exc
        cached.clear()  # one entry: a new shape or a changed model makes the old answer useless
        cached[key] = choose_layer(model, calls, tuple(sample.shape[-2:]))
    return cached[key]


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

    Values and gradients come as maps ``[N, C, h, w]`` where the layer's output can be read as one
    (:mod:`cnnvis.vis.layouts`): a transformer's tokens ``[N, P + h*w, C]`` lose their prefix tokens
    and take the patch grid, channels-last ``[N, h, w, C]`` maps are permuted. Other shapes (a
    linear layer's ``[N, K]``) come as they are; ``layouts[name]`` says which and, if not a map, why.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], grads: bool, live: bool) -> None:
        self.names = list(names)
        self._model = model
        self._grads = grads
        self._live = live
        self.values: dict[str, Tensor] = {}
        self.layouts: dict[str, Layout] = {}
        self._edges: dict[str, GradientEdge] = {}
        self._calls: Counter[str] = Counter()
        self._warned: set[str] = set()
        self._input: tuple[int | None, tuple[int, int] | None] = (None, None)

    def _new_pass(self, args: tuple) -> None:
        """Called by a pre-hook on the model at the start of every forward pass, with its arguments."""
        self._calls.clear()
        self.values.clear()
        self._edges.clear()
        x = args[0] if args else None
        # the batch and image size tell a token grid or a channels-last map from other shapes
        self._input = (x.shape[0], tuple(x.shape[-2:])) if isinstance(x, Tensor) and x.ndim == 4 else (None, None)

    def _record(self, name: str, tensor: object, module: nn.Module | None) -> None:
        if not isinstance(tensor, Tensor):
            parent = name.rpartition(".")[0]
            near = f"the block around it, {parent!r}, or " if parent else ""
            raise UnsupportedModelError(f"layer {name!r} produced a {type(tensor).__name__}, not a tensor",
                                        f"Pick {near}a layer `cnnvis summary` shows with an output shape.")
        self._calls[name] += 1
        layout = self.layouts[name] = infer_layout(self._model, module, tuple(tensor.shape), *self._input)
        self.values[name] = layout.to_map(tensor.clone() if self._live else tensor.detach().clone())
        if self._grads and tensor.requires_grad:
            self._edges[name] = get_gradient_edge(tensor)

    def value(self, name: str) -> Tensor:
        if name not in self.values:
            raise VisError(f"layer {name!r} did not run during the forward pass",
                           "Its parent may use its weights without calling it (as nn.MultiheadAttention does "
                           "its out_proj); `cnnvis summary` lists only the layers that run.")
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
            out[name] = self.layouts[name].to_map(g)
        return out, tuple(extra)

    def clear(self) -> None:
        self.values.clear()
        self.layouts.clear()
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
    Values and gradients are read as ``[N, C, h, w]`` maps where possible (see :class:`Capture`).
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    modules = [get_layer(model, n) for n in names]
    cap = Capture(model, names, grads=grads, live=live)

    def output_hook(name: str) -> Callable[[nn.Module, tuple, object], None]:
        return lambda m, _args, out: cap._record(name, out, m)

    def input_hook(name: str) -> Callable[[nn.Module, tuple], None]:
        return lambda _m, args: cap._record(name, args[0] if args else None, None)

    register: list[Callable[[], RemovableHandle]] = [
        lambda: model.register_forward_pre_hook(lambda _m, args: cap._new_pass(args))]
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
