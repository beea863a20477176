"""cluster.yaml is a real Ray cluster launcher config that Ray's validator accepts."""
import os

import jsonschema
import pytest
import yaml

from prunetune.search.cluster import validate_cluster_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cluster_yaml_passes_rays_validator():
    config = validate_cluster_config(os.path.join(ROOT, "cluster.yaml"))
    gpu = config["available_node_types"]["worker.gpu"]
    assert config["provider"]["type"] == "aws" and gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] == 0
    assert "CPU" in config["available_node_types"][config["head_node_type"]]["resources"]
    assert any("pip install" in c and "prunetune" in c for c in config["setup_commands"])
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head


def test_the_validator_rejects_a_broken_config(tmp_path):
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        config = yaml.safe_load(f)
    config["available_node_types"]["worker.gpu"]["resources"]["GPU"] = 0.5  # resources must be integers
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(jsonschema.ValidationError):
        validate_cluster_config(str(bad))
