"""Streaming targets: `make_targets` built one teacher block at a time (DESIGN.md §3).

The per-layer normalisation of `make_targets` depends on one layer only, so the sum of the
normalised top-K outputs can be accumulated as each block finishes: the teacher then holds one
fp32 [B, T, C] running sum instead of K block outputs, whatever K is. `finish()` applies the rest
(divide by K, final norm, zero the padding, select the masked rows, for every masked copy of a
sample with `repeat`) and gives the same result as `make_targets` on the list of K outputs.

    acc = TargetAccumulator(k, layer_norm="instance", padding_mask=padding_mask)
    out = encoder(x, padding_mask=padding_mask, top_k=k, on_layer=acc)   # acc(i, block_output)
    targets = acc.finish(mask)                                          # [M, C] fp32
    # or, data2vec 2.0 (m masked clones per sample, mask [B*m, T]): rows [M, C], cls [B, C]
    rows, cls = acc.finish(mask, repeat=m, token_mean=True)

Backends: "triton" runs the `kernels/make_targets.py` kernels (each layer read twice for an
instance norm, once otherwise; the running sum read and written once per layer); the others use
the reference math of `ops/reference.py` (a C++ streaming kernel may replace it later).
"""
from __future__ import annotations

import torch
from torch import Tensor

from d2v_engine.ops import reference, resolve_backend
from d2v_engine.ops.reference import check_targets_args

__all__ = ["TargetAccumulator"]

# The reference path normalises a layer in this many slices of the batch (see _normalise_into).
_SLICES = 8


