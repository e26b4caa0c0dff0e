"""Memory bounds: how many bytes one evaluation step will need, found before anything real is allocated.

:func:`estimate_step` runs the module's forward (and backward) on PyTorch's ``meta`` device, where tensors have
shapes and dtypes but no data, so a 24 GB step is "run" in about a second and allocates nothing. It counts:

- ``params``: the parameters and buffers, once (a shared parameter once), in the step's dtype;
- ``grads``: one gradient per trainable parameter (backward only);
- ``optimizer``: ``optimizer_states`` tensors per trainable parameter (AdamW keeps two);
- ``activations``: with backward, the tensors autograd saves for it (``saved_tensors_hooks``, each storage once,
  parameters and buffers left out: they are counted above) plus the input; forward-only, the peak of the
  bytes alive during the forward;
- ``workspace``: what the step holds at its peak beyond those, read from the same run: the bytes alive at the
  peak of forward + backward, less the saved activations and the gradients already made at that moment
  (the activation gradients and temporaries of the backward); with an optimiser, at least one more copy of the
  trainable parameters (AdamW's foreach step makes such temporaries once the activations are freed); plus
  :data:`ALLOCATOR_SLACK` of the activations and workspace, what the allocator holds beyond the bytes alive.

Bytes alive are tracked by a small ``TorchDispatchMode``: each storage an op creates is counted until a weakref
finalizer sees it freed, which is what a caching-free allocator would hold. The module's state is left as it
was: :func:`torch.func.functional_call` swaps meta copies in for its parameters and buffers, so BatchNorm's
running statistics are updated on the copies only, and no ``.grad`` is touched. Meta kernels pick no fused
attention, so attention is counted with its probabilities (the math kernel): an over-estimate where the real
device runs a flash kernel.

If the meta run fails (an op without a meta kernel, or code that reads values, such as ``.item()``), the
estimate falls back to an analytic bound, flagged in ``MemoryEstimate.analytic``: the parameter terms are exact
and the activations are taken as ``4 x input bytes`` per leaf module, far above what a MetaFormer keeps (about
one input's worth per leaf module at 224 px). Every network the repo compiles ran on meta when this was written:
the 60 zoo specs, the 10 examples, the references of both shipped spaces and 50 points sampled from them.

Many of PyTorch's meta kernels are Python, so the run remembers the output layouts each op gave for its inputs'
layouts (:func:`_meta_call`; the estimates are the same). ``python benchmarks/meta_step.py`` (AMD EPYC, one
thread, medians): a training step of a tiny-space candidate at 64 images costs 0.26 s with every meta kernel run,
0.15 s for a search's first candidate and 0.06 s once the search has seen its ops' shapes; of a zoo model at
224 px (2 images), 1.15 s, 0.34 s and 0.22 s.

Accuracy, measured on CPU with ``benchmarks/memory_estimate.py`` (each case in a fresh process at one thread:
the peak resident set over the evaluation, ``VmHWM`` reset through ``/proc/self/clear_refs`` after a
``malloc_trim``, less the resident set before; the second of two runs, as in a search that has run candidates
before; a first run also pages in about 20 MB of library code):

==================================  ============  =========  =========  ===========
network, evaluation                 input, batch  estimate   real peak  real / est.
==================================  ============  =========  =========  ===========
poolformer_s12, grad_norm           224 px, 32    2.60 GB    2.45 GB    0.94
vit_small_patch16_224, grad_norm    224 px, 32    3.15 GB    2.22 GB    0.70
convnext_tiny, grad_norm            224 px, 16    2.51 GB    2.00 GB    0.80
caformer_s18, grad_norm             224 px, 16    3.49 GB    2.73 GB    0.78
poolformer_s12, naswot              224 px, 32    516 MB     474 MB     0.92
vit_small_patch16_224, synflow      224 px, 1     569 MB     477 MB     0.84
poolformer_s12, train (2 steps)     224 px, 8     878 MB     678 MB     0.77
tiny caformer_tiny, grad_norm       32 px, 64     249 MB     267 MB     1.07
tiny vit_tiny, naswot               32 px, 64     46.7 MB    38.6 MB    0.82
tiny convformer_tiny, train         32 px, 64     260 MB     257 MB     0.99
==================================  ============  =========  =========  ===========

The real peak is at most 7 % above the estimate here, 13 % for the tiny caformer's grad-norm at 128 images,
24 % on a cold first run of the smallest case (library code paged in); the estimate is at most about 1.4 times
the real peak (attention counted as the math kernel).
Without the allocator's slack the tiny cases ran 27-32 % above; the tiny caformer's grad-norm step with
``MALLOC_MMAP_THRESHOLD_`` pinned at 128 kB matched the bytes alive within 3 %. Not measured on CUDA (no GPU
was at hand): there autocast halves the activations the float32 estimate counts, and the caching allocator
fragments in its own way.

Nothing here imports Optuna: the evaluators use it, and any caller may.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from metaformer_lab.core.sizes import available_bytes, byte_scale, format_bytes, proc_bytes

DEFAULT_SHARE = 0.2
"""The share of the memory available now that :func:`default_limit` allows one evaluation: the process's own
data and libraries come on top (a 224 px search holds 2-3 GB before its first candidate), and the estimate may
be up to ~10 % low; with a fifth, the 224 px search of a 24 GB machine stays near 7 GB at its peak."""

ANALYTIC_EXPANSION = 4
"""The analytic fallback's activations per leaf module, in input batches (see the module docstring)."""

