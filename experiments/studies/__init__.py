"""Paper reproductions at small scale, one module per study.

Each study module is a sweep definition (`BASE_CONFIG`, `get_sweep(scale)`)
that the sweep runner (`experiments/sweep.py`) trains and resumes, plus what
the study measures after training (`postprocess`) and the numbers its
notebook reads (`summarize`). Run one as

    python -m experiments.studies.<name> --workdir=DIR [--scale=full|quick] [--out=DIR]

`--scale=full` is the committed study (results in `experiments/results/<name>/`),
`--scale=quick` a miniature that runs end to end in well under 2 minutes on
2 CPU cores (what the notebooks' `QUICK` switch and the tests run).

Studies (colabs/<name>.ipynb each):
  experts         loss against the number of experts at fixed compute (Switch, Clark et al.)
  capacity        training x evaluation capacity factor and dropless (Switch, ST-MoE)
  expert_choice   expert choice over the sequence vs causal groups: the leak (Wang et al.)
  z_loss          router z-loss and stability in bfloat16 at a high learning rate (ST-MoE)
  granularity     fine-grained and shared experts (DeepSeekMoE, Krajewski et al.)
  bias_balancing  auxiliary-loss-free balancing vs auxiliary-loss weights (Wang et al.)
"""
