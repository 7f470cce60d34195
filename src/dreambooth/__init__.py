"""dreambooth: teach a text-to-image diffusion model a new subject from a handful of photos."""

__version__ = "0.1.0"
