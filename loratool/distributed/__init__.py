"""Scale-out on a Ray cluster (`--ray ADDRESS`): the same jobs, one group of tensors per Ray task.

Nothing here imports Ray at module level; `cluster.connect` does, when a command is given `--ray`, so
`--help`, `--version`, `inspect` and every run without `--ray` never load it. The pieces:

- `options.py`: the `--ray`/`--device`/`--gpus-per-task` choice, checked without Ray;
- `cluster.py`: joining (or starting) the cluster, and the task resources;
- `groups.py`: tensors into balanced groups (pure);
- `worker.py`: what runs inside a task (fixed thread count, node and time reported back);
- `runner.py`: submitting tasks, progress, per-node counts, cancelling on Ctrl-C or failure;
- `probe.py`: that every worker node sees the paths the job reads and writes, before any work.
"""
