"""Ground truth without a language model (Sharkey et al. 2022): vectors built from 512 known
unit features in d = 256 (feature i fires with probability proportional to 0.99^i, 5 per vector
on average, magnitudes uniform on [0, 1]), a TopK SAE sweep of 1,024 latents over k = 3, 5, 8,
16 on them, and how well each k recovers the features: the mean max cosine similarity of the
true features with the decoder rows (MMCS), the fraction recovered at cosine >= 0.9 and the
dead latents (figure mmcs_vs_k.png).

    python -m experiments.synthetic --out runs/synthetic

Any flag of `ksae train` (the SAE, its budget and recipe) and of the generator works;
`--help` lists them.
"""
from ksae_jax import cli, sae_run
from ksae_jax.data.synthetic import SyntheticData

# 3,000 steps of 1,024 vectors; AuxK stronger than the LM recipe's (1/32 over one pass): on
# this data k = 5 then recovers 99.8% of the features (MMCS 0.998) instead of 97.9% (0.984);
# without AuxK 72.9% (0.797)
PROTOCOL = {"latents": 1024, "ks": (3, 5, 8, 16), "steps": 3000, "batch_size": 1024,
            "aux_coef": 1.0, "dead_tokens": 65_536}

if __name__ == "__main__":
    cli.run(lambda: sae_run.main(data_cls=SyntheticData, preset=PROTOCOL,
                                 prog="python -m experiments.synthetic",
                                 default_out="runs/synthetic"), "synthetic")
