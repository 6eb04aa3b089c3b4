"""Load a Hugging Face checkpoint into this rank's megatron model; export the model back.

Both run on every rank of the world (megatron's parallel state initialized for the layout the
model was built in) and use mbridge only for what it knows of each architecture: which HF
tensors make a megatron tensor (``_weight_name_mapping_mcore_to_hf``), how they merge
(``_weight_to_mcore_format``: QKV interleaving, gate/up concatenation) and split back
(``_weight_to_hf_format``), and how a merged tensor splits over tensor-parallel ranks.

Load: each rank reads only the HF tensors of its own parameters from the safetensors files
(lazily, one tensor at a time) and keeps its tensor-parallel shard; no communication except
one check that every tensor of the checkpoint was used by some rank.

Export: tensor-parallel shards are gathered over the tensor-parallel group (experts: the
expert-tensor-parallel group); the rank that owns a tensor (tensor-parallel rank 0 of
data-parallel rank 0; for experts, expert-tensor-parallel rank 0 of expert-data-parallel rank
0) converts it to HF names and writes it into its own safetensors file, so no rank holds more
than its share. Rank 0 writes the index and copies the source's config and tokenizer files. The
export is written to a staging directory renamed into place at the end.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_patch.distributed import decided_on_rank0
from megatron_patch.hf.architectures import SAFETENSORS_INDEX, HFCheckpoint, HFImportError
from megatron_patch.hf.names import global_names, is_expert, transferable, unwrap

# Files of a checkpoint directory that hold weights (everything else is copied on export).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".msgpack", ".h5")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                       "F64": torch.float64}


class _TensorReader:
    """Reads single tensors from a checkpoint's safetensors files, opening each file once."""

    def __init__(self, checkpoint: HFCheckpoint):
        self.checkpoint = checkpoint
        self.handles: dict[Path, object] = {}
        self.used: set[str] = set()

    def _handle(self, name: str):
        from safetensors import safe_open

        if name not in self.checkpoint.weight_files:
            raise HFImportError(
                f"{self.checkpoint.path}: tensor {name!r} is missing from the checkpoint; it "
                f"does not match its config ({self.checkpoint.architecture.name}).")
        file = self.checkpoint.weight_files[name]
        if file not in self.handles:
            self.handles[file] = safe_open(file, framework="pt")
        return self.handles[file]

    def read(self, name: str) -> torch.Tensor:
        self.used.add(name)
        return self._handle(name).get_tensor(name)

    def dtype(self, name: str) -> Optional[torch.dtype]:
        if name not in self.checkpoint.weight_files:
            return None
        return _SAFETENSORS_DTYPES.get(self._handle(name).get_slice(name).get_dtype())


def _hf_names(bridge, checkpoint: HFCheckpoint, name: str) -> list[str]:
    if name == "output_layer.weight" and checkpoint.tied_embeddings:
        return ["model.embed_tokens.weight"]
    return bridge._weight_name_mapping_mcore_to_hf(name)


def _parallel_group(name: str):
    """(group, size, rank) over which ``name`` is tensor-parallel split."""
    if is_expert(name):
        return (parallel_state.get_expert_tensor_parallel_group(),
                parallel_state.get_expert_tensor_parallel_world_size(),
                parallel_state.get_expert_tensor_parallel_rank())
    return (parallel_state.get_tensor_model_parallel_group(),
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank())


def _is_split(tensor: torch.Tensor) -> bool:
    return bool(getattr(tensor, "tensor_model_parallel", False))


