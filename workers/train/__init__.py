"""Distributed ADD training on Ray Train: FSDP2-sharded student and teacher, checkpoints on object
storage, exact resume, recovery from failed workers.

- ``trainer``: ``build_trainer(spec) -> TorchTrainer``, ``run_training(trainer)``, ``NonFiniteLossError``.
- ``loop``: ``train_loop_per_worker`` (what each worker runs), ``TrainCallback`` (rank-0 hooks).
- ``models``: the ADD models, objective and optimizers from a JobSpec; batches from data rows.
- ``fsdp``: block-by-block ``fully_shard``; the replicated heads' gradient all-reduce.
- ``checkpoint``: the DCP checkpoint layout, data position and RNG states.
- ``stream``: this rank's micro-batches, counted and skippable (the data position).
- ``ema``, ``metrics``, ``export``: the student's EMA; what each report holds; the final export.
- ``benchmark``: ingest and training throughput, data wait, memory per rank.

``trainer`` and ``loop`` import Ray; import them explicitly.
"""
