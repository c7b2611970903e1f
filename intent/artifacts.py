"""Where an app's artifact lives in a repository: ``<repo>/<app>/<app>_<version>.tar.gz``.

``pp pack`` publishes there and ``pp-preparer --repo`` fetches from there, so the
name is made in one place that both import.
"""

from __future__ import annotations


def artifact_name(app: str, version: str) -> str:
    return f"{app}_{version}.tar.gz"


def artifact_url(repo: str, app: str, version: str) -> str:
    """Where an artifact lives in a repository (``file://``, ``http(s)://``, ``s3://``,
    or a plain absolute path, taken as ``file://``)."""
    if repo.startswith("/"):
        repo = f"file://{repo}"
    return f"{repo.rstrip('/')}/{app}/{artifact_name(app, version)}"
