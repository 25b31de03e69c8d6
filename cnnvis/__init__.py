"""cnnvis: train CNN image classifiers from YAML configs and see what they learned."""

__version__ = "0.1.0"
