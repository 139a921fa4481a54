"""A TorchDispatchMode that also sees inside this package's custom ops: torch.library ops are opaque
to a dispatch mode, so a qwen3_kernels op's Python body is run again under the mode, and what it
does (GEMMs, allocations) is seen like any other aten op."""

from torch.utils._python_dispatch import TorchDispatchMode


class IntoCustomOps(TorchDispatchMode):
    """Subclasses implement ``aten(func, args, kwargs, out)``, called after each aten op has run."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("qwen3_kernels::"):
            from torch._library.custom_ops import OPDEFS
            with self.nested():
                return OPDEFS[name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        self.aten(func, args, kwargs, out)
        return out

    def nested(self) -> "IntoCustomOps":
        """A mode for an op's body, sharing this one's state (the running mode is not re-entered)."""
        raise NotImplementedError

    def aten(self, func, args, kwargs, out) -> None:
        raise NotImplementedError
