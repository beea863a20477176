"""Pruned model files: a fine-tuned network saved as its state dict plus the record that rebuilds it exactly."""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from prunetune.workers.data import InputContract, Preprocess
from prunetune.workers.files import atomic_write
from prunetune.workers.methods import METHODS
from prunetune.workers.models import ModelError, build_model, read_weights
from prunetune.workers.space import PruningSpace

from .runfiles import BaseCheckpoint, Figures, ModelRecord, model_file, read_model_file
from .store import sha256


def pruned_record(spec: dict, space: PruningSpace, ratios, criterion: str, method: str,
                  base_checkpoint: str, contract: InputContract | None, task: str = "classification") -> ModelRecord:
    """Everything needed to rebuild and use a pruned network: architecture, input shape and contract, what its
    output is for (model.task), strategy, base reference."""
    return ModelRecord(model=spec, input_shape=list(space.input_shape), round_to=space.round_to,
                       input=contract.to_dict() if contract else None, task=task,
                       ignored_layers=space.ignored_layers, granularity=method, ratios=[float(r) for r in ratios],
                       criterion=criterion, kept_units=space.kept_units(ratios), flops=space.flops(ratios),
                       params=space.params(ratios), base_flops=space.base_flops,
                       base_checkpoint=BaseCheckpoint(path=base_checkpoint, sha256=sha256(base_checkpoint)
                                                      if os.path.isfile(base_checkpoint) else None))


def save_pruned(path: str, model: nn.Module, record: ModelRecord, figures: Figures | None = None) -> None:
    """Save a pruned model as the state dict its method packs (unstructured: masked weights as bit masks plus
    their non-zero values, so the file's size is the sparse size) plus the record that rebuilds its architecture,
    and its figures."""
    obj = model_file(METHODS[record.granularity].pack(model), record, figures)
    atomic_write(path, lambda tmp: torch.save(obj, tmp), durable=True)


def rebuild_pruned(record: ModelRecord) -> nn.Module:
    """The pruned architecture of a record, with placeholder weights (load its state dict next)."""
    spec = record.model
    base = build_model(spec["name"], spec["num_classes"], spec["in_channels"], spec["kwargs"])
    if record.granularity not in METHODS:
        raise ModelError(f"model file: pruned by method {record.granularity!r}, which this prunetune does not "
                         f"know (it knows {', '.join(METHODS)})")
    method = METHODS[record.granularity]
    space = method.space(base, torch.zeros(1, *record.input_shape), record.round_to, record.ignored_layers)
    return method.plan(base, space, "l1", 0).apply(record.ratios)


def load_pruned(path: str, raw_input: bool = True) -> tuple[nn.Module, ModelRecord, Figures | None]:
    """Load a model saved by save_pruned (weights_only): (model, record, figures; None if it was saved without).

    raw_input: the model starts with its input contract's preprocessing (record.input), so it takes raw pixel
    values, as the exported models do; False gives the bare network, which takes normalised input.
    """
    obj = read_weights(path, "model file")
    record, figures = read_model_file(obj, path)
    model = rebuild_pruned(record)
    model.load_state_dict(METHODS[record.granularity].unpack(obj["state_dict"]))
    if raw_input and record.input:
        model = nn.Sequential(Preprocess(record.input), model)
    return model.eval(), record, figures
