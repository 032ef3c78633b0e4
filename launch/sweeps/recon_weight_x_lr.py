"""The paper's reconstruction weight lambda against the peak learning rate: 4 x 3 = 12 runs."""

from cae_jax.sweep import product, sweep


def get_sweep():
    return product(
        sweep("loss.recon_weight", [0.1, 0.5, 1.0, 2.0]),
        sweep("optim.learning_rate", [1e-4, 2e-4, 5e-4]),
    )
