"""Distributed ADD training on Ray Train: FSDP2-sharded student and teacher, checkpoints on object
storage, exact resume, failure recovery.

- ``trainer``: ``build_trainer(spec) -> TorchTrainer``, ``run_training(trainer)``, ``NonFiniteLossError``.
- ``loop``: ``train_loop_per_worker`` (what each worker runs), ``TrainCallback`` (rank-0 hooks).
- ``models``: the ADD models, objective and optimizers from a JobSpec.
- ``fsdp``: block-by-block ``fully_shard`` and the replicated heads' gradient all-reduce.
- ``checkpoint``: the DCP checkpoint layout, data position and RNG states.
- ``ema``, ``metrics``: the student's EMA; what each report holds.
- ``benchmark``: ingest and training throughput, data wait, memory per rank.

``trainer`` and ``loop`` import Ray; import them explicitly.
"""