def _bridge_for(checkpoint: HFCheckpoint, model: torch.nn.Module, size: int):
    bridge = checkpoint.bridge()
    bridge.config = model.config
    # The merge/split helpers read the split size of the tensor at hand from mpu.
    bridge.mpu = types.SimpleNamespace(tp_size=size, etp_size=size)
    return bridge


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, checkpoint: HFCheckpoint) -> None:
    """Copy ``checkpoint``'s weights into this rank's ``model`` (a GPTModel, maybe wrapped).

    Collective over the default group (the final completeness check).

    Raises:
        HFImportError: a tensor missing from the checkpoint, a shape that does not match the
            model built from its config, or checkpoint tensors that no parameter used.
    """
    model = unwrap(model)
    reader = _TensorReader(checkpoint)
    names = global_names(model)
    for local, tensor in transferable(model):
        name = names[local]
        _, size, rank = _parallel_group(name)
        bridge = _bridge_for(checkpoint, model, size)
        hf_names = _hf_names(bridge, checkpoint, name)
        full = bridge._weight_to_mcore_format(name, [reader.read(n) for n in hf_names])
        if _is_split(tensor) and size > 1:
            full = list(bridge._weight_split_across_tp(name, full, tensor, size))[rank]
        if full.shape != tensor.shape:
            raise HFImportError(
                f"{checkpoint.path}: {', '.join(hf_names)} give shape {tuple(full.shape)} for "
                f"{name}, the model built from its config has {tuple(tensor.shape)}")
        tensor.copy_(full.to(tensor.dtype))
    used: list[Optional[set]] = [None] * dist.get_world_size()
    dist.all_gather_object(used, reader.used)
    unused = set(checkpoint.weight_files) - set().union(*used)
    if unused:
        raise HFImportError(
            f"{checkpoint.path}: {len(unused)} checkpoint tensors have no place in the model "
            f"built from its config, e.g. {sorted(unused)[:3]}")


def _owns(name: str) -> bool:
    if is_expert(name):
        return (parallel_state.get_expert_tensor_parallel_rank() == 0
                and parallel_state.get_expert_data_parallel_rank() == 0)
    return (parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)


def _gathered(tensor: torch.Tensor, name: str, checkpoint: HFCheckpoint,
              model: torch.nn.Module) -> torch.Tensor:
    group, size, _ = _parallel_group(name)
    if not _is_split(tensor) or size == 1:
        return tensor.detach()
    shards = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(shards, tensor.detach().contiguous(), group=group)
    return _bridge_for(checkpoint, model, size)._weight_merge_across_tp(name, shards, tensor)


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise HFImportError(
            f"--hf-export {out_dir}: exists and is not an empty directory; export into a new "
            "directory (nothing there is overwritten)")


@torch.no_grad()
def export_hf_weights(model: torch.nn.Module, checkpoint: HFCheckpoint,
                      out_dir: str | Path) -> Path:
    """Write ``model`` as a Hugging Face checkpoint of ``checkpoint``'s architecture.

    Collective over the default group. Tensors keep the dtype of the source checkpoint's
    tensor of the same name (the model's dtype for names it lacks); config, generation config
    and tokenizer files are copied from the source directory.

    Returns:
        ``out_dir``, complete (written under ``.<name>.partial`` and renamed at the end).

    Raises:
        HFImportError: ``out_dir`` exists and is not empty (nothing is written).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    decided_on_rank0(lambda: _check_target(out_dir), HFImportError)
    staging = out_dir.parent / f".{out_dir.name}.partial"
    model = unwrap(model)
    reader = _TensorReader(checkpoint)
    names = global_names(model)
    tensors: dict[str, torch.Tensor] = {}
    for local, tensor in transferable(model):
        name = names[local]
        if name == "output_layer.weight" and checkpoint.tied_embeddings:
            continue
        full = _gathered(tensor, name, checkpoint, model)
        if not _owns(name):
            continue
        bridge = _bridge_for(checkpoint, model, 1)
        for hf_name, value in zip(*bridge._weight_to_hf_format(name, full)):
            dtype = reader.dtype(hf_name) or value.dtype
            tensors[hf_name] = value.to(device="cpu", dtype=dtype).contiguous().clone()
    held = (sorted(tensors), sum(t.numel() * t.element_size() for t in tensors.values()))
    owners: list[Optional[tuple[list[str], int]]] = [None] * dist.get_world_size()
    dist.all_gather_object(owners, held)
    writers = [rank for rank, (names_held, _) in enumerate(owners) if names_held]
    files = {rank: f"model-{i + 1:05d}-of-{len(writers):05d}.safetensors"
             for i, rank in enumerate(writers)}
    rank = dist.get_rank()
    if rank == 0:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    dist.barrier()
    if tensors:
        save_file(tensors, str(staging / files[rank]), metadata={"format": "pt"})
    dist.barrier()
    if rank == 0:
        weight_map = {name: files[r] for r in writers for name in owners[r][0]}
        index = {"metadata": {"total_size": sum(size for _, size in owners)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (staging / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for source in checkpoint.path.iterdir():
            if source.is_file() and not source.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(source, staging / source.name)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        staging.rename(out_dir)
    dist.barrier()
    return out_dir
