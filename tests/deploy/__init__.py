"""Checks of the deployment files (docker/, docker-compose*.yml, docs/deploy.md) with the real tools."""
