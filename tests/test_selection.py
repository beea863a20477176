"""Selection without the winner's curse: three disjoint parts of the training split, the epoch rule on the finalists'
validation split, the finalists' ranking with its margin, and what the report and terminal say of it."""
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from prunetune import build_model, finetune, load_config, load_data
from prunetune.search.finalize import ranked
from prunetune.search.report import finals_lines, finals_table, ranking_note, recommendation
from prunetune.search.runfiles import FinetuneInfo
from prunetune.workers import finetune as finetune_module
from prunetune.workers.data import DataError, heldout_split
from prunetune.workers.evaluator import evaluation_data
from prunetune.workers.finetune import FinetuneOptions, load_finetuned
from prunetune.workers.settings import EvaluationSettings
from prunetune.workers.selection import kept_epoch, margin, standard_error, tied
from prunetune.workers.splits import split_training, splits_of
from tests.summaries import final_model, summary


def test_the_three_parts_are_disjoint_cover_the_training_split_and_keep_the_search_split():
    s = split_training(1438, 300, None, seed=0, keep=128)  # digits: 1,438 training images
    assert (len(s.heldout), len(s.validation), len(s.rest)) == (300, 288, 850)  # a fifth for validation
    parts = [set(s.heldout), set(s.validation), set(s.rest)]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert parts[0] | parts[1] | parts[2] == set(range(1438))
    assert np.array_equal(s.heldout, heldout_split(1438, 300, 0)[0])  # the search scores what it scored before
    assert not np.array_equal(s.validation, split_training(1438, 300, None, seed=1).validation)
    assert len(split_training(50_000, 5000, None, 0).validation) == 5000  # capped
    assert len(split_training(1438, 300, 100, 0).validation) == 100  # as configured
    assert len(split_training(1438, 1200, None, 0, keep=128).validation) == 110  # what the others leave


@pytest.mark.parametrize("heldout, validation, message", [
    (1310, None, "evaluation.heldout_size: must be in [1, 1309] for this training set of 1438 images (at least 128 "
                 "stay for calibration and fine-tuning and 1 for the finalists' validation), got 1310"),
    (300, 1100, "evaluation.validation_size: must be in [1, 1010] for this training set of 1438 images with "
                "evaluation.heldout_size=300 (at least 128 stay for calibration and fine-tuning), got 1100"),
])
def test_splits_that_do_not_fit_are_refused_naming_the_key(heldout, validation, message):
    with pytest.raises(DataError) as e:
        split_training(1438, heldout, validation, 0, keep=128)
    assert str(e.value) == message


def test_the_evaluation_data_calibrates_on_the_rest_and_hands_the_validation_split_to_the_finalists():
    cfg = EvaluationSettings(calibration_batches=2, batch_size=64)
    data = load_data("digits")
    found, s = evaluation_data(data, cfg), splits_of(len(data.train), cfg)
    assert np.array_equal(found.validation_indices, s.validation) and np.array_equal(found.heldout_indices, s.heldout)
    assert set(found.calibration_indices) <= set(s.rest) and set(found.rest_indices) == set(s.rest)
    assert len(found.heldout_x) == 300 and len(found.validation_indices) == 288


def test_the_margin_is_binomial_for_accuracy_and_never_under_one_image():
    assert standard_error(0.99, 288) == pytest.approx(0.005863, abs=1e-6)
    assert margin("accuracy", 0.99, 288) == pytest.approx(1.96 * 0.005863, abs=1e-5)  # 1.15 points, 3.3 images
    assert margin("accuracy", 1.0, 288) == 1 / 288  # no error at 100%: one image still
    assert margin("miou", 0.6, 300) == pytest.approx(0.002) and margin("loss", -0.3, 100) == pytest.approx(0.003)
    assert tied(0.99, 0.99 - 3 / 288, "accuracy", 288) and not tied(0.99, 0.99 - 4 / 288, "accuracy", 288)


@pytest.mark.parametrize("figures, higher, kept", [
    ([0.990, 0.980, 0.986], True, 2),  # epoch 0 better within the margin: the best fine-tuned epoch is kept
    ([0.990, 0.986, 0.986], True, 2),  # a tie between fine-tuned epochs: the later
    ([0.990, 0.950, 0.970], True, 0),  # epoch 0 better beyond the margin: kept (and flagged)
    ([0.950, 0.990, 0.960], True, 1),
    ([0.990], True, 0),  # nothing fine-tuned
    ([0.300, 0.3005, 0.400], False, 1),  # a loss: lower is better, margin 0.3 / 300
    ([0.300, 0.310, 0.400], False, 0),
])
def test_the_epoch_rule(figures, higher, kept):
    metric = "accuracy" if higher else "loss"
    assert kept_epoch(figures, metric, 300, higher) == kept


