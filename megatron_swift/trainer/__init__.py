"""Training: model setup (DDP + optimizer), megatron schedules, checkpoints, logging, the loop."""


def run_training(args) -> int:
    """Entry point of ``megatron pt`` / ``megatron sft`` (args already validated by the CLI)."""
    from .run import run_training as _run

    return _run(args)
