"""What both jobs of `loracast train` share: `errors` (DataError, SetupError), `data` (split names
and row checks), `model` (adding the adapter, 4-bit loading, the base dtype's name), `policy`
(precision policy names), `runtime` (the device), `history` (steps and evaluations of a run),
`checkpoints` (complete checkpoints, their identity, resuming), `progress` (tqdm's bar and the
step clock), `report` (dtypes, memory, time), `plot` (PNG curves), `files` (the output folder and
its JSON files), `console` (the precision summary's lines) and `heap` (the mmap threshold of a
training process's C heap)."""