ALLOCATOR_SLACK = 0.3
"""What the allocator holds beyond the bytes alive, as a share of the step's activations and workspace (the
memory that comes and goes within a step), counted in the workspace. On CPU, glibc serves blocks under its
mmap threshold (which grows up to 32 MiB) from a heap that keeps freed holes: 20-32 % more than was alive at
the tiny space's 32 px and for PoolFormer at 224 px, within 3 % once ``MALLOC_MMAP_THRESHOLD_`` pins the
threshold. PyTorch's CUDA caching allocator fragments too."""

def default_limit(device: str | torch.device) -> int:
    """:data:`DEFAULT_SHARE` of the memory available now on ``device``: room for the caller, its data and
    other work on the machine."""
    return int(DEFAULT_SHARE * available_bytes(device))


def held_bytes(device: str | torch.device) -> int:
    """What this process holds now on ``device``: CPU, its resident set (``VmRSS``; 0 where unreadable);
    CUDA, the bytes PyTorch has allocated there."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.memory_allocated(dev))
    try:
        return proc_bytes("/proc/self/status", "VmRSS")
    except (OSError, AttributeError):
        return 0


def release(device: str | torch.device) -> None:
    """Give memory freed by an evaluation back to the system: the CUDA cache, and on glibc the heap pages
    ``malloc`` keeps after a large evaluation (without this the resident set of a search climbs to the peak of
    its largest candidate so far and stays there; ``benchmarks/search_memory.py``)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    elif _LIBC is not None:
        _LIBC.malloc_trim(0)


@contextmanager
def collecting_new_objects_only() -> Iterator[None]:
    """Within the block, garbage collections skip every object that existed when it began (``gc.freeze``).

    A search collects after every trial (``release``, Optuna's ``gc_after_trial``). A full collection walks
    every live object, and a process with torch, timm, pydantic and Optuna loaded holds millions: 0.1-0.3 s per
    collection, half of a zero-cost search's time. The trial's own garbage was all made inside the block, so
    collecting it needs none of the older objects; they are unfrozen (collectable again) when the block ends."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _glibc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _glibc()


def step_limit(max_memory: int | None, device: str | torch.device) -> int:
    """The bytes one evaluation may allocate now: ``max_memory`` (a cap on the whole process) less what the
    process holds (:func:`held_bytes`), or :func:`default_limit` without a cap. At least 1, so that a
    process already over its cap turns every candidate away as out of memory rather than failing."""
    limit = default_limit(device) if max_memory is None else max_memory - held_bytes(device)
    return max(int(limit), 1)


@dataclass(frozen=True)
class MemoryEstimate:
    """The bytes one step needs, by what holds them (see the module docstring for how each is counted).

    Attributes:
        params: parameters and buffers.
        grads: parameter gradients (0 without backward).
        optimizer: optimiser states.
        activations: kept for backward, or the forward-only peak.
        workspace: held at the peak beyond the others (activation gradients, temporaries).
        batch: images in the step.
        analytic: why the meta run failed, when the activations are the analytic bound (None: measured).
    """

    params: int
    grads: int
    optimizer: int
    activations: int
    workspace: int
    batch: int
    analytic: str | None = None

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.workspace

    def describe(self) -> str:
        """``est. 3.41 GB (params 0.29, grads 0.29, optimizer 0.58, activations 2.20, workspace 0.05) at batch
        64``, every term in the total's unit."""
        size, _ = byte_scale(self.total)
        terms = ", ".join(f"{f.name} {getattr(self, f.name) / size:.2f}" for f in fields(self)[:5])
        bound = f"; analytic bound, the meta run failed: {self.analytic}" if self.analytic else ""
        return f"est. {format_bytes(self.total)} ({terms}) at batch {self.batch}{bound}"


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages ops create while they are alive, and their peak. Storages made
    before (parameters, buffers, the input) are registered with :meth:`known` and never counted as new."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = self.peak_at = self.made = 0
        self.born: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> creation number (0: made before)

    def known(self, tensors: Iterable[Tensor], *, counted: bool = False) -> None:
        for t in tensors:
            self.born[t.untyped_storage()] = 0
            if counted:
                self.live += t.untyped_storage().nbytes()
                self.peak = max(self.peak, self.live)

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = _meta_call(func, args, kwargs or {})
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.untyped_storage() not in self.born:
                storage = t.untyped_storage()
                self.made += 1
                self.born[storage] = self.made
                self.live += storage.nbytes()
                weakref.finalize(storage, self._freed, storage.nbytes())
        if self.live > self.peak:
            self.peak, self.peak_at = self.live, self.made
        return out


