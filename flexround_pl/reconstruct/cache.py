"""The calibration cache: per-block inputs and targets, pushed forward block by block.

For block ``i`` the cache holds, on CPU, one row per calibration sample:

* ``fp_inputs``: the input of block ``i`` in the FP network;
* ``q_inputs``: the input of block ``i`` in the network whose blocks ``< i`` are
  already quantized and hardened (the student trains on these, as in BRECQ);
* ``targets``: the FP output of block ``i`` on ``fp_inputs`` (computed once per
  block by the frozen teacher, never per step).

After block ``i`` is hardened, :meth:`CalibrationCache.advance` makes the FP
targets the next FP inputs and runs the hardened block once over the quantized
inputs. Each block is therefore run a constant number of times: the cost is
linear in depth, where BRECQ / QDrop re-run the whole quantized prefix per block.

Blocks are called with more than their hidden states (attention masks, rotary
position embeddings, ...), and not all with the same: Gemma-2/3, Mistral or
Qwen2 with sliding windows give sliding-window layers another mask than
full-attention layers, Gemma-3 gives them another rotary table too. Those
*extras* are captured **per block** from the model's own forward call
(:meth:`CalibrationCache.capture` hooks every block) and stored only once per
distinct value: a leaf equal in several blocks (the one mask of an attention
type, the one ``(cos, sin)`` of a rope type) is one column shared by their
templates. A tensor whose first dimension is the capture batch size is stored
per sample, anything else (``None``, flags, tensors shared across the batch
such as ``position_ids`` of shape ``[1, T]``) is stored once. Memory is
therefore one copy per attention / rope type, not one per layer.

Capturing every block's call costs no extra model forward: the first batch
runs the real blocks (it checks that block ``i``'s output is exactly block
``i+1``'s input, which block-wise reconstruction assumes, and learns each
block's output structure), every later batch runs the model with each block
replaced by a pass-through that records its arguments. The first batch is
recorded both ways; if the extras differ (a model computing block arguments
from the hidden states), every batch runs the real blocks instead.

Storage (:class:`CacheStorage`, ``reconstruction.cache``): the per-sample
tensors live in RAM (``memory``) or in memory-mapped files (``disk``, under
``reconstruction.cache_dir``, by default ``<run dir>/cache``), read page by
page as batches index them. ``auto`` picks ``disk`` when the estimated cache
(FP inputs + quantized inputs + fp32 targets + per-sample extras) exceeds
:data:`AUTO_DISK_FRACTION` of the available memory (``MemAvailable``, capped
by a cgroup v2 limit). Both hold the very same values: results are
identical. A disk file is unlinked as soon as it is mapped (no stale files
after a crash; the space is freed with the tensor). The capture itself still
gathers the first block's inputs in RAM once before they are written out.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn

# ---- storage --------------------------------------------------------------------

#: ``auto`` stores the cache on disk when its estimate exceeds this fraction of the available memory.
AUTO_DISK_FRACTION = 0.5
CACHE_MODES = ("memory", "disk", "auto")


def available_memory() -> Optional[int]:
    """Bytes of memory this process can still use: ``MemAvailable``, capped by a cgroup limit; None if unknown."""
    avail: Optional[int] = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            room = max(0, int(limit) - used)
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


class CacheStorage:
    """Allocates the cache's per-sample tensors: in RAM, or memory-mapped files in ``directory``."""

    def __init__(self, directory: Optional[str] = None) -> None:
        self.directory = None if directory is None else os.path.abspath(os.path.expanduser(directory))

    @property
    def on_disk(self) -> bool:
        return self.directory is not None

    @classmethod
    def choose(cls, mode: str, directory: Optional[str], estimated_nbytes: int) -> "CacheStorage":
        """``memory`` / ``disk`` as asked; ``auto``: disk iff the estimate > AUTO_DISK_FRACTION x available memory."""
        if mode not in CACHE_MODES:
            raise ValueError(f"reconstruction.cache must be one of {CACHE_MODES}, got {mode!r}")
        if mode == "auto":
            avail = available_memory()
            mode = "disk" if avail is not None and estimated_nbytes > AUTO_DISK_FRACTION * avail else "memory"
        if mode == "memory":
            return cls(None)
        if directory is None:
            raise ValueError("a disk cache needs reconstruction.cache_dir")
        return cls(directory)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialized tensor (RAM, or a fresh memory-mapped file)."""
        numel = math.prod(shape)
        if self.directory is None or numel == 0:
            return torch.empty(shape, dtype=dtype)
        os.makedirs(self.directory, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=self.directory, suffix=".bin")  # unique across ranks / runs
        try:
            os.ftruncate(fd, numel * torch.empty((), dtype=dtype).element_size())
            t = torch.from_file(path, shared=True, size=numel, dtype=dtype)
        finally:
            os.close(fd)
            os.unlink(path)  # the mapping keeps the data; the space is freed with the tensor
        return t.view(shape)

    def put(self, t: Tensor) -> Tensor:
        """``t`` (CPU) in this storage (unchanged in RAM mode)."""
        if self.directory is None:
            return t
        out = self.empty(tuple(t.shape), t.dtype)
        out.copy_(t)
        return out

    def cat(self, parts: list[Tensor]) -> Tensor:
        """``torch.cat(parts)`` written straight into this storage."""
        if self.directory is None:
            return torch.cat(parts)
        out = self.empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), parts[0].dtype)
        start = 0
        for p in parts:
            out[start:start + p.shape[0]].copy_(p)
            start += p.shape[0]
        return out


# ---- pytrees of call arguments ------------------------------------------------


@dataclass(frozen=True)
class _PerSample:
    """Placeholder for a per-sample tensor leaf: row ``key`` of ``CalibrationCache.extras``."""

    key: int


def _map(tree: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(tree, tuple):
        return tuple(_map(t, fn) for t in tree)
    if isinstance(tree, list):
        return [_map(t, fn) for t in tree]
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    return fn(tree)


def block_output(out: Any) -> Tensor:
    """The hidden-state output of a block call (HF layers may return a tuple)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out[0]  # transformers ModelOutput


