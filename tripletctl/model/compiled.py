"""`train.compile`: the encoder under `torch.compile`, falling back to eager once and for good when
compiling fails (a missing compiler or Triton, an inductor bug). model/encoder.py's `unwrap` strips it
before saving; train/setup.py wraps the encoder in it when `compile_wanted`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tripletctl.core.errors import one_line


class CompiledOrEager(nn.Module):
    """`torch.compile(module)` that falls back to `module` itself, once and for good, when a compiled
    call fails and the same call succeeds eagerly (a missing compiler or Triton, an inductor bug, an
    unsupported operation): training goes on, slower, after one warning line through `warn`.

    The compiled wrapper is held outside the module tree, so parameters, `state_dict` keys and the
    optimiser see `module`'s own. Out-of-memory errors are not compile failures: they propagate.
    """

    def __init__(self, module: nn.Module, warn: Callable[[str], None] | None = None, **compile_options: Any):
        super().__init__()
        self.module = module
        object.__setattr__(self, "_compiled", torch.compile(module, **compile_options))
        object.__setattr__(self, "_warn", warn)
        self.failure: str | None = None  # why compiling was given up, once it was

    @property
    def config(self) -> Any:  # what callers read off a transformers encoder
        return self.module.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.failure is None:
            try:
                return self._compiled(*args, **kwargs)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as error:  # tried eagerly below: an error of the model itself raises again there
                out = self.module(*args, **kwargs)
                self.failure = one_line(error)
                if self._warn is not None:
                    self._warn(
                        f"warning: torch.compile failed, the encoder runs eagerly from now on "
                        f"(train.compile: false hides this): {self.failure[:300]}"
                    )
                return out
        return self.module(*args, **kwargs)


def compile_wanted(setting: bool | str, device: torch.device) -> bool:
    """train.compile: true, false, or auto (= on CUDA, where it gains: docs/performance.md)."""
    return setting is True or (setting == "auto" and device.type == "cuda")
