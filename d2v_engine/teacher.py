"""The EMA teacher: a copy of the student encoder whose weights follow an exponential moving average.

Per modality, the encoder says what the teacher owns (`teacher_exclude`, `teacher_copy`):
- excluded parts are shared with the student through the input (audio: the CNN and projection; the
  teacher encodes the student's own un-masked features), so the teacher has no copy of them;
- copied parts are taken from the student at every update instead of averaged (audio: the conv
  positional embedding; text: the embeddings), which is how the reference code shares them;
- everything else is averaged: `ema <- decay * ema + (1 - decay) * student`, in fp32.

The decay anneals linearly from `decay` to `end_decay` over `anneal_steps` optimizer steps, then
holds (`decay_at`). `update` runs once per optimizer step, at the gradient-accumulation boundary.

Under ZeRO 0-2 every rank keeps a full teacher and updates it from the student's replicated weights.
Under ZeRO-3 (`distributed.apply_zero3_teacher`, then `partition_`) every rank keeps only its flat
slice of each teacher tensor, laid out exactly like the student's slice of the same parameter, and
updates it from that slice alone: no communication, and teacher memory per rank falls with the
number of ranks. The forward gathers the slices through DeepSpeed's ZeRO-3 hooks.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from d2v_engine import ops
from d2v_engine.config import TargetConfig, TeacherConfig
from d2v_engine.ops.streaming import TargetAccumulator


def build_teacher_module(student: nn.Module) -> nn.Module:
    """A frozen eval-mode deep copy of `student` without the parts it shares through the input."""
    module = copy.deepcopy(student)
    for name in student.teacher_exclude:
        setattr(module, name, None)
    module.grad_checkpointing = False
    return module.eval().requires_grad_(False)


class EMATeacher:
    """EMA teacher of a student encoder, and the target builder.

    Args:
        student: the student encoder (not the head); the teacher starts as its copy.
        teacher: the `teacher` config section (decay schedule).
        target: the `target` config section (top-K, normalisations).
        backend: kernel backend of the fused ops.
        compute_dtype: dtype of the teacher's forward weights; when it is not fp32 the fp32 EMA
            master weights live beside the module and are written to it in the same pass.
        copy: encoder parts copied from the student at every update instead of averaged; None =
            `student.teacher_copy` (the objective says: `Data2Vec.teacher_copy`, `Data2Vec2.teacher_copy`).
    """

    def __init__(self, student: nn.Module, teacher: TeacherConfig, target: TargetConfig,
                 backend: str = "auto", compute_dtype: torch.dtype = torch.float32,
                 copy: tuple[str, ...] | None = None):
        self.cfg, self.target_cfg, self.backend = teacher, target, backend
        self.module = build_teacher_module(student).to(compute_dtype)
        params = dict(self.module.named_parameters())
        copied = tuple(f"{p}." for p in (student.teacher_copy if copy is None else copy))
        self.copy_names = [n for n in params if n.startswith(copied)]
        self.ema_names = [n for n in params if not n.startswith(copied)]
        names = self.ema_names + self.copy_names
        if compute_dtype == torch.float32:
            self.master = {n: params[n].data for n in names}     # the module's weights are the master
            self.shadow = None
        else:
            self.master = {n: params[n].data.float() for n in names}
            self.shadow = {n: params[n].data for n in names}
        self.shapes: dict[str, tuple[int, ...]] | None = None
        """Under ZeRO-3 (after `partition_`): each tensor's full shape; None while the teacher is whole."""
        self._student_cache: tuple[int, list[nn.Parameter], list[nn.Parameter]] | None = None

    def partition_(self) -> None:
        """Keep only this rank's slices, once DeepSpeed has partitioned `module` (ZeRO-3).

        A slice is DeepSpeed's: parameter flattened, zero-padded to a multiple of the rank count,
        rank r's contiguous 1/world_size of it (`param.ds_tensor`), the same for the student's
        parameter of that name. The fp32 master is cut from the full master (a bf16 run keeps its
        fp32 bits); the module's own slice is the master (fp32) or its shadow (bf16).
        """
        import torch.distributed as dist

        params = dict(self.module.named_parameters())
        self.shapes = {n: tuple(params[n].ds_shape) for n in self.master}
        master = {}
        for n, full in self.master.items():
            part = params[n].ds_tensor
            start = dist.get_rank(group=params[n].ds_process_group) * part.numel()
            piece = full.reshape(-1)[start:start + part.numel()]
            master[n] = torch.zeros(part.numel(), dtype=torch.float32, device=part.device)
            master[n][:piece.numel()] = piece
            part.copy_(master[n])  # also zeroes the padding, which DeepSpeed leaves uninitialised
        if self.shadow is None:
            self.master = {n: params[n].ds_tensor for n in master}
        else:
            self.master, self.shadow = master, {n: params[n].ds_tensor for n in master}
        self._student_cache = None

    def memory_bytes(self) -> int:
        """Bytes of teacher weights held by this rank now: fp32 master, compute-dtype copy, buffers.

        Under ZeRO-3 these are slices, plus any parameter still gathered (none between forwards).
        """
        tensors = [*self.master.values(), *(self.shadow or {}).values(), *self.module.buffers()]
        if self.shapes is not None:
            tensors += [p.data for p in self.module.parameters()]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---------------------------------------------------------------- schedule and update
    def decay_at(self, step: int) -> float:
        """EMA decay after `step` optimizer steps: linear from `decay` to `end_decay`, then held."""
        start, end, total = self.cfg.decay, self.cfg.end_decay, self.cfg.anneal_steps
        if step >= total or start == end:
            return end
        return start + (end - start) * step / total

    def _student_tensors(self, student: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        # The name lookup runs once per student: the hot path only walks two prebuilt lists.
        if self._student_cache is None or self._student_cache[0] != id(student):
            params = dict(student.named_parameters())
            self._student_cache = (id(student), [params[n] for n in self.ema_names],
                                   [params[n] for n in self.copy_names])
        ema, copied = self._student_cache[1], self._student_cache[2]
        if self.shapes is not None:
            # ZeRO-3: the student's slices; read on every call, the optimizer owns their storage.
            return [p.ds_tensor for p in ema], [p.ds_tensor for p in copied]
        return [p.detach() for p in ema], [p.detach() for p in copied]

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        """Move the teacher towards `student` (call once per optimizer step).

        Args:
            student: the student encoder, same structure as at construction.
            step: optimizer steps completed, for the decay schedule.
        Returns:
            The decay used (1.0 means the teacher stayed frozen).
        """
        decay = self.decay_at(step)
        ema_src, copy_src = self._student_tensors(student)
        if decay < 1.0:
            ema = [self.master[n] for n in self.ema_names]
            shadow = None if self.shadow is None else [self.shadow[n] for n in self.ema_names]
            ops.ema_update_(ema, ema_src, decay, shadow, backend=self.backend)
        if copy_src:
            # decay 0 copies: the shared parts follow the student exactly, in the same kernel.
            dst = [self.master[n] for n in self.copy_names]
            shadow = None if self.shadow is None else [self.shadow[n] for n in self.copy_names]
            ops.ema_update_(dst, copy_src, 0.0, shadow, backend=self.backend)
        return decay

    # ---------------------------------------------------------------- targets
    @torch.no_grad()
    def targets(self, x: Tensor, *, mask: Tensor, padding_mask: Tensor | None, repeat: int = 1,
                token_mean: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Regression targets at the masked positions, from the teacher's view of the clean input.

        Args:
            x: the teacher's input view (pixels [B, 3, H, W], audio features [B, T, C], token ids [B, T]).
            mask: [B * repeat, T] bool, True = masked (loss) positions; with repeat M, rows b * M + j
                are the M masked copies of sample b (data2vec 2.0), which share this one teacher pass.
            padding_mask: [B, T] bool, True = padding, or None.
            repeat: masked copies per sample.
            token_mean: also return each sample's mean target over its valid steps (2.0's CLS target).
        Returns:
            [N, C] fp32 targets, rows in row-major order of `mask` (and [B, C] fp32 means).
        """
        cfg = self.target_cfg
        # Streaming (DESIGN §3): each top-K block output is normalised and added to one fp32
        # [B, T, C] sum as its block finishes, so the teacher never holds K outputs at once.
        acc = TargetAccumulator(cfg.top_k, layer_norm=cfg.layer_norm, final_norm=cfg.final_norm,
                                padding_mask=padding_mask, backend=self.backend)
        out = self.module(x, padding_mask=padding_mask, top_k=cfg.top_k, on_layer=acc)
        return acc.finish(mask, padding_mask=out.padding_mask, repeat=repeat, token_mean=token_mean)

    # ---------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Tensor]:
        """The fp32 master weights by parameter name (the teacher's whole learned state).

        Under ZeRO-3, this rank's flat slices (see `partition_`; `shapes` gives the full shapes).
        """
        return {n: t.detach().clone().cpu() for n, t in self.master.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.master) - set(state)
        if missing:
            raise KeyError(f"teacher state lacks {sorted(missing)[:3]}")
        with torch.no_grad():
            for n, t in self.master.items():
                t.copy_(state[n])
                if self.shadow is not None:
                    self.shadow[n].copy_(state[n])