@dataclass(frozen=True)
class _Slot:
    """Position ``k`` of a leaf in one record's flattened call arguments."""

    k: int


@dataclass
class _Column:
    """One argument leaf across all captured batches: per-sample (stacked) or shared (stored once).

    A tensor whose first dimension is its batch's size is per sample (decided
    on the largest batch, so a last batch of one sample cannot turn a shared
    ``[1, T]`` tensor into a per-sample one). Hugging Face passes ``None``
    for an attention mask when a batch has no padding; next to padded
    batches that ``None`` is replaced by the equivalent attend-everywhere
    mask (``True`` for boolean masks, ``0`` for additive float masks).
    """

    per_sample: bool
    stacked: Optional[Tensor] = None
    value: Any = None

    @classmethod
    def build(cls, k: int, values: list[Any], sizes: list[int]) -> "_Column":
        tensors = [(b, v) for b, v in zip(sizes, values) if isinstance(v, Tensor)]
        if not tensors:
            if any(v != values[0] for v in values):
                raise ValueError(f"calibration batches pass different values for block argument #{k}")
            return cls(per_sample=False, value=values[0])
        b_ref, ref = max(tensors, key=lambda t: t[0])
        if ref.dim() == 0 or ref.shape[0] != b_ref:
            if len(tensors) != len(values) or any(v.shape != ref.shape or not torch.equal(v, ref) for _, v in tensors):
                raise ValueError(
                    f"block argument #{k} is shared across a batch but differs between calibration batches; "
                    "give every calibration batch the same shape"
                )
            return cls(per_sample=False, value=ref.detach().cpu())
        rows = []
        for b, v in zip(sizes, values):
            if v is None:
                fill = True if ref.dtype == torch.bool else 0
                v = torch.full((b, *ref.shape[1:]), fill, dtype=ref.dtype)
            if not isinstance(v, Tensor) or v.shape[1:] != ref.shape[1:] or v.shape[0] != b:
                raise ValueError(
                    f"block argument #{k} has shape {tuple(getattr(v, 'shape', ()))} in one calibration batch "
                    f"and {tuple(ref.shape)} in another; give every calibration batch the same shape"
                )
            rows.append(v.detach().cpu())
        return cls(per_sample=True, stacked=torch.cat(rows))


class _StopForward(Exception):
    """Raised by the capture hooks: nothing after the last captured block needs to run."""


