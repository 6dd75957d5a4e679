"""The Ray Tune side: cluster connection, the trial, the Tuner and the `prunefuse` CLI.

Nothing else imports this package; `search.cli:main` is the console script.
"""
