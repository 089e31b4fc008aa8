"""Prefect flows and deployments for transferops (thin: the logic is in src/transferops)."""
