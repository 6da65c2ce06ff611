"""Fast mode's convolution choices: ``policy`` holds every hardware-dependent one."""

from . import policy

__all__ = ["policy"]
