"""The embedded miniature's factory: the world generator, its tokenizer and the three pretraining
tasks that build ``data/miniature`` (a 4M-parameter Stable Diffusion the default job and the
tests fine-tune). Not part of the installed package: users never run it.

    python -m miniature experiment=pretrain_autoencoder     # see data/miniature/rebuild.sh
"""

SEARCHPATH = "hydra.searchpath=[pkg://miniature.conf]"   # its task and experiment configs, beside toolkit's
