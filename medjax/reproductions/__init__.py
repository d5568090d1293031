"""Small-scale reproductions of the papers' findings, runnable from a notebook or the shell.

Each module runs one comparison through the trainer (`medjax.train_lib.train`), every arm
from the same starting policy with the same budget, over several seeds, and writes
`results.json` (settings, per-seed curves, the summary with the spread over seeds, the
verdict, machine and versions) and a plot. `notebooks/` call them on tiny settings;
`docs/reproductions.md` reports the full ones.

    python -m medjax.reproductions.grpo_vs_grao --setting cpu --seeds 0 1 2 \\
        --out /tmp/repro/grpo_vs_grao --publish docs/reproductions/grpo_vs_grao
"""
