"""Privacy sweep: the demo at several per-site budgets and without DP."""

from _sweep import run_variants  # scripts run as `python simulations/<name>.py`

if __name__ == "__main__":
    variants = {f"eps-{e}": [f"privacy.target_epsilon={e}"] for e in (1, 4, 8)}
    variants["no-dp"] = ["privacy.enabled=false"]
    run_variants("Privacy budget sweep (rotation, 5 sites)", "configs/experiments/digits-demo.yaml", variants)
