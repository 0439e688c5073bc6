"""FSDP2 (``torch.distributed.fsdp.fully_shard``): which parameter a graph input is.

Outside the forward, FSDP2's parameters are ``DTensor`` shards (what ``named_parameters()``,
the optimizer and ``state_dict()`` see). Inside it, before a unit's forward, FSDP2 all-gathers
the unit's shards into plain unsharded ``nn.Parameter``s and swaps them into the modules; its
hooks are hidden from TorchDynamo, so a captured graph takes those unsharded tensors as its
inputs, and ``named_parameters()`` called there names them. Each unsharded tensor is made once
per parameter and kept (only its storage is freed between uses), so one id per parameter is
stable: :class:`ParamIds` maps it to the shard's id, the one the rest of the library keys on
(the coverage check's hooks, which FSDP2 calls on the shards after its reduce-scatter).

The gradient a rewritten graph produces for an unsharded tensor is reduce-scattered by FSDP2
as it is (averaged over the ranks, as DDP does), so with ``distributed=True`` (T's batch
statistic all-reduced) a step is one process's on the joined batch.

FSDP1 (``FullyShardedDataParallel``: flat parameters), tensor parallelism (DTensor parameters
that FSDP2 does not manage) and pipeline parallelism (a ``torch.distributed.pipelining``
schedule running the model) are refused by name.
"""

from __future__ import annotations

import sys

from torch import nn

from .errors import SVGDError


def fsdp2_params(model: nn.Module) -> list:
    """FSDP2's per-parameter records (``FSDPParam``) of every unit in ``model``."""
    out = []
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if get_state is None or not callable(get_state):
            continue
        for group in getattr(get_state(), "_fsdp_param_groups", None) or []:
            out += list(group.fsdp_params)
    return out


def is_fsdp2(model: nn.Module) -> bool:
    return any(_is_fsdp2_module(m) for m in model.modules())


def _is_fsdp2_module(module: nn.Module) -> bool:
    return any(c.__name__ == "FSDPModule" for c in type(module).__mro__)


class ParamIds:
    """``canonical(id)``: the id of the parameter ``named_parameters()`` shows outside the forward
    for a tensor a graph (or a hook) received; itself for a model without FSDP2."""

    def __init__(self, model: nn.Module) -> None:
        self.sharded = is_fsdp2(model)
        self._model = model
        self._alias: dict[int, int] = {}
        self._known: set[int] = set()

    def canonical(self, pid: int) -> int:
        if not self.sharded:
            return pid
        if pid not in self._alias and pid not in self._known:
            self.refresh()
        return self._alias.get(pid, pid)

    def refresh(self) -> None:
        """Re-read FSDP2's records: an unsharded tensor exists from its unit's first all-gather on.
        The model's other parameters (none of FSDP2's) are noted too, so that looking them up does
        not walk the model again at every backward."""
        for fp in fsdp2_params(self._model):
            sharded = id(fp.sharded_param)
            self._known.add(sharded)
            unsharded = getattr(fp, "_unsharded_param", None)
            if unsharded is not None:
                self._alias[id(unsharded)] = sharded
        self._known.update(id(p) for p in self._model.parameters())


def refuse_unsupported(model: nn.Module) -> None:
    """FSDP1 and tensor parallelism: refused by name (FSDP2 is supported, see the module docstring)."""
    flat = [name or "<root>" for name, m in model.named_modules()
            if any(c.__name__ == "FullyShardedDataParallel" for c in type(m).__mro__)]
    if flat:
        raise SVGDError(
            f"svgd_fx: FSDP1 (FullyShardedDataParallel) is not supported (wrapped modules: {flat[:4]}): it "
            "flattens the parameters into one buffer per unit, so the pass cannot see which parameter enters "
            "which σ' node. Use FSDP2 (torch.distributed.fsdp.fully_shard), which keeps one tensor per "
            "parameter, with distributed=True; or DDP with distributed=True.")
    managed = {id(fp.sharded_param) for fp in fsdp2_params(model)}
    parallel = [n for n, p in model.named_parameters() if id(p) not in managed
                and "DTensor" in (type(p).__name__, type(getattr(p, "data", None)).__name__)]
    if parallel:
        raise SVGDError(
            f"svgd_fx: tensor-parallel parameters (DTensors not managed by FSDP2: {parallel[:4]}) are not "
            "supported: a σ' node's output, and so T's r, would be split across ranks. Shard with FSDP2 "
            "(fully_shard) or replicate with DDP, with distributed=True.")


def refuse_pipelining() -> None:
    """At a graph's compile: a ``torch.distributed.pipelining`` schedule on the stack is refused (it
    runs the micro-batches of a step as separate backward passes: r would be updated from each)."""
    frame = sys._getframe(1)
    while frame is not None:
        if "torch/distributed/pipelining/" in frame.f_code.co_filename.replace("\\", "/"):
            raise SVGDError(
                "svgd_fx: pipeline parallelism (torch.distributed.pipelining) is not supported: its schedule "
                "runs the micro-batches of one step as separate backward passes, and each would update r from "
                "its own micro-batch. Use DDP or FSDP2 (fully_shard) with distributed=True.")
        frame = frame.f_back


def with_saved_state(state_dict: dict, checkpoint_id=None, storage_reader=None) -> dict:
    """``state_dict`` plus an empty tensor for every SVGD state entry (``...svgd_state.*``) that a
    ``torch.distributed.checkpoint`` (DCP) checkpoint holds and ``state_dict`` lacks, so that
    ``dcp.load`` fills them too: a fresh model has no state tensors before its first forward
    (their shapes come from the graph). Load the result with ``load_state_dict`` as usual::

        sd = svgd_fx.with_saved_state(model_t.state_dict(), checkpoint_id=path)
        torch.distributed.checkpoint.load(sd, checkpoint_id=path)
        model_t.load_state_dict(sd)
    """
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = storage_reader if storage_reader is not None else FileSystemReader(checkpoint_id)
    saved = reader.read_metadata().state_dict_metadata
    out = dict(state_dict)
    for key, meta in saved.items():
        if ".svgd_state." in f".{key}" and key not in out and isinstance(meta, TensorStorageMetadata):
            out[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    return out
