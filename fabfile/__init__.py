"""maicivy-ops: provision, deploy and operate the maicivy stack.

``fab`` loads this package; ``tasks.py`` re-exports the same collection for
``inv``. Each namespace lives in its own module.
"""

from invoke import Collection

from . import app, backup, deploy, doctor, health, monitoring, provision, restore, sandbox, ssl
from . import render as _render

ns = Collection()
ns.add_task(_render.render)
ns.add_task(doctor.doctor)
ns.add_collection(Collection.from_module(deploy), name="deploy")
ns.add_collection(Collection.from_module(provision), name="provision")
ns.add_collection(Collection.from_module(ssl), name="ssl")
ns.add_collection(Collection.from_module(health), name="health")
ns.add_collection(Collection.from_module(monitoring), name="monitoring")
ns.add_collection(Collection.from_module(backup), name="backup")
ns.add_collection(Collection.from_module(restore), name="restore")
ns.add_collection(Collection.from_module(app), name="app")
ns.add_collection(Collection.from_module(sandbox), name="sandbox")

__all__ = ["ns"]
