"""The catalog of bad input the tests check and the docs show (docs/gen.py renders both tables at build time).
BAD_VALUES: config values load_config refuses, with the key its one-line message starts with and a fragment of it
(tests/test_config.py). BAD_INPUTS: what the input is, the overrides of a `prunetune run` and a fragment of the one
line it prints before exiting 2 with nothing written (tests/test_reliability.py); `{file}`, `{dir}` and
`{folder:NAME}` stand for a file, a directory and an image folder holding a broken image NAME, made by the test.
BAD_DATA: the same for data sets load_data refuses (tests/test_data.py). BAD_MODELS: models `prunetune run` refuses
before the base model is trained (tests/test_generality.py)."""

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
    (["search.target=[0.7, 0.3]"], "search.target", "not a range [low, high] nor a list of budgets"),
    (["search.target=[0.3, 0.31, 0.7]"], "search.target", "closer than twice search.tolerance"),
    (["search.target=[0.3, 0.7]", "search.front_points=1"], "search.front_points",
     "outside the allowed range [2, 1000]"),
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
    (["model.checkpoint=~no-such-user-x/ck.pt"], "model.checkpoint",
     "no home directory is known for ~no-such-user-x (in '~no-such-user-x/ck.pt'); write the directory out"),
]

BAD_INPUTS = [
    ("a negative seed", ["search.seed=-1"], "search.seed: -1 is outside the allowed range [0, inf)"),
    ("a negative evaluation seed", ["evaluation.seed=-3"], "evaluation.seed: -3 is outside the allowed range [0, inf)"),
    ("momentum 0 with Nesterov", ["finetune.momentum=0"],
     "finetune.momentum: 0 does not go with finetune.nesterov: true"),
    ("model kwargs the factory does not take", ["model.kwargs={foo: 1}"], "model.kwargs: building digits_cnn with"),
    ("a model whose forward fails", ["model.kwargs={width: 0}"],
     "model: the forward pass fails on an input of shape (1, 1, 8, 8)"),
    ("a model factory that returns something else", ["model.name=os:getcwd"],
     "model.name: os:getcwd returned a str, not a torch.nn.Module"),
    ("a data factory that returns something else", ["data.name=os:getloadavg"],
     "data.name: os:getloadavg must return a DataBundle or (train, test, num_classes)"),
    ("a broken JPEG among the images", ["data.name=imagefolder", "data.path={folder:broken.jpg}"],
     "data.path: cannot read image"),
    ("a text file named .png among the images", ["data.name=imagefolder", "data.path={folder:notes.png}"],
     "data.path: cannot read image"),
    ("an output directory that is a file", ["output.dir={file}"], "is a file, not a directory"),
    ("an output directory that cannot be written", ["output.dir=/proc/prunetune-test/run"],
     "output.dir: cannot write to /proc/prunetune-test/run"),
    ("a cache directory that cannot be written", ["output.cache_dir=/proc/prunetune-test"],
     "output.cache_dir: cannot write to /proc/prunetune-test"),
    ("a checkpoint that is a directory", ["model.checkpoint={dir}"],
     "model.checkpoint: {dir} is a directory, not a checkpoint file"),
    ("a held-out set that leaves too few images (64 stay: evaluation.batch_size)", ["evaluation.heldout_size=1400"],
     "evaluation.heldout_size: must be in [1, 1374]"),
    ("a renamed key", ["search.flops_target=0.4"], "search.flops_target: renamed to search.target"),
    ("an unknown model", ["model.name=resnet99"], "model.name: unknown model 'resnet99'; allowed: digits_cnn, "),
    ("a model factory whose module does not import", ["model.name=nosuchpkg.mod:fn"],
     "model.name: cannot import module 'nosuchpkg.mod'"),
    ("an image folder with no images", ["data.name=imagefolder", "data.path={dir}"], "data.path: no images found in"),
    ("a layer to leave unpruned that the model lacks", ["model.ignored_layers=[nothere]"],
     "model.ignored_layers: the model has no layer named 'nothere'"),
    ("a budget the space cannot reach", ["search.target=0.05", "search.tolerance=0.01"],
     "search.target: flops 0.05 +- 0.01 is not reachable with search.max_ratio=0.7; the reachable flops range is ["),
]

BAD_DATA = [
    ("a data directory that does not exist", ["data.name=cifar10", "data.path=/nonexistent/cifar"],
     "data.path: directory not found"),
    ("an image folder without a path", ["data.name=imagefolder"], "data.path: this data set needs a path"),
    ("synthetic data without a class count", ["data.name=synthetic"], "data.num_classes"),
    ("a data factory whose module does not import", ["data.name=nosuch.module:make"],
     "data.name: cannot import module"),
    ("an unknown data set", ["data.name=mnist"], "data.name: unknown data set 'mnist'"),
]

_SYNTHETIC = ["data.name=synthetic", "data.num_classes=10"]
BAD_MODELS = [
    ("a factory whose output width is not the data's class count", ["model.name=tests.archs:fixed_head", *_SYNTHETIC],
     "model: the model returns 1000 outputs but the data has 10 classes"),
    ("a model the pruner cannot model exactly (MixConv)", ["model.name=tests.archs:mixnet_like", *_SYNTHETIC],
     "model: 4 channel groups cannot be pruned exactly"),
    ("a torch.compile'd submodule", ["model.name=tests.archs:compiled_block", *_SYNTHETIC],
     "model: block (OptimizedModule) is wrapped in torch.compile"),
]
