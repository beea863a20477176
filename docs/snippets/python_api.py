import torch

from prunetune import CandidateEvaluator, StrategySampler, build_model, finetune, load_config, load_data, preflight
from prunetune.search.config import training_recipe

torch.manual_seed(0)  # the base model's initial weights
torch.set_num_threads(1)  # float sums in one order: the same numbers on every run
cfg = load_config(None, ["search.target=0.4"])
data = load_data("digits")  # ships with scikit-learn
model = build_model("digits_cnn", data.num_classes, in_channels=1)
finetune(model, data, training_recipe(cfg), epochs=10)  # a trained base model (or load your own weights)

# The space of channel groups, proved exact on the architecture: FLOPs/params equal fvcore's on pruned copies.
verdict = preflight(model, data.example_input(), data.num_classes, max_ratio=0.7,
                    first=lambda space: StrategySampler(space, 0.4, 0.02, 0.7).sample(0))
print(verdict.space.describe())

sampler = StrategySampler(verdict.space, target=0.4, tolerance=0.02, max_ratio=0.7, seed=0)
evaluator = CandidateEvaluator(model, verdict.space, data, cfg.evaluation, device="cpu")
for i in range(3):  # prune, recalibrate BN, score on the held-out split
    record = evaluator.evaluate(sampler.sample(i), index=i)
    print(f"candidate {i}: {100 * record.flops_ratio:.1f}% of the FLOPs, held-out accuracy {record.accuracy:.3f}")
