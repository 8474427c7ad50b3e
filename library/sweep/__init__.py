"""Sweeps: many `train_network.py` runs over a grid of config overrides (tools/sweep.py).

- `values`: splitting `key=v1,v2` (commas inside quotes or brackets kept), run names;
- `plan`: the runs (Cartesian product of axes, or an explicit list from a sweep TOML) and
  the argv each run gets;
- `runner`: one run as a child process, its log, Ctrl-C forwarding, the `.done` marker;
- `summary`: the runs' TensorBoard scalars into `sweep_summary.csv` / `.md`;
- `grid`: the last samples of every run side by side in `sweep_grid.png`.
"""
