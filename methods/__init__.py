"""One file per training method. Importing this package imports every module
in it, so a new file needs no line here: each module's @register classes
join the registry, and `fdgbench list methods` shows them by their ``order``
(fdgbench/method.py), not by file name."""
import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):  # sorted: the same registration order everywhere
    importlib.import_module(f"{__name__}.{_module}")