def estimate_step(net: nn.Module, input_shape: tuple[int, ...], *, backward: bool, optimizer_states: int = 0,
                  dtype: torch.dtype = torch.float32) -> MemoryEstimate:
    """The bytes a step of ``net`` on an input of ``input_shape`` needs, with nothing real allocated.

    The forward runs in the module's current modes (the caller sets train or eval: dropout masks and
    BatchNorm's batch statistics are counted in train mode only); with ``backward``, the loss is the sum of
    the outputs and every trainable parameter gets a gradient. Floating-point parameters, buffers and the
    input are taken in ``dtype`` (``torch.float64`` for SynFlow). ``net`` is left exactly as it was.
    """
    batch = input_shape[0]
    state = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    trainable = sum(_nbytes(p, dtype) for p in net.parameters() if p.requires_grad) if backward else 0
    params = sum(_nbytes(t, dtype) for t in state.values())
    optimizer = optimizer_states * sum(_nbytes(p, dtype) for p in net.parameters() if p.requires_grad)
    try:
        activations, workspace = _meta_step(net, state, input_shape, backward, dtype)
    except Exception as err:  # whatever fails on meta (a missing kernel, a value read): the bound instead
        leaves = sum(1 for m in net.modules() if not any(m.children()))
        images = torch.Size(input_shape).numel() * dtype.itemsize
        why = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
        return MemoryEstimate(params, trainable, optimizer, ANALYTIC_EXPANSION * images * max(leaves, 1),
                              trainable if optimizer_states else 0, batch, analytic=why)
    if optimizer_states:
        workspace = max(workspace, trainable)
    workspace += int(ALLOCATOR_SLACK * (activations + workspace))
    return MemoryEstimate(params, trainable, optimizer, activations, workspace, batch)


def _meta_step(net: nn.Module, state: dict[str, Tensor], input_shape: tuple[int, ...], backward: bool,
               dtype: torch.dtype) -> tuple[int, int]:
    """(activations, workspace) of one forward (and backward) on the meta device."""
    meta = {name: torch.empty_like(t, device="meta", dtype=dtype if t.is_floating_point() else t.dtype)
            .requires_grad_(backward and isinstance(t, nn.Parameter) and t.requires_grad) for name, t in state.items()}
    x = torch.empty(input_shape, device="meta", dtype=dtype)
    saved: dict[int, int] = {id(x.untyped_storage()): x.untyped_storage().nbytes()}  # alive: nothing freed
    tracker = _LiveBytes()
    tracker.known(meta.values())
    tracker.known([x], counted=True)

    def pack(t: Tensor) -> Tensor:
        if tracker.born.get(t.untyped_storage(), 1):  # not a parameter or buffer (born 0; the input is in)
            saved[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return t

    with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.set_grad_enabled(backward):
        out = functional_call(net, meta, (x,))
        if not backward:
            return tracker.peak, 0
        activations = sum(saved.values())
        loss = sum(t.float().sum() for t in tree_leaves(out) if isinstance(t, Tensor) and t.requires_grad)
        leaves = [t for t in meta.values() if t.requires_grad]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True) if isinstance(loss, Tensor) else ()
        storages = {id(g.untyped_storage()): g.untyped_storage() for g in grads if g is not None}
        made_by_peak = sum(s.nbytes() for s in storages.values() if 0 < tracker.born.get(s, 0) <= tracker.peak_at)
    return activations, max(tracker.peak - activations - made_by_peak, 0)


