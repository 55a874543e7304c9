"""compile=True: torch.compile only wraps the head step; it compiles on the first call, inside the
token loop, where a failure (no C compiler, an unsupported op: torch._dynamo's errors, Inductor's
among them) used to surface as a raw InductorError. `compile_failures_named` turns exactly those
into one line naming the setting; every other error passes through as it is."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import NextStepError


def is_compile_failure(exc: BaseException) -> bool:
    """Whether torch.compile raised it (torch._dynamo's exceptions, Inductor's included)."""
    import torch._dynamo.exc as dynamo_errors  # only imported once something failed

    return isinstance(exc, dynamo_errors.TorchDynamoException)


@contextmanager
def compile_failures_named(compile: bool) -> Iterator[None]:
    """Run the token loop (which warms the compiled step on its first token) inside this block."""
    try:
        yield
    except Exception as exc:
        if compile and is_compile_failure(exc):
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise NextStepError(f"compile=True failed ({type(exc).__name__}: {first_line}); "
                                "run with compile=False") from exc
        raise
