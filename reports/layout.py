"""The files of an experiment folder, by name: one home for the search that writes them and
the reports that read them (no imports, so trials can use it for free)."""

CONFIG_FILE = "prunefuse.json"        # the SearchConfig: what the search was asked to do
DENSE_FILE = "dense.json"             # the dense base measured like a trial
FINISHED_FILE = "finished.json"       # written when fit() returns; absent while running or after a crash
REMEASURED_FILE = "remeasured.json"   # `report --remeasure`'s latencies of the front
