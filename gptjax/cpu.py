"""Everything gptjax does only because XLA's CPU backend runs it faster (docs/benchmarks.md has
the measurements). `kernels.choose` selects these pieces for CPU runs; any of them can be asked
for by name elsewhere, and each is tested against the plain JAX version it replaces.

- The Dense product (`dense_dot_general`): a Dense layer's weight gradient x^T dy contracts the
  major dimension of both operands, a dot form XLA's CPU backend leaves to Eigen rather than
  YNNPACK, which takes only dots whose left operand contracts its minor dimension. For YNNPACK
  (and oneDNN) the backward pass here first transposes the narrower operand into a real copy
  (behind an optimization barrier, or XLA folds the transpose back into the dot); where Eigen
  multiplies (`Kernels.dot_library="eigen"`) the dot goes to it as it is. Tall products with a short
  contraction also run faster in row blocks than as one call; that is only done on one device's
  arrays, since a loop over blocks of a partitioned axis would gather it onto every device.
- Causal attention in query blocks (`blocked_causal_attention`): XLA's CPU backend has no fused
  attention, so the masked half of the (T, T) scores is skipped by computing each query block
  against only the keys it may see. For a forward pass on one device, a few heads at a time in
  a loop (`head_group_causal_attention`), so that a group's scores stay in a core's cache.
- The flat all-reduce (`flat_data_parallel`): XLA's CPU runtime synchronises the devices once per
  all-reduce operand, so each device takes its shard's gradient in shard_map and they meet in one
  all-reduce of a flat buffer.
- Host settings (`tune_host`): split the cores into XLA devices for data parallelism, and keep
  freed memory in the process instead of handing it back to the kernel.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import math
import os
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from gptjax.attention import Dropout, attend_prefix
from gptjax.perf import usable_cores
from gptjax.sharding import DATA_AXES

# --- the Dense product ---------------------------------------------------------------------

# Row blocks for tall products with a short contraction.
CHUNK_ROWS = 256
CHUNK_MIN_ROWS = 4096
CHUNK_MAX_CONTRACTION = 512


def _matmul(x_NxK, w, w_contracting: int = 0):
    """x (..., K) times w over x's last axis and w's axis `w_contracting` (0: w is (K, D),
    1: w is (D, K), i.e. x @ w.T)."""
    return jax.lax.dot_general(x_NxK, w, (((x_NxK.ndim - 1,), (w_contracting,)), ((), ())))


def _rows_matmul(x_NxK, w, w_contracting: int, row_blocks: bool):
    """_matmul, in row blocks when asked and x is tall with a short contraction."""
    K = x_NxK.shape[-1]
    x_MxK = x_NxK.reshape(-1, K)
    M = x_MxK.shape[0]
    if not row_blocks or M < CHUNK_MIN_ROWS or M % CHUNK_ROWS or K > CHUNK_MAX_CONTRACTION:
        return _matmul(x_NxK, w, w_contracting)
    blocks_GxRxK = x_MxK.reshape(M // CHUNK_ROWS, CHUNK_ROWS, K)
    y_GxRxD = jax.lax.map(lambda x_RxK: _matmul(x_RxK, w, w_contracting), blocks_GxRxK)
    return y_GxRxD.reshape(x_NxK.shape[:-1] + (w.shape[1 - w_contracting],))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(x_NxC, w_CxD, row_blocks: bool = False, transposed_copy: bool = True):
    """x @ w over x's last axis (any leading shape N), with the gradients of x @ w; the weight
    gradient is computed in the layout XLA's fast CPU kernels take: through a transposed copy
    for YNNPACK, as it is for Eigen (module docstring)."""
    return _rows_matmul(x_NxC, w_CxD, 0, row_blocks)


def _forward(x_NxC, w_CxD, row_blocks, transposed_copy):
    return _rows_matmul(x_NxC, w_CxD, 0, row_blocks), (x_NxC, w_CxD)


def _backward(row_blocks, transposed_copy, residuals, dy_NxD):
    x_NxC, w_CxD = residuals
    dx_NxC = _rows_matmul(dy_NxD, w_CxD, 1, row_blocks)
    C, D = w_CxD.shape
    x_MxC, dy_MxD = x_NxC.reshape(-1, C), dy_NxD.reshape(-1, D)
    barrier = jax.lax.optimization_barrier
    if not transposed_copy:
        dw_CxD = jnp.matmul(x_MxC.T, dy_MxD)
    elif C <= D:  # copy the narrower operand
        dw_CxD = jnp.matmul(barrier(x_MxC.T), dy_MxD)
    else:
        dw_CxD = barrier(jnp.matmul(barrier(dy_MxD.T), x_MxC)).T
    return dx_NxC, dw_CxD


matmul.defvjp(_forward, _backward)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *,
                       row_blocks: bool, transposed_copy: bool):
    dense_dims = (((lhs.ndim - 1,), (0,)), ((), ()))
    if rhs.ndim == 2 and dimension_numbers == dense_dims and precision is None and preferred_element_type is None:
        return matmul(lhs, rhs, row_blocks, transposed_copy)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


def dense_dot_general(row_blocks: bool, transposed_copy: bool = True):
    """A `dot_general` for nn.Dense: x (..., C) times kernel (C, D) through `matmul`."""
    return _DOT_GENERALS[row_blocks, transposed_copy]


_DOT_GENERALS = {(b, c): functools.partial(_dense_dot_general, row_blocks=b, transposed_copy=c)
                 for b in (False, True) for c in (False, True)}

# --- causal attention in query blocks -------------------------------------------------------


def query_blocks(seq_len: int) -> int:
    """Query blocks for `blocked_causal_attention`: 4, fewer for short sequences so that a block
    keeps at least 32 rows (1: no blocking); more than 4 measured slower again."""
    return max(1, min(4, seq_len // 32))


def _block_count(seq_len: int, n_blocks: int | None) -> int:
    """n_blocks (default `query_blocks`), at least 1 and at most one block per query."""
    return max(1, min(query_blocks(seq_len) if n_blocks is None else n_blocks, seq_len))


def blocked_causal_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, n_blocks: int | None = None,
                             dropout: Dropout | None = None, deterministic: bool = True):
    """Causal softmax attention with the T queries split into `n_blocks` consecutive blocks
    (default `query_blocks(T)`): block i attends to the keys up to its own last position only, so
    the score blocks above the diagonal are never computed. Each block sees its whole row of
    visible keys, so the softmax is exactly that of masked attention under a causal mask.

    Heads go major once, (B, N, T, H): each block's products are then contiguous batched matmuls
    and the key/value prefixes are slices rather than fresh transposes."""
    B, T, N, H = q_BxTxNxH.shape
    n_blocks = _block_count(T, n_blocks)
    bounds = [T * i // n_blocks for i in range(n_blocks + 1)]
    scale = 1.0 / math.sqrt(H)
    q_BxNxTxH, k_BxNxTxH, v_BxNxTxH = (jnp.transpose(a, (0, 2, 1, 3)) for a in (q_BxTxNxH, k_BxTxNxH, v_BxTxNxH))
    # the queries at positions start..stop-1 over the `stop` keys they may see
    outputs = [attend_prefix(q_BxNxTxH[:, :, start:stop], (k_BxNxTxH[:, :, :stop],), (v_BxNxTxH[:, :, :stop],),
                             start, scale, dropout, deterministic)
               for start, stop in zip(bounds[:-1], bounds[1:])]
    return jnp.transpose(jnp.concatenate(outputs, axis=2), (0, 2, 1, 3))


HEAD_GROUP = 2  # heads per step of `head_group_causal_attention`'s loop
MIN_HEAD_GROUP_LENGTH = 256  # shorter sequences measured no faster in the loop
L2_BYTES_UNKNOWN = 2 << 20  # where the OS does not say


@functools.cache
def l2_cache_bytes(cache_dir: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """One core's level-2 cache in bytes, as Linux reports it in `cache_dir` (L2_BYTES_UNKNOWN
    where it does not)."""
    for index in sorted(Path(cache_dir).glob("index*")):
        try:
            level, kind, size = ((index / name).read_text().strip() for name in ("level", "type", "size"))
        except OSError:
            continue
        if level == "2" and kind in ("Unified", "Data") and size[:-1].isdigit():
            return int(size[:-1]) << {"K": 10, "M": 20}.get(size[-1], 0)
    return L2_BYTES_UNKNOWN


def head_group_causal_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, n_blocks: int | None = None,
                                dropout: Dropout | None = None, deterministic: bool = True):
    """`blocked_causal_attention` a group of HEAD_GROUP heads at a time, in a loop: one group's
    score blocks stay in a core's cache from their product through the softmax to the product
    with the values, where all heads' blocks at once would not, and its smaller buffers reuse
    memory where theirs may come as fresh pages. For inference: under autodiff the train step is
    slower by head groups, with the loop's residuals stacked or each group's scores recomputed
    (docs/benchmarks.md, "Tried and not kept"). Left to
    `blocked_causal_attention` whole: attention with dropout, sequences shorter than
    MIN_HEAD_GROUP_LENGTH, all heads' score blocks fitting in a core's level-2 cache anyway, heads
    that do not pair up."""
    B, T, N, H = q_BxTxNxH.shape
    n_blocks = _block_count(T, n_blocks)
    scores_bytes = B * N * -(-T // n_blocks) * T * 4  # the largest block's float32 scores, all heads
    if (dropout is not None or T < MIN_HEAD_GROUP_LENGTH or scores_bytes <= l2_cache_bytes()
            or (B * N) % HEAD_GROUP):
        return blocked_causal_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, n_blocks, dropout, deterministic)
    # (B, T, N, H) -> (B * N / G, G, T, 1, H): each step's G heads as a batch of one-head sequences
    groups = [jnp.transpose(a, (0, 2, 1, 3)).reshape(B * N // HEAD_GROUP, HEAD_GROUP, T, 1, H)
              for a in (q_BxTxNxH, k_BxTxNxH, v_BxTxNxH)]
    out = jax.lax.map(lambda qkv: blocked_causal_attention(*qkv, n_blocks), groups)
    return jnp.transpose(out.reshape(B, N, T, H), (0, 2, 1, 3))

# --- the flat all-reduce --------------------------------------------------------------------


def flat_data_parallel(fn, mesh: Mesh):
    """fn(params, x_AxBxT, y_AxBxT, *rest) run on each device's batch shard, its outputs (a
    pytree of float32) averaged over the devices as one flat buffer: one all-reduce where XLA would
    issue one per parameter."""

    def local(params, x_AxBxT, y_AxBxT, *rest):
        flat, unravel = ravel_pytree(fn(params, x_AxBxT, y_AxBxT, *rest))
        return unravel(jax.lax.pmean(flat, DATA_AXES))

    batch_spec = P(None, DATA_AXES)

    def per_shard(params, x_AxBxT, y_AxBxT, *rest):
        # check_vma off: a scan carry starts replicated and turns per-device, which pmean undoes
        return jax.shard_map(local, mesh=mesh, in_specs=(P(), batch_spec, batch_spec) + (P(),) * len(rest),
                             out_specs=P(), check_vma=False)(params, x_AxBxT, y_AxBxT, *rest)

    return per_shard

# --- host settings ------------------------------------------------------------------------


def split_devices(batch_size: int, max_devices: int = 8, dp: int = -1, fsdp: int = 1) -> int:
    """On a CPU-only machine, expose the cores as separate XLA devices so that the batch runs
    data-parallel across them: XLA's CPU backend runs a small model's many little ops one after
    another, and one device per core keeps every core busy.

    A mesh the user sized (`dp` x `fsdp`, neither -1) gets exactly its devices. Otherwise the count
    is the most devices, up to the cores (or GPTJAX_CPU_DEVICES), that divide batch_size and are a
    multiple of the axis given. Does nothing when XLA_FLAGS sets a device count, an accelerator
    plugin is installed, the run spans several processes, or the backend is already up. Returns
    the number of CPU devices it asked for (1: unchanged)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return 1
    requested = os.environ.get("GPTJAX_CPU_DEVICES")
    if requested is None and (_accelerator_installed() or _multi_process() or _backend_started()):
        return 1
    if dp > 0 and fsdp > 0:
        count = dp * fsdp  # batch divisibility is checked at set-up, with the fix in its message
    else:
        if requested is None:
            limit = min(usable_cores(), max_devices)
        else:
            limit = int(requested)
        axis = max(dp, fsdp, 1)  # the size of the axis that is not -1
        count = max([d for d in range(1, max(limit, 1) + 1) if batch_size % d == 0 and d % axis == 0], default=1)
    if count > 1:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    return count


