"""A training run's life around its loop: exit statuses and the exceptions that end it (lifecycle), one run per
output folder (lock), stop signals (stopsignal), the launcher-side supervisor of the ranks (supervisor).

Kept free of imports: `python -m distil.pretrain.run.supervisor` and the CLI's first moment load from here."""
