"""``megatron <pt|sft|rlhf|export|rollout> [args...]``.

Parses and validates the arguments (no torch / megatron-core import), relaunches under torchrun
when ``NPROC_PER_NODE``/``NNODES`` ask for it, then dispatches: ``pt``/``sft`` call
``megatron_swift.trainer.run_training(args)``, ``export`` calls ``megatron_swift.export.run_export(args)``;
``rlhf`` (DPO, KTO) runs the trainer with its objective (megatron_swift/rlhf); ``rollout`` serves a model
with vLLM for GRPO's server mode (megatron_swift/rollout/server.py).
Argument errors print ``megatron <cmd>: error: <message>`` to stderr and exit with code 2.
"""
from __future__ import annotations

import difflib
import os
import sys
from typing import List, Optional

from megatron_swift import __version__
from megatron_swift.args import (COMMANDS, ArgumentError, format_command_help, format_main_help, parse_args,
                                 relaunch_requested)
from megatron_swift.cli.launch import apply_runtime_environment, record_exit_code, relaunch, workers_die_with_launcher

NOT_BUILT: tuple = ()  # commands parsed but not built (rlhf types not built are refused in args/support.py)


def _error(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _run_training(command: str, args) -> int:
    try:
        from megatron_swift.trainer import run_training
    except ImportError as exc:
        missing_trainer = exc.name == "megatron_swift.trainer" or "run_training" in str(exc)
        if not missing_trainer:
            raise
        print(f"megatron {command}: error: the trainer (megatron_swift.trainer.run_training) is not available "
              f"in this install: {exc}", file=sys.stderr)
        return 1
    result = run_training(args)
    return result if isinstance(result, int) else 0


def dispatch(command: str, args) -> int:
    """Run a parsed command (in this process: the worker, or the only process)."""
    if command in NOT_BUILT:
        print(f"megatron {command} is not built yet in this version (see README: roadmap).", file=sys.stderr)
        return 2
    if command == "export":
        from megatron_swift.export import run_export

        return run_export(args)
    if command == "rollout":
        from megatron_swift.rollout.server import run_server

        return run_server(args)
    return _run_training(command, args)


def run(argv: List[str]) -> int:
    if not argv:
        sys.stderr.write(format_main_help(__version__))
        return _error("megatron", "a command is required (pt, sft, rlhf, export or rollout)")
    first, rest = argv[0], argv[1:]
    if first in ("-h", "--help", "help"):
        sys.stdout.write(format_main_help(__version__))
        return 0
    if first in ("-V", "--version", "version"):
        print(f"megatron-swift {__version__}")
        return 0
    if first not in COMMANDS:
        near = difflib.get_close_matches(first, list(COMMANDS), n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        return _error("megatron", f"unknown command {first!r} (choose from {', '.join(COMMANDS)}){hint}")
    command = first
    workers_die_with_launcher(os.environ)
    if "-h" in rest or "--help" in rest:
        sys.stdout.write(format_command_help(command))
        return 0
    prog = f"megatron {command}"
    env = os.environ
    try:
        args = parse_args(command, rest, env=env)
        if command != "rollout":  # the rollout server is one process with its own engine
            from megatron_swift.plugin import prepare_run_environment

            prepare_run_environment(args)  # --model_kwargs env vars, user plugin files (here and in each worker)
            if command == "rlhf" and args.rlhf_type == "grpo":  # reward names resolve (plugins are in), engine exists
                from megatron_swift.rlhf.grpo_run import check_grpo_before_workers

                check_grpo_before_workers(args)
            apply_runtime_environment(args)  # CUDA / Transformer Engine settings, inherited by a relaunch
            if relaunch_requested(env):
                return relaunch(command, rest, env)
    except (ArgumentError, ValueError) as exc:
        return _error(prog, str(exc))
    try:
        return dispatch(command, args)
    except (ValueError, OSError) as exc:
        # bad input found while running (a file, a tensor, a hub id): the message names it; the
        # traceback is noise for the user (MEGATRON_SWIFT_DEBUG=1 shows it)
        if os.environ.get("MEGATRON_SWIFT_DEBUG"):
            raise
        return _error(prog, str(exc))


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    code = 1
    try:
        code = run(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise
    finally:
        record_exit_code(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
