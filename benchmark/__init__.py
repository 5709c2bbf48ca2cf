"""cfbench: continual fine-tuning benchmark for foundation image models."""
__version__ = "0.1.0"
