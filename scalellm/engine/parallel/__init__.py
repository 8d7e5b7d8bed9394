"""Running one engine on several processes (ranks) over torch.distributed.

    group.py       the communication interface the layers use (all-reduce, gather, control broadcast)
    executor.py    the Executor contract: one rank here (LocalExecutor) or several (multiproc.py)
    multiproc.py   rank 0 in the engine process drives worker processes, watches them, stops them
    worker.py      a worker rank's process: join, load its share, run the steps rank 0 sends
    messages.py    the control messages (JSON), step_diff.py the per-step diffs and the workers' mirror

Sharding itself lives in the layers (engine/layers/: linear, vocab, mlp, moe, partition).
"""
