"""maicivy-ops: provision, deploy and operate the maicivy stack.

``fab`` loads this package; ``tasks.py`` re-exports the same collection for
``inv``. Each namespace module ends with its own ``ns``; this file only
assembles them (docs/HACKING.md has the map).
"""

from invoke import Collection

from . import app, doctor, health, monitoring, provision, render, sandbox, ssl
from .backup import restore
from .backup import tasks as backup
from .deploy import tasks as deploy

ns = Collection()
ns.add_task(render.render)
ns.add_task(doctor.doctor)
for _namespace in (deploy, provision, ssl, health, monitoring, backup, restore, app, sandbox):
    ns.add_collection(_namespace.ns)

__all__ = ["ns"]
