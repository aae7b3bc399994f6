"""GRPO with LoRA: the loop `areal train` runs on every training rank.

advantages.py  group-normalised advantages
loss.py        the PPO-clip (+ optional KL) loss handed to Engine.train_step
batch.py       rollouts -> the training batch every rank receives
publisher.py   rank 0's side of the servers: versioned loading, unloading, generation
run_dir.py     metrics.jsonl, adapters, logs and the plot of a run
loop.py        the synchronous GRPO loop over the core's interfaces
multi_adapter_loop.py   several adapters on one base: one loop each, on one step clock
adapter_records.py      the run directory and merged metrics records of such a run
worker.py      the per-rank program started by the launcher (torchrun)
"""
