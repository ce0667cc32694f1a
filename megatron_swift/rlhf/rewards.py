"""GRPO's reward functions, ms-swift's interface (``swift.rewards.orm``): a class whose instances are called
as ``reward(completions, **kwargs) -> list[float]`` (``None`` for "no reward for this one"). ``kwargs``
holds the dataset row's other columns, batched (``solution``, ``messages``...), ``response_token_ids``
(the completions' token ids) and ``trainer_state`` (``global_step``). The class is built with the run's
arguments (``args``), as ms-swift builds it, so plugins read their options from ``self.args``.

User rewards go into ``megatron_swift.plugin.orms`` from an ``--external_plugins`` file::

    from megatron_swift.plugin import ORM, orms     # ms-swift: from swift.rewards import ORM, orms

    class MyReward(ORM):
        def __call__(self, completions, **kwargs):
            return [float(len(c) < 100) for c in completions]

    orms["my_reward"] = MyReward

Built in (same names and options as ms-swift): ``accuracy`` (math answers; ``math_verify`` when it is
installed, as ms-swift, else a normalised string / number comparison), ``format``
(``<think>...</think><answer>...</answer>``), ``cosine`` (length-scaled accuracy), ``repetition``
(n-gram repetition penalty), ``soft_overlong`` (DAPO's length penalty). Stdlib only.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import List, Optional


class ORM:
    """Base class of outcome reward functions (ms-swift's ``swift.rewards.ORM``)."""

    def __init__(self, args=None, **kwargs):
        self.args = args

    def __call__(self, completions, **kwargs) -> List[Optional[float]]:
        raise NotImplementedError


class AsyncORM(ORM):
    """Asynchronous rewards (``async def __call__``): run with ``asyncio`` and gathered."""


# ------------------------------------------------------------------------------------------ accuracy

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _last_boxed(text: str) -> Optional[str]:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{") - 1
    for j in range(i, len(text)):
        depth += text[j] == "{"
        depth -= text[j] == "}"
        if depth == 0:
            return text[i + 1:j]
    return None


def extract_answer(text: str) -> str:
    """The ``<answer>`` tag's content, else the last ``\\boxed{}``, else the text."""
    tag = ANSWER_TAG.search(text)
    if tag:
        text = tag.group(1)
    boxed = _last_boxed(text)
    return (boxed if boxed is not None else text).strip()


def _normalise(answer: str) -> str:
    answer = answer.strip().strip("$").strip()
    answer = re.sub(r"\\(?:text|mathrm)\{([^}]*)\}", r"\1", answer)
    answer = answer.replace("\\!", "").replace("\\,", "").replace(" ", "").rstrip(".")
    return answer


def _number(answer: str) -> Optional[Fraction]:
    answer = answer.replace(",", "")
    frac = re.fullmatch(r"\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}", answer)
    try:
        if frac:
            return Fraction(int(frac.group(1)), int(frac.group(2)))
        return Fraction(answer)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(completion: str, solution: str) -> bool:
    got, want = _normalise(extract_answer(completion)), _normalise(extract_answer(solution))
    if not want:
        return False
    a, b = _number(got), _number(want)
    if a is not None and b is not None:
        return a == b
    return got == want


class Accuracy(ORM):
    """1.0 when the completion's answer equals the ``solution`` column's, else 0.0."""

    def __init__(self, args=None, **kwargs):
        super().__init__(args, **kwargs)
        try:
            import math_verify  # noqa: F401  (ms-swift's checker, when installed)

            self._verify = True
        except ImportError:
            self._verify = False

    def _math_verify(self, completion: str, solution: str) -> float:
        from math_verify import parse, verify

        gold = parse(extract_answer(solution) if ANSWER_TAG.search(solution) else solution,
                     extraction_mode="first_match")
        if not gold:
            return 0.0
        try:
            return float(verify(gold, parse(completion, extraction_mode="first_match")))
        except Exception:
            return 0.0

    def __call__(self, completions, solution=None, **kwargs) -> List[float]:
        if solution is None:
            raise ValueError("the accuracy reward needs a 'solution' column in the dataset")
        if self._verify:
            return [self._math_verify(c, s) for c, s in zip(completions, solution)]
        return [1.0 if answers_match(c, str(s)) else 0.0 for c, s in zip(completions, solution)]


class Format(ORM):
    """1.0 for ``<think>...</think> <answer>...</answer>`` and nothing after, else 0.0."""

    PATTERN = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>(?![\s\S])", re.DOTALL | re.MULTILINE)

    def __call__(self, completions, **kwargs) -> List[float]:
        return [1.0 if self.PATTERN.match(c) else 0.0 for c in completions]


class Cosine(ORM):
    """Accuracy scaled by length on a cosine (Yeo et al. 2025, arXiv 2502.03373): a correct answer earns
    from ``cosine_min_len_value_correct`` (length 0) down to ``cosine_max_len_value_correct`` (length
    ``cosine_max_len``), a wrong one from ``cosine_min_len_value_wrong`` to ``cosine_max_len_value_wrong``."""

    def __init__(self, args=None, accuracy_orm=None, **kwargs):
        super().__init__(args, **kwargs)
        self.accuracy = accuracy_orm or Accuracy(args)

    @staticmethod
    def cosfn(t, T, min_value, max_value):
        return max_value - (max_value - min_value) * (1 - math.cos(t * math.pi / T)) / 2

    def __call__(self, completions, solution=None, response_token_ids=None, **kwargs) -> List[float]:
        a = self.args
        correct = self.accuracy(completions, solution=solution, **kwargs)
        out = []
        for ids, acc in zip(response_token_ids, correct):
            if acc >= 1.0:
                lo, hi = a.cosine_max_len_value_correct, a.cosine_min_len_value_correct
            else:
                lo, hi = a.cosine_max_len_value_wrong, a.cosine_min_len_value_wrong
            out.append(self.cosfn(len(ids), a.cosine_max_len, lo, hi))
        return out


class Repetition(ORM):
    """``repetition_max_penalty x (1 - distinct n-grams / n-grams)`` over lower-cased words."""

    def __call__(self, completions, **kwargs) -> List[float]:
        n, penalty = self.args.repetition_n_grams, self.args.repetition_max_penalty
        out = []
        for text in completions:
            words = text.lower().split()
            if len(words) < n:
                out.append(0.0)
                continue
            grams = list(zip(*[words[i:] for i in range(n)]))
            out.append((1 - len(set(grams)) / len(grams)) * penalty)
        return out


class SoftOverlong(ORM):
    """DAPO's soft overlong punishment: 0 up to ``soft_max_length - soft_cache_length`` tokens, then
    falling linearly to -1 at ``soft_max_length`` (and beyond)."""

    def __call__(self, completions, response_token_ids=None, **kwargs) -> List[float]:
        top, cache = self.args.soft_max_length, self.args.soft_cache_length
        return [min(-(len(ids) - (top - cache)) / cache, 0.0) for ids in response_token_ids]


BUILTIN_ORMS = {"accuracy": Accuracy, "format": Format, "cosine": Cosine, "repetition": Repetition,
                "soft_overlong": SoftOverlong}


def resolve_reward_funcs(names: list, args) -> list:
    """The reward callables for ``--reward_funcs`` (built-in, or registered in ``megatron_swift.plugin.orms``
    by an ``--external_plugins`` file, which must be imported first). Unknown names: ValueError listing
    the known ones."""
    from megatron_swift.plugin import orms

    unknown = [n for n in names if n not in orms]
    if unknown:
        raise ValueError(f"argument --reward_funcs: unknown reward function {unknown[0]!r}; known: "
                         f"{', '.join(sorted(orms))} (register more in an --external_plugins file: "
                         f"orms['name'] = MyORM)")
    funcs = []
    for name in names:
        entry = orms[name]
        funcs.append(entry(args=args) if isinstance(entry, type) else entry)  # as ms-swift
    return funcs


def call_reward(func, completions: list, kwargs: dict) -> list:
    """One function's rewards (``None`` -> NaN), checked to be one number per completion."""
    import asyncio
    import inspect

    out = func(completions, **kwargs)
    if inspect.isawaitable(out):
        out = asyncio.run(out)
    out = list(out)
    name = getattr(func, "__name__", type(func).__name__)
    if len(out) != len(completions):
        raise ValueError(f"reward function {name} returned {len(out)} rewards for {len(completions)} completions")
    return [float("nan") if r is None else float(r) for r in out]
