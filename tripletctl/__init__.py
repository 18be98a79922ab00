"""tripletctl: triplet-loss embedding training from YAML curricula.

The Python API (tripletctl/api.py, docs/python.md): `tripletctl.train`, `load`, `evaluate` and
`init`, imported on first use, so `import tripletctl` (and the tokenizer workers and `tripletctl
validate`, which import subpackages) never pay for torch.

`tripletctl.train` is also the name of the training subpackage, which Python sets as this package's
attribute whenever it is imported: a plain function of that name would be replaced, and one put in
its place would break `import tripletctl.train.loop`. So the subpackage itself (its __init__ is
empty: importing it costs nothing) is made callable, and calling it is `api.train`.
"""

import types

__version__ = "0.1.0"
__all__ = ["evaluate", "init", "load", "train"]


class _CallableTrainPackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from tripletctl.api import train

        return train(*args, **kwargs)


from tripletctl import train  # noqa: E402  (the subpackage: nothing heavy)

train.__class__ = _CallableTrainPackage


def __getattr__(name: str):
    if name in ("evaluate", "init", "load"):
        from tripletctl import api

        return getattr(api, name)
    raise AttributeError(f"module 'tripletctl' has no attribute {name!r}")
