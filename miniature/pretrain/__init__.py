"""Pretraining of the embedded miniature Stable Diffusion (data/miniature/).

Three tasks rebuild it from scratch on CPU, in order (each writes its part into
``pretrain.miniature_dir``):

    python data/make_world.py base/train base/test
    python -m miniature experiment=pretrain_autoencoder   # -> sd/vae  (AutoencoderKL, factor 4)
    python -m miniature experiment=pretrain_clip          # -> clip/   (CLIPModel; text tower = text_encoder)
    python -m miniature experiment=pretrain_unet          # -> sd/     (the whole StableDiffusionPipeline)
    python -m miniature.pretrain.card                 # model-card figures + samples_base.png

Modules: ``imagery`` (procedural textures for the autoencoder), ``world_data`` (the generated
world as in-memory tensors, attribute-swapped captions), ``autoencoder`` / ``clip`` / ``unet``
(one LightningModule each), ``latent_cache`` (frozen-encoder outputs for UNet training),
``export`` (save parts in the diffusers/transformers layouts), ``measure`` + ``card`` (model-card
figures).
"""
