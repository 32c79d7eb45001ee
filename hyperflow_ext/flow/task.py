"""The frozen task encoder: a support set → an order-invariant task embedding ``z``."""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import as_model_input, module_dtype
from .._stateless import stateless_view
from ..models import prototypes

__all__ = ["TaskEncoder", "ENCODER_VERSION"]

ENCODER_VERSION = "stats+headgrad/2"  # part of the trajectory-store key: z changes when this does


def _channel_means(output) -> Optional[torch.Tensor]:
    """Per-image channel means of a layer's output: ``(n, C, H, W)`` / ``(n, T, C)`` / ``(n, C)`` → ``(n, C)``
    (``None`` for an output of another kind: that layer is left out)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.dim() not in (2, 3, 4):
        return None
    if output.dim() == 4:
        return output.mean(dim=(2, 3))
    if output.dim() == 3:
        return output.mean(dim=1)
    return output


class TaskEncoder(nn.Module):
    """Summarises a support set with a frozen feature extractor.

    With ``f_i`` the encoder's features of support example ``i``, ``p_c`` the class prototypes and
    ``g_i`` the gradient of the cosine-ProtoNet support loss with respect to ``f_i`` (prototypes
    held fixed; closed form, so no backward pass through any network)::

        z = [mean f̂, std over classes of p̂, mean within-class std of f̂,
             mean g, mean |g|, 1 / shots]

    (``^`` = L2-normalised). The first three say which feature directions separate this task's
    classes and which vary inside them; the gradient terms say where the loss pushes the
    features, the signal fine-tuning follows. Every statistic is a mean over classes and shots,
    so ``z`` does not depend on their order.

    Args:
        encoder: the frozen feature extractor (by default the backbone at its pretrained
            parameters; run once per task, never during integration).
        feature_dim: output size of ``encoder``.
        scale: cosine logit scale of the ProtoNet loss.
        parts: the support images go through ``encoder`` in this many equal calls (fewer when
            there are fewer images), which bounds activation memory. For Conv4 on 28x28 images
            that is about 123 KiB per image of a part: 6.9 % of bias tuning's memory at 1 and 5 shots.

    Shape:
        - support_x: ``(shots, C, H, W)`` or ``(tasks, shots, C, H, W)``.
        - support_y: ``(shots,)`` or ``(tasks, shots)``.
        - Output: ``(tasks, 5 * feature_dim + 1)``.
    """

    def __init__(self, encoder: nn.Module, feature_dim: Optional[int] = None, scale: float = 10.0,
                 parts: int = 5, layers: Sequence[str] = ()) -> None:
        super().__init__()
        if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
            raise ValueError(f"TaskEncoder: parts must be a positive int, got {parts!r}")
        if feature_dim is not None and (isinstance(feature_dim, bool) or not isinstance(feature_dim, int)
                                        or feature_dim < 1):
            raise ValueError(f"TaskEncoder: feature_dim must be a positive int or None, got {feature_dim!r}")
        modules = dict(encoder.named_modules())
        unknown = [n for n in layers if n not in modules]
        if unknown:
            raise ValueError(f"TaskEncoder: the encoder has no submodule {unknown[:3]}")
        self.encoder = encoder
        self.feature_dim = feature_dim
        self.scale = scale
        self.parts = parts
        self.layers: List[str] = list(layers)
        self.layer_dims: Optional[List[int]] = [] if not self.layers else None  # channels per layer

    @property
    def ready(self) -> bool:
        """Whether :attr:`dim` is known (else :meth:`probe` must run once)."""
        return self.feature_dim is not None and self.layer_dims is not None

    @property
    def version(self) -> str:
        """Names what ``z`` holds (part of the trajectory-store key)."""
        return ENCODER_VERSION + (f"+layers:{','.join(self.layers)}" if self.layers else "")

    @property
    def dim(self) -> int:
        if not self.ready:
            raise ValueError("TaskEncoder: the embedding size is unknown until probe(sample) has run")
        return self.final_dim(self.feature_dim) + 2 * sum(self.layer_dims)

    @staticmethod
    def final_dim(feature_dim: int) -> int:
        """Size of ``z`` from the final features alone (no layer statistics): ``5 d + 1``."""
        return 5 * feature_dim + 1

    def adopt(self, layout: Optional[dict], z_dim: int) -> bool:
        """Size an unprobed encoder like the one that produced embeddings of size ``z_dim``.

        Args:
            layout: ``{"feature_dim", "layers", "layer_dims"}`` recorded with the embeddings, or ``None``.

        Returns:
            ``True`` when the layer statistics are kept, ``False`` when ``z`` holds the final-feature
            statistics only (then :attr:`layers` is emptied).

        Raises:
            ValueError: the layout cannot be told from what is known.
        """
        declared = self.feature_dim
        if layout is not None and set(layout["layers"]) <= set(self.layers) \
                and declared in (None, layout["feature_dim"]):
            self.feature_dim = layout["feature_dim"]
            self.layers, self.layer_dims = list(layout["layers"]), list(layout["layer_dims"])
            return True
        if declared is not None and z_dim == self.final_dim(declared):
            self.layers, self.layer_dims = [], []
            return False
        if declared is None and not self.layers and (z_dim - 1) % 5 == 0:
            self.feature_dim, self.layer_dims = (z_dim - 1) // 5, []
            return True
        raise ValueError(f"HyperFlow.fit: cannot tell how these trajectories' task embeddings (size {z_dim}) "
                         f"were made; call flow.probe(support_x) first or pass episodes")

    def restore(self, feature_dim: Optional[int], layers: Optional[Sequence[str]],
                layer_dims: Optional[Sequence[int]], z_dim: int) -> None:
        """Sizes saved with a flow (checked against the backbone's output at the first call)."""
        self.feature_dim = feature_dim or (z_dim - 1) // 5
        self.layers, self.layer_dims = list(layers or []), list(layer_dims or [])

    @torch.no_grad()
    def probe(self, sample: torch.Tensor) -> int:
        """Set :attr:`feature_dim` (and the layers' channel counts) from one forward of ``sample[:1]``.

        Returns:
            The feature size ``d``.

        Raises:
            ValueError: the encoder does not map ``(n, C, H, W)`` to ``(n, d)`` features.
        """
        out, stats = self._encode([sample[:1]], strict=False)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"TaskEncoder: the backbone must map (n, C, H, W) images to (n, d) features, got "
                             f"{got} for one image of shape {tuple(sample.shape[1:])} (end it with nn.Flatten?)")
        self.feature_dim = int(out.shape[1])
        # a layer whose module the backbone does not call (a fused kernel used instead) is dropped
        self.layers = [n for n in self.layers if n in stats]
        self.layer_dims = [int(stats[n].shape[-1]) for n in self.layers]
        return self.feature_dim

    def _encode(self, chunks: Sequence[torch.Tensor], strict: bool = True,
                pre_hooks: Optional[Mapping[str, Callable]] = None):
        """Features ``(n, d)`` and per-image channel means ``(n, C_l)`` of the layers, one forward per
        chunk through one private view (a list in :attr:`layers` order; with ``strict=False`` a
        dict of the layers that ran in every chunk)."""
        per_chunk: List[Dict[str, torch.Tensor]] = []

        def keep(name: str):
            def hook(_module, _args, output):
                means = _channel_means(output)
                if means is not None:
                    per_chunk[-1][name] = means
            hook.reads_output = True  # a fused in-place norm kernel may run it (Conv4's GroupNorm)
            return hook

        # A private view: a user's module in training mode keeps its statistics, and the hooks
        # live in the view only.
        view = stateless_view(self.encoder, forward_hooks={n: keep(n) for n in self.layers},
                              forward_pre_hooks=pre_hooks)
        outs = []
        for chunk in chunks:
            per_chunk.append({})
            outs.append(view(chunk))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        ran = {n: torch.cat([st[n] for st in per_chunk]) for n in self.layers if all(n in st for st in per_chunk)}
        if not strict:
            return out, ran
        missing = [n for n in self.layers if n not in ran]
        if missing:
            raise ValueError(f"TaskEncoder: layers {missing[:3]} did not run in the encoder's forward")
        return out, [ran[n] for n in self.layers]

    def forward(self, support_x: torch.Tensor, support_y: torch.Tensor, way: Optional[int] = None) -> torch.Tensor:
        return self.encode(support_x, support_y, way)[0]

    @torch.no_grad()
    def encode(self, support_x: torch.Tensor, support_y: torch.Tensor, way: Optional[int] = None,
               parts: Optional[int] = None, pre_hooks: Optional[Mapping[str, Callable]] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The task embeddings and the encoder's support features they were computed from.

        Args:
            parts: overrides :attr:`parts` (e.g. ``1`` when the caller holds the whole set in one
                forward anyway).
            pre_hooks: ``{submodule name: hook(module, args)}`` run in the encoder's private view
                (probes that read the same forward; the encoder's own module is untouched).

        Shape:
            - support_x: ``(shots, C, H, W)`` or ``(tasks, shots, C, H, W)``.
            - Returns: ``((tasks, dim), (tasks, shots, feature_dim))``.
        """
        if support_x.dim() == 4:
            support_x, support_y = support_x[None], support_y[None]
        tasks, shots = support_y.shape
        # the encoder's own dtype: it may be another network than the adapted backbone
        flat = as_model_input(support_x.flatten(0, 1), module_dtype(self.encoder))
        # Equal parts keep the activation memory at 1/parts of one full-batch forward, a fixed share
        # of what fine-tuning the same support set holds (which grows with it too).
        chunks = flat.tensor_split(min(self.parts if parts is None else parts, flat.shape[0]))
        raw, layer_means = self._encode(chunks, pre_hooks=pre_hooks)
        if raw.dim() != 2 or (self.feature_dim is not None and raw.shape[1] != self.feature_dim):
            raise ValueError(f"TaskEncoder: expected ({flat.shape[0]}, {self.feature_dim}) features from the "
                             f"backbone, got {tuple(raw.shape)}")
        raw = raw.unflatten(0, (tasks, shots))
        way = int(support_y.max()) + 1 if way is None else way
        feats = F.normalize(raw, dim=-1)
        protos = prototypes(feats, support_y, way)                          # (tasks, way, d)
        centred = feats - torch.gather(protos, 1, support_y[..., None].expand_as(feats))
        within = centred.pow(2).mean(dim=1).sqrt()
        grad = self._head_gradient(raw, feats, support_y, way)
        inv_shots = torch.full((tasks, 1), way / shots, dtype=feats.dtype, device=feats.device)
        parts = [feats.mean(dim=1), protos.std(dim=1, unbiased=False), within,
                 grad.mean(dim=1), grad.abs().mean(dim=1), inv_shots]
        for i in range(len(self.layers)):
            # per layer: where the support set sits in each channel, and how far its classes spread
            means = layer_means[i].unflatten(0, (tasks, shots)).to(feats.dtype)
            parts += [means.mean(dim=1), prototypes(means, support_y, way).std(dim=1, unbiased=False)]
        return torch.cat(parts, dim=-1), raw

    def _head_gradient(self, raw: torch.Tensor, unit: torch.Tensor, labels: torch.Tensor, way: int) -> torch.Tensor:
        """``∂ CE(scale · cos(f_i, p_c)) / ∂ f_i`` with the prototypes held fixed: ``(tasks, shots, d)``."""
        p_hat = F.normalize(prototypes(raw, labels, way), dim=-1)          # (tasks, way, d)
        cos = unit @ p_hat.transpose(1, 2)                                  # (tasks, shots, way)
        resid = torch.softmax(self.scale * cos, dim=-1) - F.one_hot(labels, way).to(cos.dtype)
        # d cos(f, p) / d f = (p̂ - cos · f̂) / |f|
        g = resid @ p_hat - (resid * cos).sum(-1, keepdim=True) * unit
        return self.scale * g / raw.norm(dim=-1, keepdim=True).clamp_min(1e-12)