def _scripted(monkeypatch, vals):
    """finetune's figures replaced by `vals` (validation, epoch 0 first); test figures 0.5 + epoch / 100."""
    figures = iter(vals)
    epoch = iter(range(len(vals)))
    monkeypatch.setattr(finetune_module, "_evaluate", lambda *a, **k: {"test_accuracy": 0.5 + next(epoch) / 100,
                                                                         "test_loss": 1.0,
                                                                         "val_accuracy": next(figures),
                                                                         "val_loss": 1.0})


@pytest.mark.parametrize("vals, kept", [([0.99, 0.98], 1), ([0.99, 0.95], 0)])
def test_finetune_keeps_the_weights_of_the_epoch_the_rule_keeps_and_flags_epoch_0(monkeypatch, tmp_path, vals, kept):
    data, cfg = load_data("digits"), load_config(None, ["finetune.epochs=1", "finetune.batch_size=64"])
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, 1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    _scripted(monkeypatch, vals)
    log, ckpt = io.StringIO(), str(tmp_path / "ft.pt")
    result = finetune(model, data, cfg.finetune.settings(), FinetuneOptions(
        train_indices=np.arange(128), val_indices=np.arange(300), checkpoint_path=ckpt, log=log))
    assert result["best_epoch"] == kept and result["best_val_accuracy"] == vals[kept]
    assert result["best_test_accuracy"] == 0.5 + kept / 100 and result["start_val_accuracy"] == vals[0]
    same = all(torch.equal(start[k], v) for k, v in model.state_dict().items())
    assert same == (kept == 0)  # the model in memory is the kept epoch's
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), load_finetuned(ckpt).values()))
    line = log.getvalue().splitlines()[-1]
    if kept:
        assert line == "fine-tuning: kept epoch 1 (val_acc 0.9800, epoch 0 0.9900)"
    else:
        assert line == ("fine-tuning: kept epoch 0, NOT fine-tuned: val_acc 0.9900 before fine-tuning beats the best "
                        "fine-tuned epoch 1 (0.9500) by more than the margin 0.0113 on 300 validation images")


def _outcome(index: int, val: float, epoch: int, flops: int, score: float = 0.9, latency_ms: float | None = None):
    candidate = SimpleNamespace(index=index, flops=flops, score=score, latency_predicted_ms=latency_ms)
    return candidate, index, {"best_val_accuracy": val, "best_epoch": epoch}, None


def test_finalists_tied_with_the_best_lead_fine_tuned_first_then_fewer_flops():
    outcomes = [_outcome(1, 0.990, 0, 500), _outcome(2, 0.986, 3, 510), _outcome(3, 0.983, 5, 490),
                _outcome(4, 0.950, 5, 400)]
    order, lead = ranked(outcomes, "accuracy", 288)
    assert [o[0].index for o in order] == [3, 2, 1, 4] and lead == 3  # 3 images apart at most: tied
    order, lead = ranked(outcomes, "accuracy", 5000)  # a larger split tells them apart
    assert [o[0].index for o in order] == [1, 2, 3, 4] and lead == 1


def test_under_a_latency_budget_tied_finalists_lead_by_predicted_latency_not_flops():
    """A latency run's finalists tied on validation: the faster by the table leads, though it has more FLOPs. (The
    OpenVINO run of the latency example recommended 54.2% of the FLOPs at 64.3% of the base's latency predicted,
    65.4% timed, over the one at 56.7% of the FLOPs, 62.7% predicted, 62.5% timed: the band was 55-65%.)"""
    outcomes = [_outcome(7, 0.9931, 5, 542, latency_ms=0.774), _outcome(0, 0.9931, 5, 567, latency_ms=0.756)]
    assert [o[0].index for o in ranked(outcomes, "accuracy", 288, constraint="latency")[0]] == [0, 7]
    assert [o[0].index for o in ranked(outcomes, "accuracy", 288)[0]] == [7, 0]  # a FLOPs budget: fewer FLOPs
    unpredicted = [_outcome(1, 0.99, 5, 600), _outcome(2, 0.99, 5, 500)]
    assert [o[0].index for o in ranked(unpredicted, "accuracy", 288, constraint="latency")[0]] == [2, 1]


