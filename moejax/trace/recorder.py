"""Records a run's routing trace (`python -m moejax.trace record`; the
layout is `moejax.trace`'s)."""

from typing import Optional

import jax

from moejax import evaluate as evaluate_lib
from moejax import trace as trace_lib
from moejax.train import evaluator as evaluator_lib


def record(workdir: str, out: Optional[str], *, num_batches: Optional[int] = None,
           split: str = "eval", dtype: Optional[str] = None) -> trace_lib.Trace:
  """Records the routing of the newest checkpoint of `workdir` over
  `num_batches` batches of `split` (the run's eval batches, the first ones
  training evaluated on, or its first training batches), computing in
  `dtype` (default as trained); writes it to `out` unless None. Returns the
  trace."""
  if split not in ("eval", "train"):
    raise trace_lib.TraceError(f"--split={split!r} must be 'eval' or 'train'")
  if out is not None:
    trace_lib.check_out(out)
  with evaluate_lib.opened(workdir, num_batches=num_batches, dtype=dtype) as run:
    n = run.num_batches
    local = (run.dataset.eval_batches(n) if split == "eval"
             else [run.dataset.train_batch(step) for step in range(n)])
    result = evaluator_lib.Evaluator(run.graphdef, trace=True).run(
        run.params, run.global_batches(local))
  meta = trace_lib.trace_meta(run.config, step=run.step, vocab_size=run.dataset.vocab_size,
                              loss=result["loss"], workdir=run.run.path, split=split,
                              num_batches=n)
  trace = trace_lib.from_traces(result["traces"], meta)
  if out is not None:
    if jax.process_index() == 0:
      trace.path = trace_lib.save(trace, out)
  return trace