class _Distinct:
    """The distinct leaves of one batch's block calls: equal leaves (same object, or equal tensors) share an id."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def id_of(self, leaf: Any) -> int:
        for j, v in enumerate(self.values):
            if _same(v, leaf):
                return j
        self.values.append(leaf)
        return len(self.values) - 1


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
            and a.device == b.device and bool(torch.equal(a, b))
        )
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # objects without a usable ``==``: distinct unless identical
        return False


def _split_call(args: tuple, kwargs: dict) -> tuple[Tensor, tuple, dict]:
    """``(hidden_states, other positional args, keyword args)`` of one block call."""
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


@dataclass
class _BatchRecord:
    """One batch as every captured block saw it: block 0's input, each block's skeleton and leaf ids."""

    hidden: Tensor
    skeletons: list[Any]  # per block: the (args, kwargs) tree with a _Slot per leaf
    ids: list[list[int]]  # per block, per slot: id in ``distinct``
    distinct: _Distinct

    @classmethod
    def build(cls, calls: list[tuple[tuple, dict]]) -> "_BatchRecord":
        distinct = _Distinct()
        skeletons, ids = [], []
        hidden = _split_call(*calls[0])[0].detach().cpu()
        for args, kwargs in calls:
            _, rest, kw = _split_call(args, kwargs)
            flat: list[Any] = []
            skeletons.append(_map((rest, kw), lambda leaf: (flat.append(leaf), _Slot(len(flat) - 1))[1]))
            ids.append([distinct.id_of(leaf) for leaf in flat])
        return cls(hidden, skeletons, ids, distinct)

    def leaf(self, i: int, k: int) -> Any:
        return self.distinct.values[self.ids[i][k]]

    def same_as(self, other: "_BatchRecord") -> bool:
        if self.skeletons != other.skeletons or self.ids != other.ids or not torch.equal(self.hidden, other.hidden):
            return False
        return all(_same(a, b) for a, b in zip(self.distinct.values, other.distinct.values))


def _without_hidden(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A block call with its hidden states dropped (only block 0's are kept: no batch copy per layer)."""
    if args:
        return (None, *args[1:]), kwargs
    return (), {**kwargs, "hidden_states": None}


def _structure(output: Any) -> Any:
    """What a pass-through must return in place of ``output``: ``None`` for a tensor, else its tail."""
    if isinstance(output, Tensor):
        return None
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return type(output), tuple(output[1:])
    return _StopForward  # unknown structure: no pass-through


def _pass_through(structure: Any) -> Callable[..., Any]:
    """A block forward returning its input hidden states in the structure the real block returns."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        h = _split_call(args, kwargs)[0]
        if structure is None:
            return h
        kind, tail = structure
        return kind((h, *tail))

    return forward


class _BlockCallRecorder:
    """Records what every block is called with during a model forward (see the module docstring)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        self.blocks = blocks
        self.calls: list[tuple[tuple, dict]] = []
        self.structures: list[Any] = []

    def _run(self, run_model: Callable[[dict[str, Tensor]], Any], inputs: dict[str, Tensor], handles: list) -> None:
        try:
            try:
                run_model(inputs)
            except _StopForward:
                pass
            else:
                raise RuntimeError("the blocks were never all called by the model's forward")
        finally:
            for h in handles:
                h.remove()

    def real(self, run_model: Callable[[dict[str, Tensor]], Any], inputs: dict[str, Tensor]) -> list[tuple[tuple, dict]]:
        """The real blocks run; checks that each block's output is the next block's input."""
        self.calls, self.structures = [], []
        previous: list[Any] = [None]  # the last block output (for the chaining check), not all of them
        last = len(self.blocks) - 1

        def pre(i: int) -> Callable:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                if i > 0:
                    h, prev = _split_call(args, kwargs)[0], block_output(previous[0])
                    if not _same(h, prev):
                        raise ValueError(
                            f"block {i + 1}'s input is not block {i}'s output: the model transforms the hidden "
                            "states between its blocks, which block-wise reconstruction cannot reproduce; "
                            "this architecture needs its own adapter in flexround_pl/models/"
                        )
                self.calls.append((args, kwargs) if i == 0 else _without_hidden(args, kwargs))
                if len(self.blocks) == 1:
                    raise _StopForward  # a single block: its input is all that is needed
            return hook

        def post(i: int) -> Callable:
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                previous[0] = output
                self.structures.append(_structure(output))
                if i == last:
                    raise _StopForward
            return hook

        handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        handles += [b.register_forward_hook(post(i)) for i, b in enumerate(self.blocks)]
        self._run(run_model, inputs, handles)
        return self.calls

    def passing_through(
        self, run_model: Callable[[dict[str, Tensor]], Any], inputs: dict[str, Tensor]
    ) -> Optional[list[tuple[tuple, dict]]]:
        """Every block replaced by a recording pass-through (its hooks still run); None if not possible."""
        if len(self.structures) != len(self.blocks) or any(s is _StopForward for s in self.structures):
            return None
        self.calls = []

        def recording(forward: Callable) -> Callable:
            def call(*args: Any, **kwargs: Any) -> Any:
                self.calls.append((args, kwargs) if not self.calls else _without_hidden(args, kwargs))
                return forward(*args, **kwargs)
            return call

        def stop(module: nn.Module, args: tuple, output: Any) -> None:
            raise _StopForward  # after the block's own hooks (a lazy block goes back to meta first)

        patched: list[tuple[nn.Module, Any]] = []
        try:
            for block, structure in zip(self.blocks, self.structures):
                own = block.__dict__.get("forward")  # e.g. an accelerate hook's wrapper: put back after
                block.forward = recording(_pass_through(structure))  # instance attribute: hooks still run
                patched.append((block, own))
            from flexround_pl.models.lazy import without_loading  # (here: models imports this module)

            with without_loading(self.blocks):  # a lazy block's weights are not needed
                self._run(run_model, inputs, [self.blocks[-1].register_forward_hook(stop)])
        finally:
            for block, own in patched:
                del block.forward
                if own is not None:
                    block.forward = own
        return self.calls


