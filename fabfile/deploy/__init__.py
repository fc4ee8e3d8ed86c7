"""Deploys: the `deploy` namespace (tasks.py) and what it runs on the server."""
