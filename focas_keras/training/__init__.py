"""Training: distribution strategy, schedules, the shared custom loop."""