# glibc mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # on 64-bit: bigger blocks always get their own mmap
_GLIBC_HEAP_MAX = 2 * _GLIBC_MMAP_THRESHOLD_MAX  # the largest heap of a thread's arena


def keep_freed_memory(largest_buffer_bytes: int) -> bool:
    """On a CPU-only Linux (glibc) host, let malloc keep freed memory for reuse instead of handing
    it back to the kernel, which zeroes each page again on its next first touch. XLA's CPU runtime
    allocates each step's buffers afresh on its pool threads, and glibc returns them between steps
    in three ways: a block over its (moving) mmap threshold gets an mmap of its own; a thread
    arena's freed top is trimmed; and where older allocations fill a thread arena's heap, the step's
    buffers go to a new heap, unmapped again once they are freed. Which of these happens depends on
    what the process allocated before, so the same step runs at two speeds in different processes
    (docs/benchmarks.md, "Two speeds in one host"). Never mmapping blocks, never trimming, and a
    heap's worth of top padding (glibc unmaps an emptied heap only when the heap before it has less
    than that free) stop all three. Steps whose activations exceed 32 MB also put every thread in
    one arena, one heap reused in turn, which measured faster for them and slower for smaller ones.
    The process then keeps its peak memory until it exits.

    Must run before JAX starts its threads (the one-arena setting applies to threads created
    later). GPTJAX_KEEP_MEMORY=0 turns it off. Returns whether it was applied."""
    if os.environ.get("GPTJAX_KEEP_MEMORY") == "0":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if _accelerator_installed() or _backend_started():
        return False
    settings = [(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, _GLIBC_HEAP_MAX)]  # -1: SIZE_MAX, never
    if largest_buffer_bytes > _GLIBC_MMAP_THRESHOLD_MAX:
        settings.append((_M_ARENA_MAX, 1))
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def largest_activation_bytes(batch_size: int, block_size: int, n_embd: int, n_head: int, n_devices: int = 1) -> int:
    """float32 bytes of a train step's biggest activation on one device: the MLP's hidden layer
    (B, T, 4C) or the attention scores (B, N, T, T) of one micro-batch."""
    per_device = max(batch_size // max(n_devices, 1), 1)
    return 4 * per_device * block_size * max(4 * n_embd, n_head * block_size)


def tune_host(cfg) -> None:
    """The CPU host settings for a TrainConfig's run, applied by the command-line entry points
    before JAX starts (no-ops on accelerator hosts): split the cores into devices, keep freed
    memory for the next step."""
    n_devices = split_devices(cfg.batch_size, dp=cfg.dp, fsdp=cfg.fsdp)
    keep_freed_memory(largest_activation_bytes(cfg.batch_size, cfg.block_size, cfg.n_embd, cfg.n_head, n_devices))


def _accelerator_installed() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0] != "cpu"
    names = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    return any(n.startswith(("jax-cuda", "jax_cuda", "jax-rocm", "libtpu", "jax-tpu")) for n in names)


def _multi_process() -> bool:
    return any(v in os.environ for v in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"))


def _backend_started() -> bool:
    from jax._src import xla_bridge  # jax has no public query; a started backend ignores XLA_FLAGS

    return bool(getattr(xla_bridge, "backends_are_initialized", lambda: False)())
