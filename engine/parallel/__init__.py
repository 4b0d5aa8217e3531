"""Tensor and pipeline parallelism for one instance of TP x PP ranks.

- ``layout``: who holds which layers and heads, and the KV re-sharding plan between two
  layouts (pure Python).
- ``tensor``: ``shard_model``, Megatron-style TP applied to a built, loaded model.
- ``pipeline``: ``PipelineStage``, one stage's layers; activations sent stage to stage.
- ``comm``: the process groups (injected by the launcher) and rank 0's step messages.
- ``worker``: one rank (``RankWorker``) and rank 0's engine (``create_driver``);
  ``run_rank`` is the single call every rank makes.

One process (tp = pp = 1) never touches this package: ``LLMEngine.from_config`` builds
the plain model and runner, with no hook and no collective.
"""
