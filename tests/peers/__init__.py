"""Runners that train a parity case in the real peer library and record every step.

Each `run(case)` returns {"params": [...], "e_g2": [...], "e_dx2": [...]} (and "ema" for
Keras with use_ema): for every step, one NumPy array per leaf, in the case's leaf order.
"""
