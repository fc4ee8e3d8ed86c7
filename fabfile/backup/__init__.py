"""Backups and restores: the `backup` namespace (tasks.py) and the `restore` namespace
(restore.py), with what they share: the server scripts, manifests, retention and S3."""
