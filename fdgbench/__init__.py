"""fdgbench: decoupled neural-network training (FDG and baselines) benchmarked against backprop."""
__version__ = "0.1.0"
