"""What operators run: status, cleanup, reconcile, report, plan, doctor and the CLI."""
