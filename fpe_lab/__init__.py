"""fpe_lab: a testbed for the score Fokker-Planck equation in diffusion models."""

__version__ = "0.3.0"
