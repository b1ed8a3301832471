"""The host's memory, and the buffers sized by the model's config times the engine's limits, counted before any is
allocated: a config.json at its bounds (vocabulary 2^22) with large limits asked for tens of GiB at the first step, a
MemoryError or the OOM killer instead of a line that names the limit to lower."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import EngineConfig, ModelConfig
from ..errors import InvalidRequestError

if TYPE_CHECKING:
    from ..kv.layout import KVLayout
    from .base import Ops

LOGIT_BYTES = 4  # logits are float32 on every backend
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # v2, v1


def host_memory_bytes(cgroup_files: tuple[str, ...] = CGROUP_LIMITS) -> int:
    """Physical memory, or the lowest cgroup memory limit among `cgroup_files` ("max" or unreadable: none)."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # no sysconf (Windows): nothing to check against
        mem = 1 << 62
    for path in cgroup_files:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            mem = min(mem, int(text))
    return mem


@dataclass(frozen=True)
class MemoryNeed:
    """One such buffer: its bytes, what sizes it (`sized`, the product in words), what it holds, the knob that lowers it."""

    nbytes: int
    sized: str
    what: str
    knob: str


def step_needs(
    cfg: ModelConfig, ecfg: EngineConfig, max_len: int, rope_itemsize: int = 4
) -> list[MemoryNeed]:
    """What any backend's step holds at its largest: the logits of every row of a prefill chunk (prompt logprobs and
    scoring ask for all of them; a step computes at most max_num_batched_tokens rows, decode rows included), a copy
    of the rows sampled (one a sequence; the step picks them out of a chunk's), float32-sized activations, and the
    RoPE tables of the whole context (`rope_itemsize`: the backend's table type, the host's RopeTables float32)."""
    t, v = ecfg.max_num_batched_tokens, cfg.vocab_size
    b = min(ecfg.max_num_seqs, t)
    width = (
        2 * cfg.hidden_size
        + (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim  # q/k/v, attention output
        + 3 * cfg.intermediate_size  # gate/up, their product
    )
    batched = "--max-num-batched-tokens (max_num_batched_tokens=)"
    return [
        MemoryNeed(t * v * LOGIT_BYTES, f"max_num_batched_tokens {t} x vocab {v}", "logits a step", batched),
        MemoryNeed(
            b * v * LOGIT_BYTES,
            f"min(max_num_seqs, max_num_batched_tokens) {b} x vocab {v}",
            "sampled logits",
            "--max-num-seqs (max_num_seqs=)",
        ),
        MemoryNeed(
            t * width * 4, f"max_num_batched_tokens {t} x {width} values a token", "activations", batched
        ),
        MemoryNeed(
            2 * max_len * (cfg.head_dim // 2) * rope_itemsize,
            f"context {max_len} x head_dim {cfg.head_dim}",
            "RoPE tables",
            "--max-model-len (max_model_len=)",
        ),
    ]


def check_needs(needs: list[MemoryNeed], have: int, where: str) -> None:
    """Refuse, in one line naming the knob of the largest need, buffers whose total passes `have` bytes (`where`:
    what holds them, e.g. "this host beside the weights and the KV cache")."""
    total = sum(n.nbytes for n in needs)
    if total <= have:
        return
    top = max(needs, key=lambda n: n.nbytes)
    gib = lambda b: f"{b / 2**30:.1f} GiB" if abs(b) >= 2**30 else f"{b / 2**20:.1f} MiB"  # noqa: E731
    what = f"{top.sized} needs {gib(top.nbytes)} of {top.what}"
    if top.nbytes <= have:  # none alone too large: say the total too
        what += f" ({gib(total)} with the other buffers the engine's limits size)"
    raise InvalidRequestError(f"{what}; {where} has {gib(max(have, 0))}: lower {top.knob}")


def check_buffers(
    ops: Ops, cfg: ModelConfig, ecfg: EngineConfig, max_len: int, layout: KVLayout | None, held: int, where: str,
    share: int = 1,
) -> int:  # fmt: skip
    """`ops.buffer_needs` against the backend's memory beside `held` bytes (weights and KV pools), before any of them
    is allocated; `share`: processes that hold as much each from the same memory (tensor-parallel ranks on one host).
    Returns what is left of that memory beside them all."""
    needs = ops.buffer_needs(cfg, ecfg, max_len, layout)
    have = ops.memory_bytes() // share - held
    check_needs(needs, have, where)
    return have - sum(n.nbytes for n in needs)


def host_left(memory_is_host: bool, left: int, shm: int = 0) -> tuple[int, str]:
    """(bytes, what has them) of the host's memory for arrays an engine returns to it (scored logits): on a backend
    that computes on the host what `check_buffers` left (summed over ranks that share it), beside a device the host's
    whole memory; less `shm` bytes of shared-memory blocks (tmpfs: the host's memory too)."""
    have = (left if memory_is_host else host_memory_bytes()) - shm
    beside = ["the weights", "the KV cache", "a step's buffers"] if memory_is_host else []
    beside += ["the shared-memory blocks"] if shm else []
    if len(beside) > 1:
        beside[-2:] = [f"{beside[-2]} and {beside[-1]}"]
    return have, f"this host beside {', '.join(beside)}" if beside else "this host"
