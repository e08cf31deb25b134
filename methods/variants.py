"""The option shared by the local-signal methods (DGL, DNI): whether the
forward is locked or pipelined."""
from fdgbench.method import MethodOption

VARIANT = MethodOption("variant", str, "sync", "sync: batch t through all stages in iteration t (forward "
                       "locked); pipelined: stage k consumes the activation sent at t-1", choices=("sync", "pipelined"))


def forward_batch(variant: str, k: int, t: int) -> tuple[int, int]:
    """(batch stage k forwards at iteration t, message latency)."""
    return (t, 0) if variant == "sync" else (t - k, 1)
