"""Saved models: the trained base model (given or trained and cached) and pruned models that rebuild exactly."""
from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
import torch.nn as nn

from workers import PrunePlan, build_model, finetune
from workers.models import read_state_dict

from .config import Config, expand
from .space import PruningSpace
from .store import sha256


def save_state(obj: dict, path: str) -> None:
    """torch.save to a temporary name, then rename (a kill never leaves a torn file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def model_spec(cfg: Config, num_classes: int, in_channels: int) -> dict:
    """What build_model needs to rebuild the base architecture."""
    return {"name": cfg.model.name, "num_classes": num_classes, "in_channels": in_channels,
            "kwargs": dict(cfg.model.kwargs)}


def base_model(cfg: Config, data, log=None) -> tuple[nn.Module, str]:
    """The trained base model and its checkpoint path: the configured one, or one trained here and cached."""
    log = log or sys.stderr
    spec = model_spec(cfg, data.num_classes, data.input_shape[0])
    torch.manual_seed(cfg.finetune.seed)  # the initial weights of a base model trained here: same seed, same model
    model = build_model(**spec, checkpoint=cfg.model.checkpoint)
    if cfg.model.checkpoint:
        return model.eval(), os.path.abspath(cfg.model.checkpoint)
    recipe = {"model": spec, "data": cfg.data.name, "data_path": cfg.data.path, "image_size": cfg.data.image_size,
              "epochs": cfg.model.pretrain_epochs, "finetune": cfg.finetune.__dict__}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = os.path.join(expand(cfg.output.cache_dir), f"base-{cfg.model.name.replace(':', '_')}-{key}.pt")
    if os.path.isfile(path):
        model.load_state_dict(read_state_dict(path))
        print(f"base model: loaded cached {path}", file=log)
        return model.eval(), path
    print(f"base model: no model.checkpoint given; training {cfg.model.name} for {cfg.model.pretrain_epochs} "
          f"epochs (cached at {path})", file=log)
    result = finetune(model, data, cfg.finetune, "cuda" if torch.cuda.is_available() else "cpu",
                      epochs=cfg.model.pretrain_epochs, log=log)
    print(f"base model: test accuracy {result['test_accuracy']:.4f}", file=log)
    save_state(model.cpu().state_dict(), path)
    return model.eval(), path


def pruned_record(spec: dict, space: PruningSpace, ratios, criterion: str, base_checkpoint: str) -> dict:
    """Everything needed to rebuild a pruned network: architecture, input shape, strategy, base reference."""
    return {"model": spec, "input_shape": list(space.input_shape), "round_to": space.round_to,
            "ignored_layers": space.ignored_layers, "ratios": [float(r) for r in ratios], "criterion": criterion,
            "kept_channels": space.kept_channels(ratios), "flops": space.flops(ratios),
            "params": space.params(ratios), "base_flops": space.base_flops,
            "base_checkpoint": {"path": base_checkpoint,
                                "sha256": sha256(base_checkpoint) if os.path.isfile(base_checkpoint) else None}}


def save_pruned(path: str, model: nn.Module, record: dict, metrics: dict | None = None) -> None:
    """Save a pruned model as its own state dict plus the record that rebuilds its architecture."""
    save_state({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                "record_json": json.dumps(record), "metrics_json": json.dumps(metrics or {})}, path)


def rebuild_pruned(record: dict) -> nn.Module:
    """The pruned architecture of a record, with placeholder weights (load its state dict next)."""
    spec = record["model"]
    base = build_model(spec["name"], spec["num_classes"], spec["in_channels"], spec["kwargs"])
    space = PruningSpace.from_model(base, torch.zeros(1, *record["input_shape"]), record["round_to"],
                                    record["ignored_layers"])
    return PrunePlan(base, space, "l1").apply(record["ratios"])


def load_pruned(path: str) -> tuple[nn.Module, dict, dict]:
    """Load a model saved by save_pruned (weights_only): (model, record, metrics)."""
    from workers.models import ModelError

    if not os.path.isfile(path):
        raise ModelError(f"model file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        record, metrics = json.loads(obj["record_json"]), json.loads(obj["metrics_json"])
    except Exception as e:
        raise ModelError(f"{path} is not a prunetune model file ({str(e).splitlines()[0]})") from None
    model = rebuild_pruned(record)
    model.load_state_dict(obj["state_dict"])
    return model.eval(), record, metrics
