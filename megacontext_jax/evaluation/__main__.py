from megacontext_jax.evaluation.cli import run

run()
