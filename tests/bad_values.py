"""Config values prunetune refuses: the overrides, the key the one-line message starts with, and a fragment of it.
tests/test_config.py checks each row; the docs' generated error catalog (docs/gen.py) shows each row's message as
load_config prints it."""

BAD_VALUES = [
    (["search.target=1.5"], "search.target", "outside the allowed range"),
    (["search.flops_target=0.4"], "search.flops_target", "renamed to search.target"),
    (["search.constraint=memory"], "search.constraint", "allowed: flops, params, latency"),
    (["search.algorithm=magic"], "search.algorithm", "allowed: random"),
    (["search.tolerance=0"], "search.tolerance", "outside the allowed range"),
    (["search.max_ratio=1"], "search.max_ratio", "outside the allowed range"),
    (["search.criterion=l3"], "search.criterion", "allowed: l1, l2, bn_scale, random"),
    (["search.num_candidates=many"], "search.num_candidates", "not a valid int"),
    (["search.colour=blue"], "search.colour", "unknown key"),
    (["evaluation.bn_mode=magic"], "evaluation.bn_mode", "allowed: cumulative, ema, none"),
    (["search.tolerance=0.6"], "search.tolerance", "below search.target"),
    (["data.name=cifar10"], "data.path", "needs a path"),
    (["search.num_candidates=1000000000"], "search.num_candidates",
     "1000000000 is outside the allowed range [1, 1000000]"),
    (["search.population=1000000000"], "search.population", "outside the allowed range [2, 1000000]"),
    (["search.top_k=5000", "search.num_candidates=10000"], "search.top_k", "outside the allowed range [1, 1000]"),
    (["data.name=synthetic", "data.train_size=100000000000"], "data.train_size",
     "outside the allowed range [2, 10000000]"),
    (["finetune.lr=1e400"], "finetune.lr", "1e400 is not a finite number; allowed: (0, inf)"),
    (["model.pretrain_lr=1e400"], "model.pretrain_lr", "1e400 is not a finite number"),
    (["finetune.lr=.inf"], "finetune.lr", ".inf is not a finite number"),
    (["search.time_budget_s=.inf"], "search.time_budget_s", "not a finite number"),
    (["finetune.momentum=nan"], "finetune.momentum", "nan is not a finite number; allowed: [0, 1)"),
]
