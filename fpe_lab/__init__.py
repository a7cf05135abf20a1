"""fpe_lab: a testbed for the score Fokker-Planck equation in diffusion models."""

__version__ = "0.2.0"
