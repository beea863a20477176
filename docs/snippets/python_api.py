import torch

from prunetune import (CandidateEvaluator, EvaluationSettings, FinetuneSettings, PreflightOptions, StrategySampler,
                       build_model, finetune, load_data, preflight)

torch.manual_seed(0)  # the base model's initial weights
torch.set_num_threads(1)  # float sums in one order: the same numbers on every run
data = load_data("digits")  # ships with scikit-learn
model = build_model("digits_cnn", data.num_classes, in_channels=1)
finetune(model, data, FinetuneSettings(epochs=10, lr=0.05, warmup_epochs=1))  # a trained base (or your own weights)

# The space of channel groups, proved exact on the architecture: FLOPs/params equal fvcore's on pruned copies.
verdict = preflight(model, data.example_input(), PreflightOptions(
    data.num_classes, max_ratio=0.7, first=lambda space: StrategySampler(space, 0.4, 0.02, 0.7).sample(0)))
print(verdict.space.describe())

sampler = StrategySampler(verdict.space, target=0.4, tolerance=0.02, max_ratio=0.7, seed=0)
evaluator = CandidateEvaluator(model, verdict.space, data, EvaluationSettings(), device="cpu")
for i in range(3):  # prune, recalibrate BN, score on the held-out split
    record = evaluator.evaluate(sampler.sample(i), index=i)
    print(f"candidate {i}: {100 * record.flops_ratio:.1f}% of the FLOPs, held-out accuracy {record.accuracy:.3f}")
