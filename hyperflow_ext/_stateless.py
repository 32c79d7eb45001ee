"""Run a user's module with substituted tensors, without writing to it.

``torch.func.functional_call`` swaps a module's attributes in place for the length of a call and
swaps them back afterwards, so two overlapping calls on one module (two serving threads, or a
serving thread and the user's own forward) restore each other's swaps in the wrong order and
leave the module holding some task's tensors. Here every call gets a private *shallow view*:
new ``nn.Module`` objects with their own ``_parameters`` / ``_buffers`` / ``_modules`` dicts,
sharing every tensor that is not substituted. The user's module objects are never touched.

Buffers of modules in training mode are copied into the view, so an in-place update during the
forward (BatchNorm's running statistics) stays private to the call as well.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import nn

__all__ = ["stateless_view", "call_with"]


def _substitutions(module: nn.Module, overrides: Mapping[str, torch.Tensor]) -> Dict[int, torch.Tensor]:
    """``{id(original tensor): replacement}``; a tied tensor is replaced wherever it appears."""
    named: Dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        named[name] = p
    for name, b in module.named_buffers(remove_duplicate=False):
        named[name] = b
    unknown = [n for n in overrides if n not in named]
    if unknown:
        raise ValueError(f"stateless_view: the module has no parameter or buffer {unknown[:3]}")
    return {id(named[n]): t for n, t in overrides.items()}


def _view(module: nn.Module, subs: Dict[int, torch.Tensor], memo: Dict[int, nn.Module],
          hooks: Mapping[int, Callable], pre_hooks: Mapping[int, Callable]) -> nn.Module:
    if id(module) in memo:  # a submodule used twice stays one object in the view
        return memo[id(module)]
    state = module.__dict__.copy()
    for attr, extra in (("_forward_hooks", hooks), ("_forward_pre_hooks", pre_hooks)):
        if id(module) in extra:  # the view's own hook dict: the user's module never sees the hook
            own = OrderedDict(getattr(module, attr))
            own[-1 - len(own)] = extra[id(module)]
            state[attr] = own
    view = module.__class__.__new__(module.__class__)
    object.__setattr__(view, "__dict__", state)  # bypass nn.Module.__setattr__: nothing is registered
    memo[id(module)] = view
    state["_parameters"] = {k: (subs.get(id(v), v) if v is not None else None)
                            for k, v in module._parameters.items()}
    buffers: Dict[str, Optional[torch.Tensor]] = {}
    for k, v in module._buffers.items():
        if v is not None and id(v) in subs:
            v = subs[id(v)]
        elif v is not None and module.training:
            v = v.clone()  # running statistics updated in place stay private to the call
        buffers[k] = v
    state["_buffers"] = buffers
    state["_modules"] = {k: (_view(m, subs, memo, hooks, pre_hooks) if m is not None else None)
                         for k, m in module._modules.items()}
    return view


def stateless_view(module: nn.Module, overrides: Optional[Mapping[str, torch.Tensor]] = None,
                   forward_hooks: Optional[Mapping[str, Callable]] = None,
                   forward_pre_hooks: Optional[Mapping[str, Callable]] = None) -> nn.Module:
    """A private shallow view of ``module`` with the named tensors replaced.

    The view shares every other parameter and buffer with ``module`` (no copy), except the
    buffers of submodules in training mode, which are copied. Calling it never writes to
    ``module``, so any number of views can run concurrently with each other and with
    ``module`` itself.

    Args:
        module: the user's module (read only).
        overrides: ``{qualified name: tensor}`` for parameters or buffers, as in
            ``module.named_parameters()``; a tied parameter is replaced under every name.
        forward_hooks: ``{submodule name: hook(module, args, output)}`` that run in the view
            only (after the module's own forward hooks).
        forward_pre_hooks: ``{submodule name: hook(module, args)}``, likewise, before the forward.

    Raises:
        ValueError: a name that is neither a parameter nor a buffer (or, for a hook, a
            submodule) of ``module``.
    """
    subs = _substitutions(module, overrides) if overrides else {}
    return _view(module, subs, {}, _hooks_by_id(module, forward_hooks), _hooks_by_id(module, forward_pre_hooks))


def _hooks_by_id(module: nn.Module, hooks: Optional[Mapping[str, Callable]]) -> Dict[int, Callable]:
    if not hooks:
        return {}
    mods = dict(module.named_modules(remove_duplicate=False))
    unknown = [n for n in hooks if n not in mods]
    if unknown:
        raise ValueError(f"stateless_view: the module has no submodule {unknown[:3]}")
    return {id(mods[n]): fn for n, fn in hooks.items()}


def call_with(module: nn.Module, overrides: Optional[Mapping[str, torch.Tensor]], *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)`` with ``overrides`` substituted (see :func:`stateless_view`)."""
    return stateless_view(module, overrides)(*args, **kwargs)