class TargetAccumulator:
    """The running sum of normalised block outputs; an `on_layer(i, out)` callback.

    Args:
        num_layers: K, how many block outputs will be added (the divisor of the average).
        layer_norm: per-layer norm, "instance" | "layer" | "none" (as `make_targets`).
        final_norm: norm of the average, the same choices.
        padding_mask: [B, T] bool, True = padding, or None; needed from the first layer on, as the
            instance norm leaves padded steps out of its statistics.
        eps: added to the variance.
        backend: "auto" | "reference" | "triton" | "cpp", resolved for the first layer's device.
    """

    def __init__(self, num_layers: int, *, layer_norm: str, final_norm: str = "none",
                 padding_mask: Tensor | None = None, eps: float = 1e-5, backend: str = "auto"):
        if num_layers < 1:
            raise ValueError(f"TargetAccumulator needs num_layers >= 1, got {num_layers}")
        self.num_layers, self.layer_norm, self.final_norm = num_layers, layer_norm, final_norm
        self.padding_mask, self.eps, self.backend = padding_mask, float(eps), backend
        self.added = 0
        self.buffer: Tensor | None = None
        """The running sum, [B, T, C] fp32: the only tensor held between layers."""
        self._module = None   # d2v_engine.kernels.make_targets, when the backend is "triton"
        self._kernels = None  # its launchers for this shape and padding

    # ------------------------------------------------------------------------------ adding
    def __call__(self, index: int, out: Tensor) -> None:
        """The encoders' `on_layer` callback: block `index` finished with target output `out`."""
        self.add(out)

    def add(self, layer: Tensor) -> None:
        """Normalise `layer` ([B, T, C], any float dtype and strides) and add it to the sum."""
        if self.added == self.num_layers:
            raise ValueError(f"all {self.num_layers} layers were already added")
        if self.buffer is None:
            self._start(layer)
        elif layer.shape != self.buffer.shape or layer.device != self.buffer.device:
            raise ValueError(f"layer {self.added} is {tuple(layer.shape)} on {layer.device}, the "
                             f"first was {tuple(self.buffer.shape)} on {self.buffer.device}")
        if self._kernels is not None:
            self._add_triton(layer)
        else:
            self._add_torch(layer)
        self.added += 1

    def _start(self, layer: Tensor) -> None:
        check_targets_args([layer], self.layer_norm, self.final_norm, None, self.padding_mask)
        if resolve_backend(self.backend, layer.device) == "triton":
            from d2v_engine.ops.triton import load_kernels

            self._module = load_kernels("make_targets", layer.device)
            self._kernels = self._module.TargetKernels(tuple(layer.shape), self.padding_mask,
                                                       self.eps)
        # The one buffer of the streaming form: every later layer is added into it.
        self.buffer = torch.empty(layer.shape, dtype=torch.float32, device=layer.device)

    def _add_torch(self, layer: Tensor) -> None:
        self._normalise_into(layer, self.layer_norm, add=self.added > 0)

    def _normalise_into(self, source: Tensor, norm: str, *, add: bool) -> None:
        """buffer (+)= the reference's norm of `source`, a few sequences at a time.

        Both norms act within one sequence, so this is the reference math on slices; the slices
        keep its fp32 temporaries to about half of one [B, T, C] buffer.
        """
        valid = None if self.padding_mask is None else ~self.padding_mask
        batch = source.shape[0]
        step = -(-batch // _SLICES)
        for lo in range(0, batch, step):
            part = slice(lo, lo + step)
            normalised = reference._normalise(source[part].float(), norm,
                                              None if valid is None else valid[part], self.eps)
            if add:
                self.buffer[part].add_(normalised)  # the reference's `total + n_k`, in place
            else:  # a copy: with norm "none" an fp32 `normalised` is the layer itself
                self.buffer[part].copy_(normalised)

    def _add_triton(self, layer: Tensor) -> None:
        kernels, flat = self._kernels, self.buffer.view(-1, self.buffer.shape[-1])
        stats = kernels.stats([layer]) if self.layer_norm == "instance" else None
        kernels.rows([layer], flat, layer_norm=self.layer_norm, stats=stats,
                     accumulate=self.added > 0, zero_padding=False)

    # ------------------------------------------------------------------------------ result
    def finish(self, mask: Tensor | None = None, padding_mask: Tensor | None = None,
               repeat: int = 1, token_mean: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The targets: as `make_targets(layers, ..., mask=mask, repeat=repeat)` on the K layers.

        Args:
            mask: [B * repeat, T] bool, True = masked: return only those rows (row r: a masked
                copy of sample r // repeat); None: all rows.
            padding_mask: the encoder's output padding mask when it differs from the one given
                at construction (the text encoder derives one from pad tokens when given None);
                allowed only when the per-layer norm does not use it.
            repeat: masked copies per sample (data2vec 2.0); the rows of every copy are gathered
                from the one [B, T, C] buffer.
            token_mean: also return each sample's mean target over its valid steps, [B, C] fp32
                (data2vec 2.0's CLS target), after the final norm.

        Returns:
            [M, C] fp32 rows at the masked positions in row-major order, or [B, T, C] fp32 when
            mask is None (padded rows are 0); with token_mean, (rows, [B, C] means). The
            accumulator is spent afterwards.
        """
        if self.added != self.num_layers:
            raise ValueError(f"{self.added} of {self.num_layers} layers were added: the encoder "
                             f"must run with top_k={self.num_layers}")
        self._adopt_padding(padding_mask)
        check_targets_args([self.buffer], self.layer_norm, self.final_norm, mask,
                           self.padding_mask, repeat)
        if self._kernels is not None and not token_mean:
            # Only the output rows are finished, each read from the sum through the row table.
            targets = self._finish_triton(mask, repeat)
        else:
            # The whole sum is finished in place (the token mean needs every step), then gathered.
            full = self._finish_triton(None) if self._kernels is not None else self._finish_torch()
            targets = full if mask is None else reference.gather_rows(full, mask, repeat)
        result = (targets, self._token_mean()) if token_mean else targets
        self.buffer = None  # spent: the sum was averaged in place
        return result

    def _token_mean(self) -> Tensor:
        """[B, C] mean of the finished buffer over each sample's valid steps (padded rows are 0)."""
        if self.padding_mask is None:
            return self.buffer.mean(dim=1)
        count = (~self.padding_mask).sum(dim=1, keepdim=True).clamp(min=1)
        return self.buffer.sum(dim=1) / count

    def _adopt_padding(self, padding_mask: Tensor | None) -> None:
        if padding_mask is None or padding_mask is self.padding_mask:
            return
        if self.padding_mask is not None and torch.equal(padding_mask, self.padding_mask):
            return
        if self.layer_norm == "instance":
            raise ValueError("the instance norm of each layer needs the padding mask before the "
                             "first layer: pass it to TargetAccumulator(padding_mask=...)")
        # The per-layer norm ignored the padding, so the final steps may take the new one.
        self.padding_mask = padding_mask
        if self._kernels is not None:
            self._kernels = self._module.TargetKernels(tuple(self.buffer.shape), padding_mask,
                                                       self.eps)

    def _finish_torch(self) -> Tensor:
        """The reference's tail, in place on the buffer: average, final norm, zero the padding."""
        self.buffer.div_(self.num_layers)
        if self.final_norm != "none":
            self._normalise_into(self.buffer, self.final_norm, add=False)
        if self.padding_mask is not None:
            self.buffer.masked_fill_(self.padding_mask[..., None], 0.0)
        return self.buffer

    def _finish_triton(self, mask: Tensor | None, repeat: int = 1) -> Tensor:
        flat = self.buffer.view(-1, self.buffer.shape[-1])
        # In place where possible, so that finishing adds no second [B, T, C] buffer.
        out = self._module.finish_targets(
            self._kernels, [self.buffer], layer_norm="none", final_norm=self.final_norm,
            rows=self._module.row_table(mask, repeat), divisor=float(self.num_layers),
            scratch=flat, out=flat if mask is None else None)
        return out.view(self.buffer.shape) if mask is None else out
