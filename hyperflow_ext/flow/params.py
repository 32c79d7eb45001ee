"""Which parameters of a backbone adapt, as one flat vector.

HyperFlow integrates a flat state ``θ`` of ``P`` numbers. :class:`ParamSubset` maps between the
named parameters of a module and that vector, without copying the frozen rest of the model.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["ParamSubset", "ParamSpec"]

ParamSpec = Union[str, Sequence[str], Callable[[str, nn.Parameter], bool]]


def _last_parametrised_prefix(module: nn.Module) -> str:
    prefixes = [name for name, mod in module.named_modules()
                if any(True for _ in mod.parameters(recurse=False))]
    if not prefixes:
        raise ValueError("ParamSubset: params='head' needs a module with parameters")
    return prefixes[-1]


class ParamSubset:
    """An ordered subset of a module's parameters, flattened to one vector.

    Args:
        module: the backbone.
        params: ``"bias"`` (every parameter whose name ends in ``bias``), ``"head"`` (the
            parameters of the last module that owns any), ``"all"``, a list of parameter
            names, or a callable ``(name, parameter) -> bool``.

    Raises:
        ValueError: unknown names, or a selection that is empty.
        TypeError: ``params`` of another kind.
    """

    def __init__(self, module: nn.Module, params: ParamSpec = "bias") -> None:
        named = dict(module.named_parameters())
        if isinstance(params, str):
            if params == "bias":
                names = [n for n in named if n.split(".")[-1] == "bias"]
            elif params == "head":
                prefix = _last_parametrised_prefix(module)
                names = [n for n in named if n.rsplit(".", 1)[0] == prefix or (prefix == "" and "." not in n)]
            elif params == "all":
                names = list(named)
            else:
                raise ValueError(f"ParamSubset: params must be 'bias', 'head', 'all', a list of names or a "
                                 f"callable, got {params!r}")
        elif callable(params):
            names = [n for n, p in named.items() if params(n, p)]
        elif isinstance(params, (list, tuple)):
            unknown = [n for n in params if n not in named]
            if unknown:
                raise ValueError(f"ParamSubset: unknown parameter names {unknown}; the module has e.g. "
                                 f"{list(named)[:5]}")
            names = list(params)
        else:
            raise TypeError(f"ParamSubset: params must be a str, a list of names or a callable, got "
                            f"{type(params).__name__}")
        if not names:
            raise ValueError(f"ParamSubset: the selection {params!r} matches no parameter")
        self.names: List[str] = names
        self.shapes: List[torch.Size] = [named[n].shape for n in names]
        self.numels: List[int] = [named[n].numel() for n in names]
        self.spec = params if isinstance(params, (str, list, tuple)) else "callable"

    @property
    def numel(self) -> int:
        """``P``, the length of the flat vector."""
        return sum(self.numels)

    def vector(self, module: nn.Module) -> torch.Tensor:
        """The selected parameters of ``module`` as a detached ``(P,)`` vector (a copy)."""
        named = dict(module.named_parameters())
        return torch.cat([named[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, vec: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Views of ``vec`` (shape ``(..., P)``) as ``{name: (..., *shape)}``."""
        if vec.shape[-1] != self.numel:
            raise ValueError(f"ParamSubset.unflatten: expected last dim {self.numel}, got {tuple(vec.shape)}")
        lead = vec.shape[:-1]
        out, start = {}, 0
        for name, shape, n in zip(self.names, self.shapes, self.numels):
            out[name] = vec[..., start:start + n].reshape(*lead, *shape)
            start += n
        return out

    def split_sizes(self) -> List[Tuple[str, int]]:
        return list(zip(self.names, self.numels))

    def __repr__(self) -> str:
        return f"ParamSubset(spec={self.spec!r}, tensors={len(self.names)}, numel={self.numel})"
