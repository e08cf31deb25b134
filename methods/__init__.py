"""One file per training method; importing this package registers them all,
in the order `fdgbench list methods` shows them."""
# isort: off
from . import bp  # noqa: F401
from . import fdg  # noqa: F401
from . import ddg  # noqa: F401
from . import fr  # noqa: F401
from . import dgl  # noqa: F401
from . import dni  # noqa: F401
from . import adl  # noqa: F401
from . import dp  # noqa: F401
