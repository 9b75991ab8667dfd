"""Scale-out on a Ray cluster (`--ray ADDRESS`): the same jobs, one group of tensors per Ray task.

Nothing here imports Ray at module level; `cluster.connect` does, when a command is given `--ray`, so
`--help`, `--version`, `inspect` and every run without `--ray` never load it. The pieces:

- `options.py`: the `--ray`/`--device`/`--gpus-per-task` choice, checked without Ray;
- `cluster.py`: joining (or starting) the cluster, and the task resources;
- `groups.py`: tensors into balanced groups (pure);
- `worker.py`: what runs inside a task (fixed thread count, node and time reported back);
- `runner.py`: submitting tasks, progress, per-node counts, cancelling on Ctrl-C or failure;
- `probe.py`: that every worker node sees the paths the job reads and writes, before any work;
- `inputs.py`: an `hf://` input fetched into a worker node's own cache when it lacks the driver's;
- `progress.py`: the one progress bar over all tasks, naming the nodes in use.

The commands' own task functions stay with them (`api/svd_extract.extract_group`, `api/resize.resize_group`,
`api/combine.combine_group`, `api/merge_ray.write_shard`), so this package knows nothing of their math.
"""
