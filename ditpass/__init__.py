"""ditpass: compiler passes for Diffusion Transformer inference."""
