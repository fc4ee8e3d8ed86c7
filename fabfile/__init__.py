"""maicivy-ops: provision, deploy and operate the maicivy stack.

``fab`` loads this package; ``tasks.py`` re-exports the same collection for
``inv``. Each namespace lives in its own module.
"""

from invoke import Collection

from . import render as _render

ns = Collection()
ns.add_task(_render.render)

__all__ = ["ns"]
