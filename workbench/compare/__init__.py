"""`workbench compare`: which regularizer forgets less for the same learning.

Each recipe's points (adapter scales, checkpoints, strengths, seeds) form a family; its Pareto
front in (learning, forgetting) is read at matched learning levels and set against the
reference family's front, the unregularized baseline trained less (docs/compare.md).

- `frontier`: the maths over floats (Pareto front, interpolation, seeds, verdicts); no I/O.
- `points`: results.json entries to families of points, and the checks on names and inputs.
- `items`: per-item scores (results.json schema 2) and every metric recomputed on resamples.
- `paired`: the paired bootstrap of a comparison, items resampled jointly across entries.
- `analysis`: each family against the reference at matched levels, with either kind of CI.
- `command`: the rows per family, metric and level; the table, Markdown and compare.json.
- `pooling`: the random-effects (DerSimonian-Laird) combination of differences across cells.
- `summarize`: several cells' compare.json files in one table, a pooled column per family.
"""
