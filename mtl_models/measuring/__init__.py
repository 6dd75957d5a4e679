"""Measuring a model: parameters, non-zero parameters, stored bytes, MACs and latency
(`measure`), and the lock that times one model at a time on a machine (`timing_lock`).
"""
