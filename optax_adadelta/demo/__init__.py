"""The command-line demo: the paper's MNIST network, its data loaders, `python -m optax_adadelta`.

Not part of the optimizer. `cli` needs the `[demo]` extra (tqdm for progress bars, matplotlib
for `--plot`); `mlp` and `datasets` need only JAX and NumPy. `import optax_adadelta` loads none
of them.
"""