def _nbytes(t: Tensor, dtype: torch.dtype) -> int:
    return t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())


# --- meta kernels, remembered ----------------------------------------------------------------------

META_CACHE_SIZE = 20_000
"""Entries :func:`_meta_call` keeps (op and input layouts -> output layouts; about 1 kB each, 300 for a tiny-space
candidate's training step); when full, the oldest tenth goes."""

_META_LAYOUTS: dict[Any, Any] = {}
_UNSEEN = object()


def _meta_call(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``func(*args, **kwargs)``, from the layouts it gave before for the same inputs where it can be.

    Many of PyTorch's meta kernels are Python (``torch._refs``, ``torch._meta_registrations``): 0.3 ms for an
    elementwise product and 2.5 ms for a layer norm, where the real CPU kernel of a 32 px step takes a few
    microseconds; a meta run cost more than a real training step of a tiny-space network. On meta nothing but
    the outputs' layouts comes out of a kernel, and they are a function of the op and its inputs' layouts and
    arguments (a candidate's blocks repeat them; so do the micro-batch sizes :func:`~metaformer_lab.search.
    evaluators._fit` tries and the candidates of one search). The first call of each such key runs the kernel
    and records its outputs' dtypes, shapes and strides; later ones make fresh meta tensors of those layouts.
    An op is recorded only where that is all it does: not mutable, every output a meta tensor (or None) with a
    storage of its own, of exactly its layout's size at offset 0 (so no view, not even an unannotated one such
    as ``aten._unsafe_view``, and no output sharing another's storage); the others run each time.
    """
    try:
        key = (func, _layout_key(args), _layout_key(kwargs))
        layouts = _META_LAYOUTS.get(key, _UNSEEN)
    except TypeError:  # an argument that cannot be a key
        return func(*args, **kwargs)
    if layouts is None:
        return func(*args, **kwargs)
    if layouts is not _UNSEEN:
        return _made(layouts)
    out = func(*args, **kwargs)
    if len(_META_LAYOUTS) >= META_CACHE_SIZE:
        for old in list(itertools.islice(_META_LAYOUTS, META_CACHE_SIZE // 10)):
            _META_LAYOUTS.pop(old, None)
    _META_LAYOUTS[key] = _recordable(func, args, kwargs, out)
    return out


def _layout_key(x: Any) -> Any:
    """A hashable stand-in for an op argument: a tensor by its layout, a scalar with its type (``1`` and ``1.0``
    give different dtypes). Raises TypeError for what cannot be hashed."""
    if isinstance(x, Tensor):
        return ("T", x.dtype, x.device, tuple(x.shape), x.stride(), x.storage_offset())
    if isinstance(x, (list, tuple)):
        if all(type(v) is int for v in x):  # sizes, dims: the common case, taken as they are
            return (type(x), tuple(x))
        return (type(x), tuple(_layout_key(v) for v in x))
    if isinstance(x, dict):
        return (dict, tuple((k, _layout_key(v)) for k, v in x.items()))
    hash(x)
    return (type(x), x)


def _recordable(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    """The layouts of ``out`` that :func:`_made` rebuilds, or None where the op must run each time."""
    schema = getattr(func, "_schema", None)
    if schema is None or schema.is_mutable:
        return None
    inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
    seen: set[int] = set()

    def layout(t: Any) -> Any:
        if t is None:
            return None
        if isinstance(t, (list, tuple)):
            items = tuple(layout(v) for v in t)
            return _UNSEEN if any(item is _UNSEEN for item in items) else (type(t), items)
        if not isinstance(t, Tensor) or t.device.type != "meta" or t.storage_offset() != 0:
            return _UNSEEN
        storage = t.untyped_storage()
        if storage._cdata in inputs or storage._cdata in seen:  # the StorageImpl's address: its identity
            return _UNSEEN
        seen.add(storage._cdata)
        fresh = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        if fresh.untyped_storage().nbytes() != storage.nbytes():
            return _UNSEEN
        return ("T", t.dtype, tuple(t.shape), t.stride())

    made = layout(out)
    return None if made is _UNSEEN else made


def _made(layouts: Any) -> Any:
    if layouts is None:
        return None
    if layouts[0] == "T":
        _, dtype, shape, stride = layouts
        return torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    kind, items = layouts
    return kind(_made(v) for v in items)
