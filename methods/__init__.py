"""One file per training method; importing this package registers them all."""
from . import bp, fdg  # noqa: F401
