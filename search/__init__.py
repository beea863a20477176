"""prunetune driver side: config, sampler, the Ray Tune search, run directories, reports and the command line."""
