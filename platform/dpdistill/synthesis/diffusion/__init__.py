"""Diffusion model parts for the DP diffusion synthesisers (dpdm, pdp-diffusion, dp-ldm, dp-lora).

Plain torch + diffusers + peft, no Ray and no ledger: ``unet`` (the class-conditional UNet2DModel and its public
architecture), ``objective`` (the DDPM ε-prediction loss as a DP-SGD objective, K rows per record), ``sampler``
(DDIM with classifier-free guidance; post-processing), ``pretrain`` (cached non-private pre-training on a public
set, local checkpoints), ``lora`` (peft LoRA adapters whose layers opacus can take per-sample gradients of) and
``autoencoder`` (DP-LDM's public AutoencoderKL: cached pre-training, the public latent scale, encode / decode).
Import the submodules directly: this package imports nothing so that importing it stays cheap.
"""