def test_finalists_timed_over_a_latency_budget_follow_those_within_it():
    outcomes = [_outcome(1, 0.99, 5, 500), _outcome(2, 0.98, 5, 400), _outcome(3, 0.97, 5, 300)]
    order, lead = ranked(outcomes, "accuracy", 5000, over=frozenset({1}))
    assert [o[0].index for o in order] == [2, 3, 1] and lead == 1  # the best on validation was timed over
    order, lead = ranked(outcomes, "accuracy", 5000, over=frozenset({1, 2, 3}))
    assert [o[0].index for o in order] == [1, 2, 3] and lead == 1  # every one over: validation decides


def test_a_final_model_is_over_a_latency_budget_when_timed_over_its_band_or_a_latency_limit():
    from prunetune.search.finalize import over_latency_budget
    from prunetune.search.runfiles import Timings

    def timed(ms):
        return Timings(latency_ms_batch1=ms, latency_iqr_ms=0.0, throughput_batch=32, latency_ms_throughput=ms,
                       images_per_s=1.0, latency_ms_budget_batch=ms)

    base, finals = timed(1.0), [timed(0.66), timed(0.64), timed(0.4)]
    band = load_config(None, ["search.constraint=latency", "search.target=0.6", "search.tolerance=0.05"])
    assert over_latency_budget(band, base, finals) == [True, False, False]
    assert over_latency_budget(load_config(None), base, finals) == [False, False, False]  # a FLOPs budget
    limit = load_config(None, ["search.limits={latency: 0.5}"])
    assert over_latency_budget(limit, base, finals) == [True, True, False]
    absolute = load_config(None, ["search.limits={latency: 0.65ms}"])
    assert over_latency_budget(absolute, base, finals) == [True, False, False]
    untimed = Timings(**{**vars(finals[0]), "latency_ms_budget_batch": None})
    assert over_latency_budget(band, base, [untimed]) == [False]


def test_a_recommended_model_timed_over_its_latency_budget_says_so():
    over = summary([final_model(over_latency_budget=True)])
    assert "; timed over the latency budget, as every finalist was" in recommendation(over)
    assert finals_lines(over)[0].endswith("(timed over the latency budget)")
    within = summary([final_model()])
    assert "over the latency budget" not in recommendation(within) + finals_lines(within)[0]


def _summary(kept_epochs: list[int], tied_with_best: list[bool]):
    finals = [final_model(rank=i, candidate=10 + i, adaptive_bn_score=0.98, val=0.99 - i / 1000, val_margin=0.0115,
                          test=0.985, epochs=5, kept_epoch=k, fine_tuned=k > 0, tied_with_best=t)
              for i, (k, t) in enumerate(zip(kept_epochs, tied_with_best), 1)]
    return summary(finals, finetune=FinetuneInfo(epochs=5, scheduler="fifo"))


def test_the_report_and_terminal_say_each_models_epoch_flag_one_not_fine_tuned_and_show_ties():
    summary = _summary([5, 3, 0], [True, True, False])
    assert "(candidate 11, fine-tuned, epoch 5): test accuracy 98.50%" in recommendation(summary)
    table = finals_table(summary).splitlines()
    assert "| kept epoch |" in table[0]
    assert table[3].startswith("| rank1.pt (candidate 11) | 98.90% ± 1.15 | 98.50% | -0.50 pts | 5 | 5 |")
    assert table[5].startswith("| rank3.pt (candidate 13) | 98.70% ± 1.15 | 98.50% | -0.50 pts | "
                               "0 (**NOT fine-tuned**) |")
    note = ranking_note(summary)
    assert "validation split: 288 training images" in note
    assert "rank1.pt, rank2.pt are not distinguishable from the best" in note
    assert "**Not fine-tuned** (epoch 0 kept): rank3.pt." in note
    lines = finals_lines(summary)
    assert lines[0] == "  rank1.pt (candidate 11, fine-tuned, epoch 5): val acc 98.90% ± 1.15 test acc 98.50% (tied " \
                       "with the best)"
    assert lines[2] == ("  rank3.pt (candidate 13, NOT fine-tuned: epoch 0, the pruned network before fine-tuning): "
                        "val acc 98.70% ± 1.15 test acc 98.50%")
    flagged = _summary([0], [True])
    assert "(candidate 11, NOT fine-tuned: epoch 0, the pruned network before fine-tuning)" in recommendation(flagged)
    assert "not distinguishable" not in ranking_note(flagged)
