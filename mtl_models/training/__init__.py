"""Training a multi-task model: the loop (`train`, `evaluate`, `predict`), the tasks' losses
and metrics (`tasks`), loss weighting across tasks (`weighting`), distillation from a teacher
(`distill`), the finiteness guard that ends a trial on NaN (`finite`) and where a job runs
(`device`: CPU / CUDA, precision, peak memory).
"""
