"""Non-IID sweep: how label skew across sites changes what DP federated pretraining learns."""

from _sweep import run_variants  # scripts run as `python simulations/<name>.py`

if __name__ == "__main__":
    run_variants(
        "Dirichlet label skew sweep (rotation, eps<=8)",
        "configs/experiments/digits-demo.yaml",
        {f"alpha-{a}": [f"data.alpha={a}"] for a in (0.1, 0.5, 100)},
    )
