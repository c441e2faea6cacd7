"""Output files: keep the base's shards (header bytes reused when nothing changes) or re-shard by size. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from streammerge.checkpoint import Checkpoint, output_name
from streammerge.formats.refs import TensorRef
from streammerge.formats.safetensors import encode_header
from streammerge.plan.types import PlanOptions, ShardPlan, TensorTask


def layout(ckpt: Checkpoint, tasks: Mapping[str, TensorTask], added: Mapping[str, TensorRef], drop: set[str],
            options: PlanOptions) -> tuple[ShardPlan, ...]:
    if options.max_shard_size is not None:
        return _reshard(ckpt, tasks, options.max_shard_size)
    shards = []
    last = len(ckpt.shards) - 1
    for i, (header, filename) in enumerate(zip(ckpt.shards, ckpt.shard_names, strict=True)):
        own = [tasks[t.name] for t in header.tensors if t.name in tasks]
        extra = [tasks[n] for n in added] if i == last else []
        filename = output_name(filename)
        unchanged = header.raw and not extra and len(own) == len(header.tensors) and all(
            t.dtype == info.dtype and t.shape == info.shape for t, info in zip(own, header.tensors, strict=False)
        )
        if unchanged:
            # A merge changes no name, shape or dtype, so the base header bytes are the output header.
            shards.append(ShardPlan(filename, header.raw, tuple(own)))
        else:
            shards.append(_encoded_shard(filename, own + extra, dict(header.metadata)))
    return tuple(shards)


def _encoded_shard(filename: str, tasks: Sequence[TensorTask], metadata: Mapping[str, str]) -> ShardPlan:
    raw, infos = encode_header(((t.name, t.dtype, t.shape) for t in tasks), metadata or {"format": "pt"})
    by_name = {t.name: t for t in tasks}
    return ShardPlan(filename, raw, tuple(by_name[i.name] for i in infos))


def _reshard(ckpt: Checkpoint, tasks: Mapping[str, TensorTask], max_bytes: int) -> tuple[ShardPlan, ...]:
    """Greedy packing in base order, like transformers' ``split_torch_state_dict_into_shards``."""
    groups: list[list[TensorTask]] = [[]]
    size = 0
    for task in tasks.values():
        if groups[-1] and size + task.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(task)
        size += task.nbytes
    n = len(groups)
    meta = dict(ckpt.shards[0].metadata) if ckpt.shards else {}
    if n == 1:
        return (_encoded_shard("model.safetensors", groups[0], meta),)
    return tuple(_encoded_shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g, meta) for i, g in enumerate(groups))