# ---- the cache ------------------------------------------------------------------


class CalibrationCache:
    """Block inputs / targets of every calibration sample, on CPU.

    Build it with :meth:`capture`; iterate blocks with :meth:`compute_targets`,
    :meth:`advance`. ``templates[i]`` is block ``i``'s extra arguments with
    per-sample tensors replaced by placeholders; ``extras[k]`` stacks
    placeholder ``k`` over all samples (shared by every block receiving the
    same value). A cache captured at a single block replays its one template
    for every block.
    """

    def __init__(
        self,
        fp_inputs: Tensor,
        template: Any,
        extras: list[Tensor],
        loss_mask: Optional[Tensor] = None,
        storage: Optional[CacheStorage] = None,
    ) -> None:
        self.storage = storage or CacheStorage()
        self.fp_inputs = fp_inputs
        self.q_inputs = fp_inputs  # the first block sees the same (FP) input
        self.targets: Optional[Tensor] = None
        self.templates: list[tuple[tuple, dict]] = template if isinstance(template, list) else [template]
        self.extras = extras
        self.loss_mask = loss_mask
        self.loss_weight: Optional[Tensor] = None  # per-position weights of this block's loss (weigh_positions)
        self.block_index = 0  # the block whose arguments call_args gives; advance() moves it on

    def __len__(self) -> int:
        return self.fp_inputs.shape[0]

    @property
    def template(self) -> tuple[tuple, dict]:
        """The current block's call template."""
        if len(self.templates) == 1:
            return self.templates[0]
        if self.block_index >= len(self.templates):
            raise RuntimeError(f"the cache holds the arguments of {len(self.templates)} blocks; all are done")
        return self.templates[self.block_index]

    # -- capture -------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def capture(
        cls,
        run_model: Callable[[dict[str, Tensor]], Any],
        blocks: Any,
        batches: Iterable[dict[str, Tensor]],
        cache: str = "memory",
        cache_dir: Optional[str] = None,
    ) -> "CalibrationCache":
        """Record what every block of ``blocks`` receives while ``run_model`` runs each batch.

        ``run_model(inputs)`` calls the whole model; ``blocks``: the blocks in
        execution order (or one module: only its call is captured, and
        replayed for every block). Hooks record the first block's input and
        every block's other arguments, and stop the forward pass after the
        last block. Every hook and patch is removed, so the model is left
        exactly as it was. ``cache`` / ``cache_dir``: where the tensors live
        (see :class:`CacheStorage`).
        """
        recorder = _BlockCallRecorder([blocks] if isinstance(blocks, nn.Module) else list(blocks))
        records: list[_BatchRecord] = []
        masks: list[Optional[Tensor]] = []
        real_only = len(recorder.blocks) == 1
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            if records and not real_only:
                calls = recorder.passing_through(run_model, inputs)
                assert calls is not None
                records.append(_BatchRecord.build(calls))
            else:
                records.append(_BatchRecord.build(recorder.real(run_model, inputs)))
                if not real_only:  # is the pass-through shortcut exact for this model?
                    calls = recorder.passing_through(run_model, inputs)
                    real_only = calls is None or not _BatchRecord.build(calls).same_as(records[0])
            masks.append(inputs.get("attention_mask"))
        if not records:
            raise ValueError("the calibration data is empty: set a positive number of calibration samples")
        return cls._from_records(records, masks, cache, cache_dir)

    @classmethod
    def _from_records(
        cls, records: list[_BatchRecord], masks: list[Optional[Tensor]], cache: str = "memory",
        cache_dir: Optional[str] = None,
    ) -> "CalibrationCache":
        first = records[0]
        if any(r.skeletons != first.skeletons for r in records):
            raise ValueError(
                "calibration batches call the blocks with different arguments; "
                "give every calibration batch the same shape (pad text to a fixed max_length)"
            )
        # one column per group of (block, slot) holding the same leaf in every batch
        column_of: dict[tuple[int, int], int] = {}
        signatures: dict[tuple[int, ...], int] = {}
        representatives: list[tuple[int, int]] = []
        for i, block_ids in enumerate(first.ids):
            for k in range(len(block_ids)):
                signature = tuple(r.ids[i][k] for r in records)
                if signature not in signatures:
                    signatures[signature] = len(representatives)
                    representatives.append((i, k))
                column_of[(i, k)] = signatures[signature]
        sizes = [r.hidden.shape[0] for r in records]
        columns = [_Column.build(k, [r.leaf(i, k) for r in records], sizes) for i, k in representatives]
        hidden = [r.hidden for r in records]
        del records
        hidden_nbytes = sum(h.numel() * h.element_size() for h in hidden)
        extras_nbytes = sum(c.stacked.numel() * c.stacked.element_size() for c in columns if c.per_sample)
        # steady state: FP inputs + quantized inputs + fp32 targets, plus the per-sample extras
        estimate = 2 * hidden_nbytes + sum(h.numel() for h in hidden) * 4 + extras_nbytes
        storage = CacheStorage.choose(cache, cache_dir, estimate)
        extras, key_of = [], {}
        for j, c in enumerate(columns):
            if c.per_sample:
                key_of[j] = len(extras)
                extras.append(storage.put(c.stacked))

        def leaf(i: int, slot: _Slot) -> Any:
            j = column_of[(i, slot.k)]
            return _PerSample(key_of[j]) if j in key_of else columns[j].value

        templates = [_map(sk, lambda slot, i=i: leaf(i, slot)) for i, sk in enumerate(first.skeletons)]
        fp_inputs = storage.cat(hidden)
        del hidden
        loss_mask = None
        if all(m is not None for m in masks):
            mask = torch.cat([m.cpu() for m in masks]).bool()
            if mask.shape == fp_inputs.shape[:2]:
                loss_mask = storage.put(mask)
        return cls(fp_inputs, templates, extras, loss_mask, storage)

    # -- batches -------------------------------------------------------------

    def call_args(self, index: Tensor) -> tuple[tuple, dict]:
        """The extra positional and keyword arguments of samples ``index``."""

        def fill(leaf: Any) -> Any:
            return self.extras[leaf.key][index] if isinstance(leaf, _PerSample) else leaf

        return _map(self.template, fill)

    def batch(self, index: Tensor) -> dict[str, Any]:
        """Everything one reconstruction step needs for samples ``index``."""
        args, kwargs = self.call_args(index)
        out: dict[str, Any] = {
            "q_inputs": self.q_inputs[index],
            "fp_inputs": self.fp_inputs[index],
            "args": args,
            "kwargs": kwargs,
        }
        if self.targets is not None:
            out["targets"] = self.targets[index]
        weights = self.loss_weights(index)
        if weights is not None:
            out["loss_mask"] = weights
        return out

    def loss_weights(self, index: Tensor) -> Optional[Tensor]:
        """Per-position loss weights of samples ``index``: :meth:`weigh_positions`' or the padding mask."""
        if self.loss_weight is not None:
            return self.loss_weight[index]
        return self.loss_mask[index] if self.loss_mask is not None else None

    @torch.no_grad()
    def weigh_positions(self, token_loss: str, massive_ratio: float = 20.0, chunk: int = 64) -> None:
        """Per-position weights of the current block's loss, from its targets (``reconstruction.token_loss``).

        ``mse``: none (every non-padding position counts the same). ``relative``:
        position ``t`` weighs ``1 / ||y_t||^2``, so the loss is a weighted mean
        of relative squared errors and a few positions of huge norm cannot
        dominate it. ``drop_massive``: positions whose target norm exceeds
        ``massive_ratio`` x the median norm (massive activations, e.g. the
        attention-sink token of SmolLM2 / LLaMA, Sun et al. 2024, arXiv
        2402.17762) weigh 0, the rest 1. Text blocks only (targets ``[N, T, H]``).
        """
        self.loss_weight = None
        if token_loss == "mse" or self.targets is None or self.targets.dim() != 3:
            return
        sq = torch.cat([self.targets[i:i + chunk].float().pow(2).sum(-1) for i in range(0, len(self), chunk)])
        valid = self.loss_mask.bool() if self.loss_mask is not None else torch.ones_like(sq, dtype=torch.bool)
        if token_loss == "relative":
            weight = valid / sq.clamp_min(torch.finfo(torch.float32).tiny)
        elif token_loss == "drop_massive":
            norms = sq.sqrt()
            weight = (valid & (norms <= massive_ratio * norms[valid].median())).float()
        else:
            raise ValueError(f"reconstruction.token_loss must be 'mse', 'relative' or 'drop_massive', got {token_loss!r}")
        self.loss_weight = weight.float()

    # -- running a block over the whole cache ---------------------------------

    @torch.no_grad()
    def apply(
        self, block: nn.Module, inputs: Tensor, device: torch.device, batch_size: int,
        each: Optional[Callable[[Tensor, Tensor], None]] = None,
        before: Optional[Callable[[Tensor], None]] = None,
    ) -> Tensor:
        """``block`` applied to every row of ``inputs``; result (float32) on CPU, in the cache's storage.

        ``each(index, output)`` is called for every batch (e.g. to score the
        outputs while they are on the device, without a second pass);
        ``before(index)`` before its forward (e.g. to tell hooks which samples it holds).
        """
        result: Optional[Tensor] = None
        for start in range(0, len(self), batch_size):
            index = torch.arange(start, min(start + batch_size, len(self)))
            if before is not None:
                before(index)
            args, kwargs = to_device(self.call_args(index), device)
            out = block_output(block(inputs[index].to(device), *args, **kwargs)).detach()
            if each is not None:
                each(index, out)
            if result is None:
                result = self.storage.empty((len(self), *out.shape[1:]), torch.float32)
            result[start:start + out.shape[0]].copy_(out)  # = out.float().cpu(), written in place
        assert result is not None
        return result

    def compute_targets(
        self, teacher: nn.Module, device: torch.device, batch_size: int,
        before: Optional[Callable[[Tensor], None]] = None,
    ) -> None:
        """FP outputs of the current block: the reconstruction targets.

        This is the one pass of each block over the FP calibration inputs:
        modules counting calibration statistics (MoE tokens per expert,
        models/moe.py) count while :func:`in_target_pass` is true.
        """
        global _TARGET_PASS
        _TARGET_PASS = True
        try:
            self.targets = self.apply(teacher, self.fp_inputs, device, batch_size, before=before)
        finally:
            _TARGET_PASS = False

    def advance(
        self, hardened_block: nn.Module, device: torch.device, batch_size: int,
        each: Optional[Callable[[Tensor, Tensor], None]] = None,
    ) -> None:
        """Move on to the next block: FP targets become FP inputs; quantized inputs go through the hardened block.

        ``each(index, output)``: see :meth:`apply`; ``self.targets`` still holds this block's targets then.
        """
        if self.targets is None:
            raise RuntimeError("compute_targets must run before advance")
        self.advance_to(self.apply(hardened_block, self.q_inputs, device, batch_size, each))

    def advance_to(self, q_outputs: Tensor) -> None:
        """:meth:`advance` with the hardened block's outputs already computed (``apply`` on ``q_inputs``)."""
        if self.targets is None:
            raise RuntimeError("compute_targets must run before advance")
        if q_outputs.shape[0] != len(self):
            raise ValueError(f"advance_to: {q_outputs.shape[0]} outputs for {len(self)} calibration samples")
        self.q_inputs = q_outputs
        self.fp_inputs, self.targets = self.targets, None
        self.block_index += 1

    def nbytes(self) -> int:
        tensors = [self.fp_inputs, self.q_inputs, *self.extras]
        if self.targets is not None:
            tensors.append(self.targets)
        return sum(t.numel() * t.element_size() for t in tensors)


_TARGET_PASS = False


def in_target_pass() -> bool:
    """True while :meth:`CalibrationCache.compute_targets` runs a block (once per block, FP inputs)."""
    return _TARGET_PASS


def to_device(tree: Any, device: torch.device) -> Any:
    return _map(tree, lambda x: x.to(device) if isinstance(x, Tensor) else x)
